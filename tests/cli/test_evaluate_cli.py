"""``lnmeta evaluate-slides`` and ``lnmeta separability`` end to end.

The tumour slide is CAMELYON16 tumor_001 with its real expert polygons; its prediction
folder holds a heatmap made from the real tumour mask (hot where the experts drew tumour)
plus two false positives, as ``lnmeta predict`` would write it (summary.json,
lesions.geojson, probability.ome.zarr, analysed.ome.zarr).
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from napari_lnmeta.cli import main

MPP0 = 0.243
CELL = 256  # level-0 pixels per heatmap cell (8 level-5 pixels)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, camelyon):
    from PIL import Image

    from napari_lnmeta.core.lesions import find_lesions, write_lesions_geojson
    from napari_lnmeta.io.frame import SlideFrame
    from napari_lnmeta.io.omezarr import write_ome_zarr

    d = tmp_path_factory.mktemp("evaluate")
    pred, truth = d / "pred", d / "truth"
    folder = pred / "batch" / "tumor_001"
    folder.mkdir(parents=True)
    truth.mkdir()
    mask5 = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0
    h5, w5 = mask5.shape
    shape0 = (h5 * 32, w5 * 32)
    f = CELL // 32
    frac = mask5[: h5 // f * f, : w5 // f * f].reshape(h5 // f, f, w5 // f, f).mean(axis=(1, 3))
    prob = np.where(frac > 0.2, 0.6 + 0.4 * frac, 0.05).astype(np.float32)
    prob[100, 100] = 0.92  # false positives far from the tumour
    prob[600, 50] = 0.55
    frame = SlideFrame(downsample=CELL, slide_mpp=MPP0, slide="tumor_001.tif",
                       slide_shape=shape0)
    write_ome_zarr(folder / "probability.ome.zarr", prob.astype(np.float16), frame=frame)
    write_ome_zarr(folder / "analysed.ome.zarr", np.ones(prob.shape, np.uint8), frame=frame,
                   kind="labels")
    les = find_lesions(prob, frame, threshold=0.5, radius_um=200.0)
    write_lesions_geojson(folder / "lesions.geojson", les)
    (folder / "summary.json").write_text(json.dumps({
        "format": "lnmeta-prediction", "version": 1, "complete": True,
        "slide": {"path": "/slides/tumor_001.tif", "name": "tumor_001.tif",
                  "shape": list(shape0), "mpp": MPP0},
        "score": {"max": float(prob.max()), "top_k_mean": 0.9, "top_k": 10}}))
    shutil.copy(camelyon / "Tumor_001.json", truth / "Tumor_001.json")
    # a tumour-free slide (listed with --negatives), with detections that are all FPs
    (pred / "normal_001.csv").write_text("0.40,1000,2000\n0.35,5000,9000\n")
    (pred / "scores.csv").write_text("slide,score\nnormal_001,0.40\n")
    # a prediction without ground truth, and a ground truth without prediction
    (pred / "orphan_007.csv").write_text("0.9,10,10\n")
    shutil.copy(camelyon / "Tumor_001.json", truth / "tumor_099.json")
    return {"pred": pred, "truth": truth, "n_lesions": len(les)}


def _argv(inputs, out, *extra):
    return ["evaluate-slides", str(inputs["pred"]), str(inputs["truth"]), "-o", str(out),
            "--negatives", "normal_001", "--n-boot", "200", *extra]


def test_report_is_written_and_bad_inputs_are_listed(inputs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(_argv(inputs, out)) == 0
    cap = capsys.readouterr()
    assert "FROC:" in cap.out and "slide AUC: 1.000" in cap.out
    for name in ("report.json", "slides.csv", "detections.csv", "roc.png", "froc.png"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    assert rep["evaluated"] == 2
    reasons = {s["slide"]: s["reason"] for s in rep["skipped"]}
    assert "no ground truth" in reasons["orphan_007"] and "--negatives" in reasons["orphan_007"]
    assert reasons["tumor_099"] == "ground truth but no prediction"
    assert "skipped orphan_007" in cap.err and "skipped tumor_099" in cap.err
    f = rep["froc"]
    # both expert regions are hit (the heatmap is the mask); 3 FPs over 2 slides
    assert (f["n_tumours"], f["n_slides"]) == (2, 2)
    assert f["sensitivity"][-1] == 1.0
    slides = {s["slide"]: s for s in rep["slides"]}
    t = slides["tumor_001"]
    assert t["label"] == "tumour" and t["hits"] == 2 and t["fp"] == 2
    assert t["hits"] + t["duplicates"] + t["fp"] == t["detections"] == inputs["n_lesions"]
    assert slides["normal_001"]["fp"] == 2 and slides["normal_001"]["label"] == "normal"
    assert rep["slide_level"]["AUC"] == 1.0
    with open(out / "slides.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == ["normal_001", "tumor_001", "orphan_007", "tumor_099",
                                          "mean", "sd"]
    assert rows[2]["status"] == "skipped" and rows[-2]["fp"] == "2.0"
    with open(out / "detections.csv") as fh:
        det = list(csv.DictReader(fh))
    assert {d["outcome"] for d in det} <= {"TP", "FP", "duplicate", "ITC"}
    assert sum(d["outcome"] == "TP" for d in det) == 2
    # an existing report is refused in one line; --overwrite replaces it
    assert main(_argv(inputs, out)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(_argv(inputs, out, "--overwrite", "--lesions", "components")) == 0
    rep2 = json.loads((out / "report.json").read_text())
    t2 = next(s for s in rep2["slides"] if s["slide"] == "tumor_001")
    assert t2["hits"] == 2 and t2["fp"] == 2 and t2["duplicates"] == 0  # one per component


def test_nothing_to_evaluate(inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "r"
    assert main(["evaluate-slides", str(empty), str(inputs["truth"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no slide could be evaluated" in err and "no predictions found" in err
    rep = json.loads((out / "report.json").read_text())
    assert rep["evaluated"] == 0 and {s["reason"] for s in rep["skipped"]} == {
        "ground truth but no prediction"}
    assert not (out / "froc.png").exists()
    # a missing folder: one line
    assert main(["evaluate-slides", str(tmp_path / "nope"), str(inputs["truth"]), "-o",
                 str(tmp_path / "r2")]) == 2
    assert "no such prediction folder" in capsys.readouterr().err
    # a negative slide listed as such but whose truth has tumour is skipped with the reason
    out3 = tmp_path / "r3"
    assert main(_argv(inputs, out3, "--negatives", "normal_001,tumor_001")) == 0
    rep = json.loads((out3 / "report.json").read_text())
    why = {s["slide"]: s["reason"] for s in rep["skipped"]}
    assert "ground truth has tumour" in why["tumor_001"]
    assert rep["froc"] is None and any("FROC" in n for n in rep["notes"])


def test_separability_cli(shared_data, tmp_path, capsys):
    lc = shared_data / "lc25000_lung_224" / "images"
    out = tmp_path / "sep"
    argv = ["separability", str(lc / "lung_n"), str(lc / "lung_scc"), "-o", str(out),
            "--backbone", "lnmeta_cnn_small", "--patch-size", "48", "--max-patches", "12",
            "--stain", "reinhard"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "raw" in text and "normalised" in text and "ARI" in text
    d = json.loads((out / "separability.json").read_text())
    assert set(d["results"]) == {"raw", "normalised"}
    assert d["results"]["raw"]["n"] == [12, 12]
    assert (out / "separability.png").stat().st_size > 1000
    assert len((out / "points.csv").read_text().splitlines()) == 1 + 2 * 24
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
