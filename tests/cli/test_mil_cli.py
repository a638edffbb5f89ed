"""``lnmeta extract-features``, ``lnmeta train-mil`` and ``lnmeta mil``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._mil_helpers import BACKBONE, PATCH, crop_features

from napari_lnmeta.cli import main
from napari_lnmeta.core.features import FeatureCache, extract_features_job
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.extractor import load_extractor
from napari_lnmeta.progress import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_extract_features_reuses_the_cache(tmp_path, capsys):
    path, cache_dir, cache = crop_features()
    args = ["extract-features", str(path), "--backbone", BACKBONE, "--patch-size", str(PATCH),
            "--stride", "16", "--device", "cpu", "--cache-dir", str(cache_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(cache.path) in out and f"{len(cache)} patches x 192" in out
    assert main(["extract-features", str(path), "--cache-dir", str(cache_dir), "-o",
                 str(tmp_path / "x.features.zarr")]) == 2
    assert "give --cache-dir DIR or -o" in capsys.readouterr().err


def test_train_mil_then_mil(tmp_path, capsys):
    path, _, cache = crop_features()
    slide = open_slide(path)
    ext = load_extractor(BACKBONE, patch_size=PATCH, seed=0)
    grid = cache.grid
    rng = np.random.default_rng(0)
    lines = ["slide,features,label,age,ER"]
    for k in range(8):  # 8 small "slides" of 24 patches each, cut from the crop
        sub = grid.subset(np.sort(rng.choice(len(grid), 24, replace=False)))
        c = run(extract_features_job(slide, sub, tmp_path / f"s{k}.features.zarr", extractor=ext,
                                     device="cpu"))
        lines.append(f"s{k},{c.path.name},{['N0', 'N+'][k % 2]},{40 + k},"
                     f"{['positive', 'negative'][k % 3 > 0]}")
    table = tmp_path / "cohort.csv"
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train-mil", str(table), "-o", str(out), "--epochs", "2", "--bag-size", "8",
                 "--bags", "2", "--embed-dim", "16", "--attn-dim", "8", "--numeric", "age",
                 "--categorical", "ER", "--test-fraction", "0.25", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "best.safetensors" in text and "test: n=2" in text
    model = out / "best.safetensors"
    # predict the crop slide with its clinical row
    clin = tmp_path / "clinical.csv"
    clin.write_text(f"slide,age,ER\n{slide.name},51,negative\n")
    res = tmp_path / "pred"
    assert main(["mil", str(path), "-o", str(res), "--model", str(model), "--clinical", str(clin),
                 "--features", str(cache.path), "--bags", "4", "--device", "cpu"]) == 0
    s = json.loads((res / "summary.json").read_text())
    assert s["clinical"] == {"age": "51", "ER": "negative"} and s["clinical_used"]
    assert (res / "attention.ome.zarr").is_dir()
    assert FeatureCache(cache.path).complete
    assert s["features_standardised"] and s["notes"] == []
    # the model holds the training slides' feature statistics (no preprocessing here)
    from napari_lnmeta.models.mil import load_mil

    net, info = load_mil(model)
    split = dict(line.split(",")[::3] for line in
                 (out / "splits.csv").read_text().splitlines()[1:])
    train = np.concatenate([FeatureCache(tmp_path / f"s{k}.features.zarr").load()
                            for k in range(8) if split[f"s{k}"] == "train"])
    np.testing.assert_allclose(net.feature_mean.numpy(), train.mean(0), rtol=1e-4, atol=1e-5)
    sd = train.std(0)
    assert (sd == 0).any()  # dead ReLU dimensions of the random backbone: only centred
    np.testing.assert_allclose(net.feature_std.numpy(), np.where(sd > 1e-6, sd, 1.0),
                               rtol=1e-3, atol=1e-5)
    assert info.extra["feature_standardisation"]["slides"] == list(split.values()).count("train")
    # a model file of an older version (no statistics) still predicts, and says so
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model), "pt") as f:
        md = f.metadata()
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names if not k.startswith("feature_")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=md)
    capsys.readouterr()
    assert main(["mil", str(path), "-o", str(tmp_path / "old"), "--model", str(old),
                 "--clinical", str(clin), "--features", str(cache.path), "--bags", "4",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "without feature statistics" in err
    s_old = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert not s_old["features_standardised"] and "without feature statistics" in s_old["notes"][0]
    # bad clinical values: one line, exit 2
    capsys.readouterr()
    clin.write_text(f"slide,age,ER\n{slide.name},51,unknown\n")
    assert main(["mil", str(path), "-o", str(tmp_path / "bad"), "--model", str(model),
                 "--clinical", str(clin), "--features", str(cache.path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ER='unknown' was not seen in training" in err[0]
    assert str(clin) in err[0]
    # a slide with fewer patches than N
    clin.write_text(f"slide,age,ER\n{slide.name},51,negative\n")
    assert main(["mil", str(path), "-o", str(tmp_path / "big"), "--model", str(model),
                 "--clinical", str(tmp_path / "clinical.csv"), "--features", str(cache.path),
                 "--bag-size", "100000", "--device", "cpu"]) == 2
    assert "fewer than the 100000 patches per bag" in capsys.readouterr().err
