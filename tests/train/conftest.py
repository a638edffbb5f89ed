"""Real patches for the training tests: CAMELYON16 tumor_001 (7.776 µm/px) + its expert polygons."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def t001(shared_data):
    """(slide, tissue mask, polygons on the slide) — computed once per session."""
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.annotations import read_camelyon_json
    from napari_lnmeta.io.slide import open_slide

    d = shared_data / "camelyon16_tumor001_lowres"
    slide = open_slide(d / "tumor_001_level5.ome.tif")
    tissue = tissue_mask(slide, target_mpp=31.0)
    polys = read_camelyon_json(d / "Tumor_001.json", scale=1 / 32)
    return slide, tissue, polys


@pytest.fixture(scope="session")
def t001_patches(t001):
    """Balanced 32-px patch set (stride 16), pixels in memory."""
    from napari_lnmeta.progress import run
    from napari_lnmeta.train.datasets import PatchConfig, patches_from_slide_job

    slide, tissue, polys = t001
    cfg = PatchConfig(patch_size=32, stride=16, seed=0)
    ps = run(patches_from_slide_job(slide, polys, cfg, tissue=tissue))
    ps.load_pixels()
    return ps
