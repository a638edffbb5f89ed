"""ViT backbones in the engine at 224 px on CPU: MIL feature extraction with a cached
foundation-model layout, training from it and patch inference with the trained ViT."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from tests._backbone_helpers import hf_cache_repo, tiny_vit

from napari_lnmeta.cli import main
from napari_lnmeta.errors import ModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def uni_cache(tmp_path, monkeypatch):
    """A tiny random ViT cached as the Hub caches MahmoodLab/UNI."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    vit, args = tiny_vit(seed=5, init_values=1e-5, dynamic_img_size=True)
    hf_cache_repo(tmp_path / "hf", "MahmoodLab/UNI", vit, architecture="vit_base_patch16_224",
                  model_args=args)
    return vit


def test_extract_features_with_a_cached_vit(uni_cache, cmu1, tmp_path, capsys):
    import torch

    from napari_lnmeta.core.features import FeatureCache
    from napari_lnmeta.core.mil import extractor_for
    from napari_lnmeta.core.tiling import read_patches
    from napari_lnmeta.io.slide import open_slide

    out = tmp_path / "cmu1.features.zarr"
    assert main(["extract-features", str(cmu1), "--backbone", "uni", "--stride", "448",
                 "--device", "cpu", "--batch-size", "0", "-o", str(out)]) == 0
    line = capsys.readouterr().out
    cache = FeatureCache(out)
    b = cache.backbone
    # provenance: backbone id (with the weights hash), its source name, its preprocessing
    assert b.source == "hf-hub:MahmoodLab/UNI" and b.weights.startswith("sha256:")
    assert b.id in line and b.patch_size == 224 and b.mpp == 0.5
    assert cache.dim == 64 and len(cache) > 3
    # the stored features are the ViT's class tokens of the patches read at 0.5 µm/px
    slide = open_slide(cmu1)
    grid = cache.grid
    idx = np.arange(min(4, len(cache)))
    x = torch.from_numpy(read_patches(slide, grid, idx)).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.5
    uni_cache.eval()
    with torch.inference_mode():
        want = uni_cache(x).numpy()
    np.testing.assert_allclose(cache.load(idx), want, rtol=1e-3, atol=1e-4)
    # a MIL model trained on these features rebuilds the same extractor by name
    _, info = extractor_for(b)
    assert info.id == b.id
    # features of the same backbone at another input size are never mixed
    other = {**b.to_json(), "patch_size": 256}
    with pytest.raises(ModelError, match="input size"):
        cache.check_backbone(other)


def test_train_from_a_cached_vit_then_predict(uni_cache, cmu1, shared_data, tmp_path, capsys):
    from napari_lnmeta.models.io import read_meta

    root = shared_data / "lc25000_lung_224"
    rows = list(csv.DictReader((root / "labels.csv").read_text().splitlines()))
    groups = ["lung_n_g071", "lung_n_g173", "lung_aca_g108", "lung_aca_g158"]
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "slide"])
        for g in groups:
            for r in [r for r in rows if r["group"] == g][:3]:
                w.writerow([root / r["path"], r["label"], g])
    ps = tmp_path / "lc224.npz"
    assert main(["import-patches", str(table), "--classes", "normal,tumour", "--mpp", "1.0",
                 "--out", str(ps)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(ps), "--init", "uni", "--normalise", "pretrained", "--freeze",
                 "1", "--epochs", "1", "--batch-size", "4", "--max-steps", "2",
                 "--device", "cpu", "--workers", "1", "--out", str(run)]) == 0
    assert "init: hf-hub:MahmoodLab/UNI (sha256 " in capsys.readouterr().out
    meta = read_meta(run / "last.safetensors")
    assert meta.architecture.startswith("timm:vit_base_patch16_224{")
    assert meta.extra["init"]["id"] == "hf-hub:MahmoodLab/UNI"
    assert meta.mean == pytest.approx([0.5, 0.5, 0.5]) and meta.patch_size == 224
    out = tmp_path / "pred"
    assert main(["predict", str(cmu1), "-o", str(out), "--model", str(run / "last.safetensors"),
                 "--device", "cpu", "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["patches"] > 0 and 0.0 <= summary["score"]["max"] <= 1.0
    assert summary["model"]["init"]["id"] == "hf-hub:MahmoodLab/UNI"
    assert summary["model"]["init"]["weights_sha256"] == meta.extra["init"]["weights_sha256"]
