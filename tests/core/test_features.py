"""Per-slide feature caches: content, metadata, reuse, resume, patch-model backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests._mil_helpers import (
    BACKBONE,
    PATCH,
    camelyon_crop,
    crop_features,
    small_patch_model,
)

from napari_lnmeta.core.features import (
    FeatureCache,
    FeatureConfig,
    extract_features_job,
    slide_features_job,
)
from napari_lnmeta.core.tiling import read_patches
from napari_lnmeta.errors import InputError, ModelError
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.extractor import Preprocessor, load_extractor
from napari_lnmeta.progress import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cache_content_and_metadata():
    path, _, cache = crop_features()
    slide = open_slide(path)
    grid = cache.grid
    assert cache.complete and len(cache) == len(grid) > 100 and cache.dim == 192
    assert cache.backbone.name == BACKBONE and cache.backbone.weights.startswith("random-seed0-")
    assert cache.attrs["grid"]["patch_size"] == PATCH and cache.attrs["grid"]["stride"] == 16
    assert cache.attrs["slide_mpp"] == pytest.approx(7.776) and grid.slide == slide.name
    assert grid.frame().downsample == 16 and grid.slide_shape == slide.shape
    feats = cache.load()
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    # row k is the backbone's output for the patch at coords[k]
    model, info = load_extractor(BACKBONE, patch_size=PATCH, seed=0)
    assert info.id == cache.backbone.id
    k = np.array([0, len(grid) // 2, len(grid) - 1])
    with torch.inference_mode():
        ref = model(Preprocessor(info, "cpu")(read_patches(slide, grid, k))).numpy()
    np.testing.assert_allclose(cache.load(k[::-1]), ref[::-1], rtol=1e-4, atol=1e-5)


def test_cache_is_reused_without_reading_pixels(monkeypatch):
    path, cache_dir, cache = crop_features()
    import napari_lnmeta.core.tiling as tiling
    import napari_lnmeta.core.tissue as tissue

    def boom(*a, **k):
        raise AssertionError("pixels were read for a cached slide")

    monkeypatch.setattr(tissue, "tissue_mask", boom)
    monkeypatch.setattr(tiling, "read_patches", boom)
    cfg = FeatureConfig(backbone=BACKBONE, patch_size=PATCH, stride=16, device="cpu")
    msgs = []
    again = run(slide_features_job(open_slide(path), cfg, cache_dir=cache_dir),
                lambda p: msgs.append(p.message))
    assert again.path == cache.path and msgs == ["features cached"]


def test_resume_after_cancel_gives_the_same_features(tmp_path):
    path, _, cache = crop_features()
    slide = open_slide(path)
    grid = cache.grid.subset(np.arange(200))
    ext = load_extractor(BACKBONE, patch_size=PATCH, seed=0)
    out = tmp_path / "part.features.zarr"
    job = extract_features_job(slide, grid, out, extractor=ext, batch_size=32, chunk=64,
                               device="cpu")
    for p in job:
        if p.done >= 128:
            break
    job.close()  # what Cancel does
    assert not out.exists() and (tmp_path / ".part.features.zarr.partial").is_dir()
    msgs = []
    done = run(extract_features_job(slide, grid, out, extractor=ext, batch_size=32, chunk=64,
                                    device="cpu"), lambda p: msgs.append((p.done, p.message)))
    assert msgs[0] == (128, "features (resumed)")
    assert done.complete and not (tmp_path / ".part.features.zarr.partial").exists()
    np.testing.assert_allclose(done.load(), cache.load(np.arange(200)), rtol=1e-4, atol=1e-5)
    # a store of another backbone is never silently reused or overwritten
    other = load_extractor(BACKBONE, patch_size=PATCH, seed=1)
    with pytest.raises(InputError, match="another backbone"):
        run(extract_features_job(slide, grid, out, extractor=other, device="cpu"))


def test_patch_model_file_gives_penultimate_features(tmp_path):
    model_file = small_patch_model(tmp_path / "patch.safetensors")
    model, info = load_extractor(model_file)
    assert info.name == BACKBONE and info.feature_dim == 192 and info.patch_size == PATCH
    assert info.mpp == pytest.approx(7.776) and info.weights.startswith("sha256:")
    assert model(torch.zeros(2, 3, PATCH, PATCH)).shape == (2, 192)
    # a MIL model is not a backbone
    from tests._mil_helpers import random_mil_file

    mil = random_mil_file(tmp_path / "mil.safetensors", info)
    with pytest.raises(ModelError, match="is a MIL model"):
        load_extractor(mil)


def test_bad_inputs(tmp_path):
    path, _ = camelyon_crop()
    with pytest.raises(ModelError, match="unknown architecture"):
        load_extractor("resnet7")
    with pytest.raises(ModelError, match="too small"):
        load_extractor("resnet18", patch_size=16)
    with pytest.raises(InputError, match="not a napari-lnmeta feature cache|not a feature cache"):
        FeatureCache(tmp_path)
    cfg = FeatureConfig(backbone=BACKBONE, patch_size=PATCH, min_tissue=1.0, entropy_min=8.0,
                        device="cpu")
    with pytest.raises(InputError, match="no patch passed"):
        run(slide_features_job(open_slide(path), cfg, out=tmp_path / "x.features.zarr"))


def test_preprocessor_of_a_stain_normalised_model_carries_its_normaliser():
    from napari_lnmeta.core.features import make_preprocessor
    from napari_lnmeta.core.stain import torch_normaliser
    from napari_lnmeta.models.extractor import BackboneInfo

    info = BackboneInfo(name="resnet18", weights="x", feature_dim=8, patch_size=16,
                        normalisation={"method": "macenko"})
    with pytest.raises(ValueError, match="stain normalisation"):
        Preprocessor(info, "cpu")
    rng = np.random.default_rng(0)
    patches = rng.integers(60, 230, (2, 16, 16, 3), dtype=np.uint8)
    got = make_preprocessor(info, "cpu")(patches)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    want = (torch_normaliser({"method": "macenko"}, device="cpu")(x) - mean) / std
    torch.testing.assert_close(got, want)
    plain = make_preprocessor(BackboneInfo(name="resnet18", weights="x", feature_dim=8), "cpu")
    assert plain.stain is None
