"""Every pipeline step runs per slide through the cohort runner, on real slides."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from tests._mil_helpers import BACKBONE, CROP_FEATURES_META, PATCH, camelyon_crop, random_mil_file

from napari_lnmeta.cohort import STEPS, load_cohort, run_cohort_job
from napari_lnmeta.io.omezarr import read_ome_zarr
from napari_lnmeta.progress import run


def _csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_all_documented_steps_exist():
    assert set(STEPS) == {"tissue", "predict", "register", "extract-features", "mil"}


def test_predict_step_on_a_local_cluster(shared_data, tmp_path):
    """Two real slides, bundled model, two Dask workers: one prediction folder each."""
    d = tmp_path / "cohort"
    d.mkdir()
    for rel in ("cmu1_small_region_svs/CMU-1-Small-Region.svs",
                "camelyon16_tumor001_lowres/tumor_001_level5.ome.tif"):
        os.symlink(shared_data / rel, d / os.path.basename(rel))
    items = load_cohort(d)
    report = run(run_cohort_job(items, "predict", tmp_path / "out", n_workers=2,
                           threads_per_worker=1, params={"stride": 16}))
    assert report.counts == {"done": 2}
    by_id = {r["id"]: r for r in report.records}
    cam = by_id["tumor_001_level5"]["result"]
    assert cam["patches"] > 1000 and 0.0 <= cam["score_max"] <= 1.0
    heat = read_ome_zarr(tmp_path / "out" / "tumor_001_level5" / "predict" / "probability.ome.zarr")
    assert heat.data.ndim == 2 and np.isfinite(np.asarray(heat.data, dtype=np.float32)).all()
    summary = json.loads((tmp_path / "out" / "CMU-1-Small-Region" / "predict" /
                          "summary.json").read_text())
    assert summary["counts"]["patches"] == by_id["CMU-1-Small-Region"]["result"]["patches"]


def test_second_slide_on_a_worker_reuses_the_loaded_model(cmu1, tmp_path):
    """One Dask worker, two slides: the model is loaded for the first only (warm cohort)."""
    d = tmp_path / "cohort"
    d.mkdir()
    for name in ("a.svs", "b.svs"):  # two files (one file twice is a duplicate row)
        shutil.copyfile(cmu1, d / name)
    report = run(run_cohort_job(load_cohort(d), "predict", tmp_path / "out", n_workers=1,
                           threads_per_worker=1, params={"stride": 32}))
    assert report.counts == {"done": 2}, report.failed()
    assert len({r["pid"] for r in report.records}) == 1  # the same worker process
    cached = sorted(json.loads((tmp_path / "out" / r["id"] / "predict" / "summary.json")
                               .read_text())["timing"]["model_cached"] for r in report.records)
    assert cached == [False, True]
    a, b = (read_ome_zarr(tmp_path / "out" / n / "predict" / "probability.ome.zarr")
            for n in ("a", "b"))
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_unknown_step_parameter_is_reported_per_slide(cmu1, tmp_path):
    items = load_cohort(_csv(tmp_path / "c.csv", ["slide"], [[str(cmu1)]]))
    report = run(run_cohort_job(items, "predict", tmp_path / "out", scheduler="sync",
                           params={"strid": 8}))
    assert report.counts == {"failed": 1}
    assert "unknown parameter(s) strid" in report.records[0]["error"]


def test_register_step_needs_and_uses_the_ihc_partner(shared_data, tmp_path):
    img = shared_data / "anhir_cima_lung_lesion3_he_ihc" / "images"
    he, cd31 = img / "29-041-Izd2-w35-He-les3.jpg", img / "29-041-Izd2-w35-CD31-3-les3.jpg"
    table = _csv(tmp_path / "pairs.csv", ["slide", "ihc"], [[str(he), str(cd31)], [str(cd31), ""]])
    items = load_cohort(table)
    report = run(run_cohort_job(items, "register", tmp_path / "out", scheduler="sync",
                           params={"mode": "affine", "mpp": 2.0, "ihc_mpp": 2.0,
                                   "mask_mpp": 8.0}))
    rec = {r["id"]: r for r in report.records}
    assert rec[items[0].id]["status"] == "done", rec[items[0].id].get("error")
    assert "needs an IHC partner" in rec[items[1].id]["error"]
    folder = tmp_path / "out" / items[0].id
    t = json.loads((folder / "transform.json").read_text())
    assert t["mode"] == "affine"
    mask = read_ome_zarr(folder / "tumour_mask.ome.zarr")
    assert mask.data.ndim == 2 and mask.data.dtype.kind in "ui"


def test_features_then_mil_steps(tmp_path):
    from napari_lnmeta.models.extractor import load_extractor

    crop, _ = camelyon_crop()
    items = load_cohort(_csv(tmp_path / "c.csv", ["slide"], [[str(crop)]]))
    feats = run(run_cohort_job(items, "extract-features", tmp_path / "f", scheduler="sync",
                          params={"backbone": BACKBONE, "patch_size": PATCH, "device": "cpu",
                                  **CROP_FEATURES_META}))
    assert feats.counts == {"done": 1}, feats.records[0].get("error")
    n = feats.records[0]["result"]["patches"]
    assert n > 50
    _, info = load_extractor(BACKBONE, patch_size=PATCH, seed=0)
    model = random_mil_file(tmp_path / "mil.safetensors", info)
    mil = run(run_cohort_job(items, "mil", tmp_path / "m", scheduler="sync",
                        params={"model": str(model), "device": "cpu"}))
    assert mil.counts == {"done": 1}, mil.records[0].get("error")
    res = mil.records[0]["result"]
    assert res["instances"] == n
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "m" / items[0].id / "mil" / "summary.json").is_file()
    missing = run(run_cohort_job(items, "mil", tmp_path / "m2", scheduler="sync"))
    assert "needs a MIL model file" in missing.records[0]["error"]


def test_one_gpu_per_worker_only_when_asked_for_auto():
    from napari_lnmeta.cohort import worker_device

    assert worker_device("auto", 0, 4) == "cuda:0"
    assert worker_device("auto", 5, 4) == "cuda:1"
    assert worker_device(None, 1, 2) == "cuda:1"
    assert worker_device("cpu", 1, 2) is None          # an explicit device is kept
    assert worker_device("auto", 1, 1) is None         # one GPU: "auto" already finds it
    assert worker_device("auto", None, 2) is None      # not in a numbered worker
