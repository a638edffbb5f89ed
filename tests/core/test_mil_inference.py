"""Slide-level MIL inference: probabilities, the attention heatmap on its patches, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._mil_helpers import crop_features, random_mil_file

from napari_lnmeta.core.mil import (
    MILInferenceConfig,
    MILResult,
    extractor_for,
    predict_slide_job,
    predict_slides_job,
)
from napari_lnmeta.core.tiling import make_grid
from napari_lnmeta.errors import InputError, ModelError, OutputExistsError
from napari_lnmeta.io.frame import layer_transform
from napari_lnmeta.io.omezarr import read_ome_zarr
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.clinical import ClinicalEncoder, clinical_row
from napari_lnmeta.models.extractor import BackboneInfo
from napari_lnmeta.progress import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cell_centres_um(frame, index):
    t = layer_transform(frame)
    return np.asarray(t["translate"]) + np.asarray(index) * np.asarray(t["scale"])


def test_prediction_writes_aligned_attention_and_summary(tmp_path):
    path, cache_dir, cache = crop_features()
    slide = open_slide(path)
    model = random_mil_file(tmp_path / "mil.safetensors", cache.backbone)
    cfg = MILInferenceConfig(bags=8, device="cpu", cache_dir=str(cache_dir), top_k=5)
    res = run(predict_slide_job(slide, model, config=cfg, out_dir=tmp_path / "out"))
    # features were found in the cache folder (same backbone and grid settings)
    assert res.features_path == str(cache.path)
    assert res.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(res.probabilities, res.bag_probabilities.mean(0), rtol=1e-6)
    assert len(res.bag_probabilities) == 8 and res.bag_size == 8
    assert res.attention.max() == pytest.approx(1.0) and (res.attention > 0).all()
    # the written heatmap: every patch's value sits in the cell on that patch
    written = read_ome_zarr(tmp_path / "out" / "attention.ome.zarr")
    heat = np.asarray(written.data)
    grid = res.grid
    assert written.frame == grid.frame() and heat.shape == grid.grid_shape
    np.testing.assert_allclose(heat[grid.index[:, 0], grid.index[:, 1]], res.patch_attention)
    off = np.ones(grid.grid_shape, bool)
    off[grid.index[:, 0], grid.index[:, 1]] = False
    assert (heat[off] == 0).all()
    mpp = slide.mpp
    centres_um = (grid.coords + (grid.size0 - 1) / 2) * mpp  # slide layer: pixel k at k * mpp
    np.testing.assert_allclose(_cell_centres_um(written.frame, grid.index), centres_um, atol=1e-9)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(s["probabilities"]) == {"N0", "N+"} and s["predicted"] in ("N0", "N+")
    assert s["backbone"] == cache.backbone.id and s["n_patches"] == len(grid)
    top = s["top_patches"]
    assert len(top) == 5 and top[0]["attention"] == pytest.approx(1.0)
    assert [t["attention"] for t in top] == sorted((t["attention"] for t in top), reverse=True)
    k = res.top(1)[0]
    assert (top[0]["row"], top[0]["col"]) == tuple(int(v) for v in grid.coords[k])
    # the same seed gives the same numbers; an existing result is not overwritten
    with pytest.raises(OutputExistsError):
        run(predict_slide_job(slide, model, config=cfg, out_dir=tmp_path / "out"))
    again = run(predict_slide_job(slide, model, config=cfg, features=cache.path))
    np.testing.assert_allclose(again.probabilities, res.probabilities, rtol=1e-6)


def test_several_slides_in_one_job(tmp_path):
    path, cache_dir, cache = crop_features()
    model = random_mil_file(tmp_path / "mil.safetensors", cache.backbone)
    cfg = MILInferenceConfig(bags=4, device="cpu", cache_dir=str(cache_dir), top_k=3)
    slides = [open_slide(path), open_slide(path)]
    steps = []
    done = run(predict_slides_job(slides, model, config=cfg, names=["a", "b"],
                                  out_dir=tmp_path / "out", overwrite=True), steps.append)
    assert len(done) == 2
    one = run(predict_slide_job(slides[0], model, config=cfg))
    for res, patches in done:
        np.testing.assert_allclose(res.probabilities, one.probabilities, rtol=1e-6)
        assert patches.shape[0] == 3 and patches.shape[-1] == 3
    # each slide's steps are labelled with its place and name
    msgs = [p.message for p in steps]
    assert any(m.startswith("[1/2] a: ") for m in msgs)
    assert any(m.startswith("[2/2] b: ") for m in msgs)
    stem = path.name.split(".")[0]
    assert (tmp_path / "out" / f"{stem}.mil" / "summary.json").is_file()
    with pytest.raises(ValueError):
        run(predict_slides_job(slides, model, config=cfg, clinical=[None]))


def test_heatmap_cells_sit_on_overlapping_patches():
    """With stride < patch, a cell is centred on the centre of its patch."""
    path, _, _ = crop_features()
    slide = open_slide(path)
    grid = make_grid(slide, patch_size=16, stride=8)
    att = np.random.default_rng(0).random(len(grid)).astype(np.float32)
    res = MILResult(slide=slide.name, classes=["N0", "N+"], probabilities=np.array([0.5, 0.5]),
                    bag_probabilities=np.full((1, 2), 0.5), attention=att, attention_logits=att,
                    grid=grid, instances=np.arange(len(grid)), backbone="x", bag_size=1)
    heat = res.heatmap
    np.testing.assert_array_equal(heat[grid.index[:, 0], grid.index[:, 1]], att)
    centres_um = (grid.coords + (grid.size0 - 1) / 2) * slide.mpp
    np.testing.assert_allclose(_cell_centres_um(res.frame, grid.index), centres_um, atol=1e-9)


def test_bad_inputs(tmp_path):
    path, cache_dir, cache = crop_features()
    slide = open_slide(path)
    cfg = MILInferenceConfig(bags=4, device="cpu", cache_dir=str(cache_dir))
    # features of another backbone
    other = BackboneInfo(name="lnmeta_cnn_small", weights="random-seed3-00000000",
                         feature_dim=192, patch_size=16)
    m_other = random_mil_file(tmp_path / "other.safetensors", other)
    with pytest.raises(ModelError, match="features come from backbone"):
        run(predict_slide_job(slide, m_other, config=cfg, features=cache.path))
    # a slide with fewer patches than N: say so; with replacement it works
    m_big = random_mil_file(tmp_path / "big.safetensors", cache.backbone, bag_size=100_000)
    with pytest.raises(InputError, match=r"only \d+ patches, fewer than the 100000"):
        run(predict_slide_job(slide, m_big, config=cfg))
    res = run(predict_slide_job(slide, m_big, config=MILInferenceConfig(
        bags=2, device="cpu", cache_dir=str(cache_dir), replace=True, bag_size=64)))
    assert res.bag_size == 64
    # clinical models need complete, known values
    enc = ClinicalEncoder.fit([{"age": "40", "ER": "positive"}, {"age": "70", "ER": "negative"}],
                              numeric=["age"], categorical=["ER"])
    m_clin = random_mil_file(tmp_path / "clin.safetensors", cache.backbone, clinical=enc)
    with pytest.raises(InputError, match="fuses clinical data: give the slide's values for age, ER"):
        run(predict_slide_job(slide, m_clin, config=cfg))
    csv = tmp_path / "clinical.csv"
    csv.write_text(f"slide,age,ER\n{slide.name},55,weak\nother.tif,,positive\n")
    with pytest.raises(InputError, match=r"ER='weak' was not seen in training"):
        run(predict_slide_job(slide, m_clin, config=cfg, clinical=clinical_row(csv, slide.name)))
    with pytest.raises(InputError, match="'age' is empty/missing"):
        run(predict_slide_job(slide, m_clin, config=cfg,
                              clinical=clinical_row(csv, "other.tif")))
    ok = run(predict_slide_job(slide, m_clin, config=cfg, clinical={"age": 55, "ER": "negative"}))
    assert ok.clinical_used
    # a random backbone is rebuilt exactly (same weights digest) for new slides
    assert extractor_for(cache.backbone)[1].id == cache.backbone.id



def test_read_resolution_of_older_files_is_patch_mpp(tmp_path):
    """A MIL model whose ``features`` metadata says ``mpp`` (as written before the key was
    ``patch_mpp``) reads its patches at that µm/px; so does a saved InferenceConfig."""
    import torch

    from napari_lnmeta.core.inference import InferenceConfig
    from napari_lnmeta.core.mil import feature_config_for
    from napari_lnmeta.models.mil import MILConfig, MILInfo, MILModel, read_mil_info, save_mil

    bb = BackboneInfo(name="lnmeta_cnn_small", weights="random", feature_dim=8, patch_size=16)
    cfg = MILConfig(feature_dim=8, n_classes=2, embed_dim=8, attn_dim=4)
    torch.manual_seed(0)
    for key, value in (("mpp", 2.0), ("patch_mpp", 3.0)):
        info = MILInfo(config=cfg, classes=["N0", "N+"], backbone=bb, clinical=None,
                       features={"stride": 16, key: value, "min_tissue": 0.4})
        path = save_mil(tmp_path / f"{key}.safetensors", MILModel(cfg), info)
        fc = feature_config_for(read_mil_info(path), MILInferenceConfig(device="cpu"))
        assert (fc.patch_mpp, fc.stride, fc.min_tissue, fc.level) == (value, 16, 0.4, None)
    old = InferenceConfig.from_json({"mpp": 0.5, "stride": 64})
    assert (old.patch_mpp, old.stride) == (0.5, 64)
    assert InferenceConfig.from_json(InferenceConfig(patch_mpp=1.0).to_json()).patch_mpp == 1.0
