"""Cohorts through a real Dask LocalCluster: resumable, exactly once, bad rows reported."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest

from napari_lnmeta.cli import main
from napari_lnmeta.cohort import load_cohort, run_cohort_job
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.omezarr import read_ome_zarr
from napari_lnmeta.progress import run


@pytest.fixture(scope="module")
def cohort_dir(shared_data, tmp_path_factory):
    """The shared slides, under distinct names, in one folder (symlinks: inputs untouched)."""
    d = tmp_path_factory.mktemp("cohort")
    picks = ["cmu1_small_region_svs/CMU-1-Small-Region.svs",
             "camelyon16_tumor001_lowres/tumor_001_level5.ome.tif",
             "camelyon16_tumor001_lowres/tumor_001_level5_pyramid.tif",
             "camelyon16_tumor001_lowres/tumor_001_level5.tif",
             "skimage_ihc_dab/ihc.png"]
    picks += [f"anhir_cima_lung_lesion3_he_ihc/images/{n}" for n in sorted(
        os.listdir(shared_data / "anhir_cima_lung_lesion3_he_ihc" / "images"))]
    for rel in picks:
        src = shared_data / rel
        os.symlink(src, d / src.name)
    return d


def _masks(out):
    return {p.name: np.asarray(read_ome_zarr(p / "tissue.ome.zarr").data)
            for p in sorted(out.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def test_cluster_survives_a_killed_worker_exactly_once(cohort_dir, tmp_path):
    items = load_cohort(cohort_dir)
    assert len(items) == 10 and not any(i.error for i in items)
    ref = run(run_cohort_job(items, "tissue", tmp_path / "sync", scheduler="sync"))
    assert ref.counts == {"done": 10}

    clients = []
    job = run_cohort_job(items, "tissue", tmp_path / "dask", n_workers=2, threads_per_worker=1,
                    on_start=clients.append)
    killed = None
    seen = []
    for p in job_iter(job, seen):
        if killed is None and p.partial is not None:
            client = clients[0]
            busy = [a for a, keys in client.processing().items() if keys]
            assert busy, "the cohort finished before a worker could be killed"
            nanny = next(n for n in client.cluster.workers.values() if n.worker_address == busy[0])
            killed = nanny.process.process.pid
            os.kill(killed, signal.SIGKILL)
    report = seen[-1]
    assert killed is not None
    assert report.counts == {"done": 10}
    out = tmp_path / "dask"
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == sorted(i.id for i in items)  # exactly one folder per slide, no temp left
    a, b = _masks(tmp_path / "sync"), _masks(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with open(out / "cohort_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["done"] * 10


def job_iter(job, sink):
    """Iterate a progress generator, appending its return value to ``sink``."""
    while True:
        try:
            yield next(job)
        except StopIteration as stop:
            sink.append(stop.value)
            return


def test_resume_skips_finished_and_bad_rows_are_reported(cohort_dir, tmp_path, cmu1):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(cmu1.read_bytes()[:150_000])
    table = tmp_path / "cohort.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "age", "grade"])
        w.writerow([str(cohort_dir / "CMU-1-Small-Region.svs"), "54", "2"])
        w.writerow(["missing.svs", "61", "3"])
        w.writerow([str(cohort_dir / "CMU-1-Small-Region.svs"), "54", "2"])  # duplicate
        w.writerow([str(bad), "70", "1"])
        w.writerow([str(cohort_dir / "ihc.png"), "40", "1"])
    items = load_cohort(table)
    assert items[0].clinical == {"age": "54", "grade": "2"}
    assert "no such file" in items[1].error and "duplicate" in items[2].error
    out = tmp_path / "out"
    report = run(run_cohort_job(items, "tissue", out, scheduler="sync"))
    status = {r["id"]: r["status"] for r in report.records}
    assert list(status.values()) == ["done", "failed", "failed", "failed", "done"]
    broken = report.records[3]
    assert "broken.svs" in broken["error"] and "truncated" in broken["error"]
    # resume: finished slides are skipped, not recomputed
    before = os.stat(out / items[0].id / "result.json").st_mtime_ns
    again = run(run_cohort_job(items, "tissue", out, scheduler="sync"))
    assert [r["status"] for r in again.records] == ["skipped", "failed", "failed", "failed", "skipped"]
    assert os.stat(out / items[0].id / "result.json").st_mtime_ns == before
    # a half-written folder from a crash is ignored and redone
    shutil.rmtree(out / items[4].id)
    (out / f".{items[4].id}.tmp-dead").mkdir()
    third = run(run_cohort_job(items, "tissue", out, scheduler="sync"))
    assert third.records[4]["status"] == "done"


def test_cli_batch(cohort_dir, tmp_path, capsys):
    code = main(["batch", str(cohort_dir / "*.svs"), "--step", "tissue", "-o", str(tmp_path / "o"),
                 "--scheduler", "sync"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1 slides: 1 done" in out
    rec = json.loads((tmp_path / "o" / "CMU-1-Small-Region" / "result.json").read_text())
    assert rec["result"]["mpp"] == pytest.approx(0.499)
    assert main(["batch", str(cohort_dir), "--step", "nope", "-o", str(tmp_path / "x"),
                 "--scheduler", "sync"]) == 2


def test_step_parameters_parse_as_numbers_booleans_or_text():
    from napari_lnmeta.cohort import parse_params

    got = parse_params(["model=/m.safetensors", "batch-size=32", "threshold = 0.5",
                        "tta=TRUE", "x=false"])
    assert got == {"model": "/m.safetensors", "batch_size": 32, "threshold": 0.5,
                   "tta": True, "x": False}
    assert isinstance(got["batch_size"], int)
    with pytest.raises(InputError, match="'tta': expected KEY=VALUE"):
        parse_params(["tta"])
