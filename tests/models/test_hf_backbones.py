"""Hugging Face transformers encoders by name (Phikon: ViTModel, Phikon-v2: Dinov2Model)
from locally built Hub caches, with networking off: feature extraction through the CLI
equals the bare transformers forward (class token of last_hidden_state)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._backbone_helpers import (
    PHIKON_PREPROCESSOR,
    hf_transformers_repo,
    tiny_transformers,
)

from napari_lnmeta.cli import main
from napari_lnmeta.errors import ModelError
from napari_lnmeta.models import backbones as bb

pytestmark = pytest.mark.usefixtures("one_torch_thread", "_no_network")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def _bare_cls(model, slide_path, cache, mean, std, n=4):
    """The class tokens of the cached patches by the bare transformers forward."""
    import torch

    from napari_lnmeta.core.tiling import read_patches
    from napari_lnmeta.io.slide import open_slide

    idx = np.arange(min(n, len(cache)))
    x = torch.from_numpy(read_patches(open_slide(slide_path), cache.grid, idx))
    x = x.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model.eval()
    with torch.inference_mode():
        return idx, model(pixel_values=x).last_hidden_state[:, 0].numpy()


def test_phikon_by_name_through_extract_features(caches, cmu1, tmp_path, capsys):
    from napari_lnmeta.core.features import FeatureCache
    from napari_lnmeta.core.mil import extractor_for
    from napari_lnmeta.models.registry import build_model

    out = tmp_path / "cmu1.features.zarr"
    args = ["extract-features", str(cmu1), "--backbone", "phikon", "--stride", "448",
            "--device", "cpu", "-o", str(out)]
    # an empty cache: one line naming the repository, the files and where they go
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "owkin/phikon" in err and "preprocessor_config.json" in err
    assert str(caches / "hf" / "hub" / "models--owkin--phikon") in err
    assert not out.exists()

    vit = tiny_transformers("vit", seed=2)
    hf_transformers_repo(caches / "hf", "owkin/phikon", vit, preprocessor=PHIKON_PREPROCESSOR)
    assert main(args) == 0
    line = capsys.readouterr().out
    cache = FeatureCache(out)
    b = cache.backbone
    assert b.source == "hf-hub:owkin/phikon" and b.name == "transformers:vit"
    assert b.id in line and b.weights.startswith("sha256:")
    assert b.patch_size == 224 and b.mpp == 0.5 and cache.dim == 64 and len(cache) > 3
    assert b.mean == pytest.approx([0.485, 0.456, 0.406])
    idx, want = _bare_cls(vit, cmu1, cache, b.mean, b.std)
    np.testing.assert_allclose(cache.load(idx), want, rtol=1e-3, atol=1e-4)
    # a MIL model on these features rebuilds the same extractor by name
    _, info = extractor_for(b)
    assert info.id == b.id
    # listed as cached; not an initialisation of a patch classifier
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["phikon"]["cached"] and rows["phikon"]["loader"] == "transformers"
    assert not rows["phikon-v2"]["cached"] and not rows["conch"]["cached"]
    assert rows["phikon"]["use"] == "features" and not rows["conch"]["loadable"]
    assert main(["models", "list"]) == 0
    text = capsys.readouterr().out
    assert "[transformers: feature extraction only]" in text and "'conch' package" in text
    with pytest.raises(ModelError, match="feature extractor"):
        build_model("resnet18", 2, init="phikon")


def test_phikon_v2_dinov2_from_a_bin_with_its_own_preprocessing(caches, cmu1, tmp_path):
    from napari_lnmeta.core.features import FeatureCache

    dino = tiny_transformers("dinov2", seed=4)
    # a BitImageProcessor-style config: resize shortest edge, then centre crop 224
    pre = {"do_center_crop": True, "crop_size": {"height": 224, "width": 224},
           "size": {"shortest_edge": 256}, "do_normalize": True, "do_rescale": True,
           "image_mean": [0.7, 0.6, 0.5], "image_std": [0.2, 0.25, 0.3],
           "image_processor_type": "BitImageProcessor"}
    # the base model's prefix, as a checkpoint saved from a task model carries it
    hf_transformers_repo(caches / "hf", "owkin/phikon-v2", dino, preprocessor=pre,
                         weights="pytorch_model.bin", prefix="dinov2.")
    src = bb.resolve("hf-hub:owkin/phikon-v2")
    assert src.weights_file.name == "pytorch_model.bin" and src.input_size == 224
    out = tmp_path / "v2.features.zarr"
    assert main(["extract-features", str(cmu1), "--backbone", "phikon-v2", "--stride", "448",
                 "--device", "cpu", "-o", str(out)]) == 0
    cache = FeatureCache(out)
    b = cache.backbone
    assert b.name == "transformers:dinov2" and b.mean == pytest.approx([0.7, 0.6, 0.5])
    idx, want = _bare_cls(dino, cmu1, cache, [0.7, 0.6, 0.5], [0.2, 0.25, 0.3])
    np.testing.assert_allclose(cache.load(idx), want, rtol=1e-3, atol=1e-4)


def test_transformers_weights_need_no_full_unpickle_and_fit_the_config(caches, tmp_path):
    import torch

    from napari_lnmeta.models.extractor import load_extractor

    vit = tiny_transformers("vit")
    repo = hf_transformers_repo(caches / "hf", "owkin/phikon", vit,
                                preprocessor=PHIKON_PREPROCESSOR, weights="pytorch_model.bin")
    blob = (repo / "snapshots").rglob("pytorch_model.bin").__next__().resolve()
    sd = torch.load(blob, weights_only=True)
    torch.save({**sd, "_evil": bb.Known}, blob)  # needs a full unpickle
    with pytest.raises(ModelError, match="weights_only=True"):
        load_extractor("phikon")
    # a local folder in the transformers layout, with weights of another width
    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "config.json").write_text(vit.config.to_json_string())
    from safetensors.torch import save_file

    other = tiny_transformers("dinov2")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        bb.resolve(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(PHIKON_PREPROCESSOR))
    with pytest.raises(ModelError, match="lacks|do not fit"):
        load_extractor(str(folder))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()},
              str(folder / "model.safetensors"))
    model, info = load_extractor(str(folder))
    assert info.source == f"local:{folder.resolve()}" and info.feature_dim == 64
