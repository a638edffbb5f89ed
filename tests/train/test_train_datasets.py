"""Patch sets from real slides + labels: seed-000 rule, balance, splits, mixing, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from napari_lnmeta.errors import InputError, SlideError
from napari_lnmeta.io.annotations import LabelMask, Polygon
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.progress import run
from napari_lnmeta.train.datasets import (
    BatchLoader,
    PatchConfig,
    PatchSet,
    epoch_indices,
    mix,
    patches_from_slide_job,
    split_by_region,
    split_by_slide,
)


def test_seed000_rule_and_balance(t001, t001_patches):
    slide, _, polys = t001
    ps = t001_patches
    counts = ps.counts()
    assert counts[1] > 20 and counts[0] == counts[1]  # negatives subsampled to balance
    assert np.all(ps.fractions[ps.labels == 1] > 0.2)
    assert np.all(ps.fractions[ps.labels == 0] == 0)
    cand = ps.meta["candidates"]
    assert cand["negative"] > 10 * cand["positive"] and cand["excluded"] > 0
    # positives lie on the annotated metastasis (level-0 rows 3831-4206 at this level)
    pos = ps.coords[ps.labels == 1]
    assert pos[:, 0].min() >= 3831 - 32 and pos[:, 0].max() <= 4206
    # patches are read on the fly and equal the slide's pixels
    k = int(np.flatnonzero(ps.labels == 1)[0])
    np.testing.assert_array_equal(ps.read([k])[0],
                                  slide.read_region(tuple(ps.coords[k]), (32, 32)))


def test_reading_paths_agree_and_save_load(t001_patches, tmp_path):
    ps = t001_patches
    fresh = PatchSet.load(ps.save(tmp_path / "p.npz"))
    idx = np.arange(0, len(ps), 7)
    a = fresh.read(idx)
    np.testing.assert_array_equal(a, fresh.read_blocked(idx))
    np.testing.assert_array_equal(a, ps.read(idx))  # ps holds pixels in memory
    from napari_lnmeta.train.datasets import cache_patches_job

    run(cache_patches_job(fresh.subset(idx), tmp_path / "c.zarr"))
    sub = fresh.subset(idx)
    sub.attach_cache(tmp_path / "c.zarr")
    np.testing.assert_array_equal(sub.read(np.arange(len(sub))), a)
    with pytest.raises(InputError, match="another patch set"):
        fresh.attach_cache(tmp_path / "c.zarr")


def test_split_by_region_has_no_shared_pixels(t001_patches):
    ps = t001_patches
    train, test = split_by_region(ps, (4050, 0, 7168, 3072), margin=16)
    assert len(train) + len(test) < len(ps) and test.counts()[1] > 0 and train.counts()[1] > 0
    assert train.coords[:, 0].max() + 32 <= 4050 - 16 or np.all(
        (train.coords[:, 0] + 32 <= 4034) | (train.coords[:, 0] >= 7168))
    assert test.coords[:, 0].min() >= 4050
    with pytest.raises(InputError, match="at least 2 slides"):
        split_by_slide(ps)
    with pytest.raises(InputError, match="row1 > row0"):
        split_by_region(ps, (10, 10, 5, 20))


def test_mixing_by_source_and_samplers(t001_patches):
    a = t001_patches.subset(np.arange(0, len(t001_patches), 2))
    b = t001_patches.subset(np.arange(1, len(t001_patches), 2))
    for e in b.slides:
        e.source = "camelyon16"
    b = PatchSet(b.slides, b.slide_index, b.coords, b.labels, b.fractions, b.classes)
    a.slides[0] = type(a.slides[0])(**{**a.slides[0].__dict__, "source": "local"})
    mixed = mix({"local": a, "camelyon16": b}, {"local": 0.5, "camelyon16": 0.5}, total=40)
    src = mixed.sources()
    assert len(mixed) == 40 and (src == "local").sum() == 20
    rng = np.random.default_rng(0)
    bal = epoch_indices(t001_patches, sampler="balanced", rng=rng, epoch_size=100)
    assert len(bal) == 100 and abs(np.bincount(t001_patches.labels[bal])[0] - 50) == 0
    batches = list(BatchLoader(t001_patches, 16, sampler="shuffle", workers=2))
    assert sum(len(y) for _, y in batches) == len(t001_patches)
    assert batches[0][0].shape[1:] == (32, 32, 3) and batches[0][0].dtype == np.uint8


def test_fibrosis_and_multiclass_labels(t001):
    slide, tissue, polys = t001
    # the larger metastasis relabelled as lymphoma: a 3-class task
    relab = [Polygon(p.vertices, "lymphoma" if i == 1 else "breast metastasis")
             for i, p in enumerate(polys)]
    cfg = PatchConfig(patch_size=32, stride=16, classes=["negative", "breast metastasis",
                                                          "lymphoma"])
    ps = run(patches_from_slide_job(slide, relab, cfg, tissue=tissue))
    assert all(c > 0 for c in ps.counts())
    # fibrosis: ignored (negative) by default, tumour with fibrosis_as_tumour
    fib = [Polygon(polys[1].vertices, "fibrosis")]
    cfg = PatchConfig(patch_size=32, stride=16, fibrosis_as_tumour=True)
    assert run(patches_from_slide_job(slide, fib, cfg, tissue=tissue)).counts()[1] > 0
    with pytest.raises(InputError, match="no pixel is labelled as tumour"):
        run(patches_from_slide_job(slide, fib, PatchConfig(patch_size=32, stride=16),
                                   tissue=tissue))


def test_bad_inputs_have_clear_messages(t001, pyramid_factory):
    slide, tissue, polys = t001
    cfg = PatchConfig(patch_size=32, stride=16)
    frame = SlideFrame(downsample=16.0, slide_mpp=slide.mpp)
    empty = LabelMask(np.zeros((448, 192), np.uint8), frame, {1: "tumour"}, source="Labels")
    with pytest.raises(InputError, match="Labels: the label layer is empty"):
        run(patches_from_slide_job(slide, empty, cfg, tissue=tissue))
    off = np.zeros((448, 192), np.uint8)
    off[5:15, 5:15] = 1  # glass in the top-left corner
    with pytest.raises(InputError, match="do not overlap the tissue"):
        run(patches_from_slide_job(slide, LabelMask(off, frame, {1: "tumour"}, "Labels"), cfg,
                                   tissue=tissue))
    with pytest.raises(InputError, match=r"shape 100x50 does not match"):
        run(patches_from_slide_job(slide, LabelMask(np.ones((100, 50), np.uint8), frame,
                                                    {1: "tumour"}, "Labels"), cfg, tissue=tissue))
    three = PatchConfig(patch_size=32, stride=16, classes=["normal", "tumour", "lymphoma"])
    from napari_lnmeta.train.datasets import build_patchset_job

    with pytest.raises(InputError, match="no patches of class 'lymphoma'"):
        run(build_patchset_job([(slide, polys)], three))
    with pytest.raises(InputError, match="not one of the classes"):
        run(patches_from_slide_job(slide, [Polygon(polys[0].vertices, "necrosis")], cfg,
                                   tissue=tissue))
    # a slide without µm/px
    rng = np.random.default_rng(0)
    img = rng.integers(100, 200, (256, 256, 3), dtype=np.uint8)
    path = pyramid_factory(img, name="nompp.tif", mpp=None, ome=False, levels=1)
    with pytest.warns(UserWarning), pytest.raises(SlideError, match=r"µm/px\) is unknown"):
        run(patches_from_slide_job(path, [Polygon([[10, 10], [10, 90], [90, 90]])], cfg))
