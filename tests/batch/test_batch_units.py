"""Cohorts keep each slide's physical units, and paths are resolved on the client.

``lnmeta batch --mpp`` supplies µm/px only to slides whose file lacks it; a cohort CSV's
``mpp`` column sets it per slide; a slide run without µm/px is flagged in
``cohort_summary.csv``. With a TCP scheduler whose worker runs in another folder, a
relative ``-o`` still means the client's folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from napari_lnmeta.cli import main


@pytest.fixture(scope="module")
def slides(shared_data, tmp_path_factory):
    """A real Aperio file with µm/px (CMU-1, 0.499) and the same pixels as a TIFF
    without any µm/px."""
    import tifffile
    from tests.conftest import write_pyramid_tiff

    d = tmp_path_factory.mktemp("units")
    cmu1 = shared_data / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
    os.symlink(cmu1, d / "with_mpp.svs")
    img = tifffile.imread(cmu1)
    write_pyramid_tiff(d / "no_mpp.tif", np.ascontiguousarray(img[..., :3]), levels=2,
                       mpp=None, ome=False, compression="zlib")
    return d


def _summary(out):
    with open(out / "cohort_summary.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_mpp_only_for_slides_without_it_and_a_per_slide_column(slides, tmp_path, capsys):
    # copies under other names (the same file twice would be a duplicate row)
    shutil.copy(slides / "no_mpp.tif", tmp_path / "bare_csv.tif")
    shutil.copy(slides / "with_mpp.svs", tmp_path / "cmu1_csv.svs")
    table = tmp_path / "cohort.csv"
    table.write_text("slide,id,mpp,age\n"
                     f"{slides / 'with_mpp.svs'},cmu1,,50\n"
                     f"{slides / 'no_mpp.tif'},bare,,61\n"
                     f"{tmp_path / 'bare_csv.tif'},bare_csv,2.0,62\n"
                     f"{tmp_path / 'cmu1_csv.svs'},cmu1_csv,0.25,63\n")
    out = tmp_path / "out"
    assert main(["batch", str(table), "--step", "tissue", "-o", str(out), "--mpp", "7.776",
                 "--scheduler", "sync"]) == 0
    s = _summary(out)
    # the file's 0.499 µm/px is kept: CMU-1-Small-Region is 1.1 x 1.5 mm
    assert float(s["cmu1"]["mpp"]) == pytest.approx(0.499, abs=1e-3)
    assert float(s["cmu1"]["tissue_area_mm2"]) < 1.7
    assert s["cmu1"]["mpp_source"] not in ("", "user") and not s["cmu1"]["warning"]
    assert float(s["bare"]["mpp"]) == pytest.approx(7.776)
    assert s["bare"]["mpp_source"].startswith("--mpp")
    assert float(s["bare_csv"]["mpp"]) == 2.0 and s["bare_csv"]["mpp_source"] == "cohort CSV"
    assert float(s["cmu1_csv"]["mpp"]) == 0.25 and s["cmu1_csv"]["mpp_source"] == "cohort CSV"
    # the same pixels: areas scale with the square of the µm/px (within what detecting
    # tissue at 10 µm/px from differently sized images changes)
    a_bare, a_csv = float(s["bare"]["tissue_area_mm2"]), float(s["bare_csv"]["tissue_area_mm2"])
    assert a_bare / a_csv == pytest.approx((7.776 / 2.0) ** 2, rel=0.1)
    rec = json.loads((out / "bare_csv" / "result.json").read_text())
    assert rec["mpp"] == 2.0 and "mpp" not in json.loads(
        (out / "cohort.json").read_text())["items"][2]["clinical"]
    # without --mpp the bare slide runs in pixels and is flagged in the cohort summary
    capsys.readouterr()
    out2 = tmp_path / "out2"
    assert main(["batch", str(table), "--step", "tissue", "-o", str(out2),
                 "--scheduler", "sync"]) == 0
    s2 = _summary(out2)
    assert s2["bare"]["mpp"] == "" and "no µm/px" in s2["bare"]["warning"]
    assert all(not s2[k]["warning"] for k in ("cmu1", "bare_csv", "cmu1_csv"))
    err = capsys.readouterr().err
    assert "warning: bare: no µm/px" in err and "warning: cmu1" not in err
    # a bad mpp value fails that slide only, naming the CSV
    table.write_text(table.read_text().replace(",2.0,", ",-3,"))
    assert main(["batch", str(table), "--step", "tissue", "-o", str(tmp_path / "out3"),
                 "--scheduler", "sync"]) == 1
    s3 = _summary(tmp_path / "out3")
    assert s3["bare_csv"]["status"] == "failed" and "mpp '-3'" in s3["bare_csv"]["error"]
    assert str(table) in s3["bare_csv"]["error"] and s3["cmu1"]["status"] == "done"
    assert main(["batch", str(table), "--step", "tissue", "-o", str(tmp_path / "o4"),
                 "--mpp", "0"]) == 2


def _start(args, cwd, log):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ))


def test_tcp_scheduler_writes_relative_out_on_the_client(slides, tmp_path, monkeypatch, capsys):
    """A scheduler and a worker started in another folder: the slide folders still land
    under the client's relative -o, and relative file parameters are found."""
    client_dir, worker_dir = tmp_path / "client", tmp_path / "worker"
    client_dir.mkdir()
    worker_dir.mkdir()
    sched_file = tmp_path / "scheduler.json"
    logs = open(tmp_path / "dask.log", "w")  # noqa: SIM115 - closed below
    procs = [_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(sched_file)], worker_dir, logs)]
    try:
        for _ in range(600):
            if sched_file.is_file() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        procs.append(_start(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                             "--nthreads", "1", "--nworkers", "1", "--no-dashboard",
                             "--local-directory", str(worker_dir)], worker_dir, logs))
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(1, timeout=120)
            cwds = list(c.run(os.getcwd).values())
            assert len(cwds) == 1 and os.path.samefile(cwds[0], worker_dir)
        monkeypatch.chdir(client_dir)
        (client_dir / "cohort.csv").write_text(f"slide,mpp\n{slides / 'no_mpp.tif'},1.5\n"
                                               f"{slides / 'with_mpp.svs'},\n")
        assert main(["batch", "cohort.csv", "--step", "tissue", "-o", "results/run1",
                     "--scheduler", address]) == 0, capsys.readouterr().err
        out = client_dir / "results" / "run1"
        assert (out / "no_mpp" / "result.json").is_file()
        assert (out / "with_mpp" / "tissue.ome.zarr").is_dir()
        assert not (worker_dir / "results").exists()
        s = _summary(out)
        assert {r["status"] for r in s.values()} == {"done"}
        assert float(s["no_mpp"]["mpp"]) == 1.5
        assert json.loads((out / "no_mpp" / "result.json").read_text())["pid"] != os.getpid()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        logs.close()


def test_file_parameters_are_made_absolute_on_the_client(tmp_path, monkeypatch):
    from napari_lnmeta.cohort import _absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(b"x")
    got = _absolute_paths({"model": "m.safetensors", "init": "imagenet", "cache_dir": "cache",
                           "backbone": "resnet18", "bags": 8, "truth": "missing.xml"})
    assert got["model"] == str(tmp_path / "m.safetensors")
    assert got["cache_dir"] == str(tmp_path / "cache")
    assert (got["init"], got["backbone"], got["bags"]) == ("imagenet", "resnet18", 8)
    assert got["truth"] == "missing.xml"  # names nothing here: the step reports it
