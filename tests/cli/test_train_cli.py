"""``lnmeta make-patches`` -> ``lnmeta train`` -> ``lnmeta evaluate`` end to end."""

from __future__ import annotations

import json

import pytest
from tests._inference_helpers import make_synthetic_slide

from napari_lnmeta.cli import main
from napari_lnmeta.io.annotations import mask_to_polygons, write_geojson
from napari_lnmeta.io.frame import SlideFrame


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, camelyon):
    tmp = tmp_path_factory.mktemp("cli")
    syn = make_synthetic_slide(tmp, camelyon)
    polys = mask_to_polygons(syn.truth, SlideFrame(), label="Tumor")
    geo = write_geojson(tmp / "tumour.geojson", polys)
    return tmp, syn.path, geo


def test_help_texts(capsys):
    for cmd in ("make-patches", "train", "evaluate"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--positive-min" in out and "--holdout-region" in out and "--compare" in out
    assert "seed 000" in out


def test_patches_train_evaluate(labelled, capsys):
    tmp, slide, geo = labelled
    patches = tmp / "p.npz"
    assert main(["make-patches", "--slide", str(slide), "--labels", str(geo), "--patch-size", "32",
                 "--stride", "32", "--class-map", "Tumor=tumour", "--no-balance",
                 "--out", str(patches)]) == 0
    assert "patches" in capsys.readouterr().out
    run = tmp / "run"
    assert main(["train", str(patches), "--holdout-region", "0,0,450,740", "--arch",
                 "lnmeta_cnn_small", "--epochs", "2", "--batch-size", "8", "--epoch-size", "32",
                 "--sampler", "balanced", "--device", "cpu", "--workers", "1", "--in-memory",
                 "--out", str(run), "--eval", "--export", str(tmp / "model.safetensors")]) == 0
    assert (run / "last.safetensors").is_file() and (run / "log.csv").is_file()
    assert (run / "eval" / "metrics.json").is_file() and (tmp / "model.safetensors").is_file()
    out = tmp / "eval"
    assert main(["evaluate", str(tmp / "model.safetensors"), str(patches), "--holdout-region",
                 "0,0,450,740", "--compare", str(run / "best.safetensors"), "--n-boot", "100",
                 "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "AUC" in text and "DeLong" in text
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["metrics"]) >= {"ACC", "SEN", "SPE", "F1_weighted", "AUC", "AUC_CI"}
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "± " in (out / "summary.md").read_text() or "| " in (out / "summary.md").read_text()
    # existing run folder: refused with a one-line error (exit 2)
    assert main(["train", str(patches), "--out", str(run), "--arch", "lnmeta_cnn_small"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_bad_cli_input(labelled, capsys, tmp_path):
    tmp, slide, geo = labelled
    assert main(["make-patches", "--slide", str(slide), "--slide", str(slide), "--labels",
                 str(geo), "--out", str(tmp_path / "x.npz")]) == 2
    assert "one --labels per --slide" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")]) == 2
    assert "no such patch-set file" in capsys.readouterr().err
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert main(["evaluate", str(pt), str(tmp_path / "missing.npz")]) == 2
