"""Patch grids: geometry, filters (tissue, entropy, ROI CSV, masks, polygons), I/O."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_lnmeta.core.tiling import (
    PatchGrid,
    grey_entropy,
    make_grid,
    make_grid_job,
    read_patches,
)
from napari_lnmeta.core.tissue import TissueMask
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.annotations import read_roi_csv
from napari_lnmeta.io.frame import SlideFrame, layer_transform
from napari_lnmeta.io.slide import MppWarning, open_slide
from napari_lnmeta.progress import Progress


def _open(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return open_slide(path, **kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 1024x1536 3-level pyramid (0.5 µm/px): tissue on the left half, white on the right."""
    from tests.conftest import write_pyramid_tiff

    rng = np.random.default_rng(0)
    img = np.full((1024, 1536, 3), 255, np.uint8)
    tissue = rng.integers(0, 256, (1024, 768, 3)).astype(np.float32)
    img[:, :768] = (tissue * np.array([0.6, 0.3, 0.5]) + np.array([80, 40, 90])).astype(np.uint8)
    path = tmp_path_factory.mktemp("grid") / "half.ome.tif"
    write_pyramid_tiff(path, img, levels=3, mpp=0.5, compression=None)
    return path


@pytest.fixture(scope="module")
def half_mask():
    m = np.zeros((64, 96), dtype=bool)  # downsample 16
    m[:, :48] = True
    return TissueMask(mask=m, downsample=16.0, slide_mpp=0.5, threshold=0.1, method="otsu")


def test_geometry_level0(synthetic):
    slide = _open(synthetic)
    g = make_grid(slide, patch_size=256)
    assert g.grid_shape == (4, 6) and len(g) == 24
    assert g.level == 0 and g.mpp == pytest.approx(0.5) and g.downsample == 1.0
    assert g.coords.dtype == np.int64 and g.index.dtype == np.int64
    assert np.array_equal(g.coords, g.index * 256)
    fr = g.frame()
    assert fr.downsample == 256 and fr.origin == (0.0, 0.0) and fr.slide_mpp == 0.5


def test_stride_and_level(synthetic):
    slide = _open(synthetic)
    g = make_grid(slide, patch_size=128, stride=64, level=1)
    assert g.downsample == 2.0 and g.size0 == 256 and g.stride0 == 128
    # last patch may run past the edge (read as white) so the grid covers the slide
    assert g.grid_shape == (7, 11)
    assert np.array_equal(g.coords, g.index * 128)
    # heatmap cells are one stride wide, centred on their patches
    fr = g.frame()
    assert fr.downsample == 128 and fr.origin == (64.0, 64.0)
    p = read_patches(slide, g, [0, 5])
    assert p.shape == (2, 128, 128, 3) and p.dtype == np.uint8
    assert np.array_equal(p[1], slide.read_region(tuple(g.coords[5]), (128, 128), level=1))


def test_read_at_mpp(synthetic):
    slide = _open(synthetic)
    g = make_grid(slide, patch_size=64, mpp=1.0)  # an existing level: no resampling
    assert g.level == 1 and g.mpp == 1.0
    g = make_grid(slide, patch_size=64, mpp=1.5)  # between levels: resampled
    assert g.level is None and g.downsample == pytest.approx(3.0)
    p = read_patches(slide, g, np.arange(3))
    assert p.shape == (3, 64, 64, 3)
    with pytest.raises(InputError, match="finer than level 0"):
        make_grid(slide, patch_size=64, mpp=0.25)
    with pytest.raises(InputError, match="not both"):
        make_grid(slide, mpp=1.0, level=1)


def test_tissue_filter(synthetic, half_mask):
    slide = _open(synthetic)
    g = make_grid(slide, patch_size=128, tissue=half_mask, min_tissue=0.5)
    assert len(g) == 8 * 6  # left half: 6 columns of 128 px
    assert (g.coords[:, 1] < 768).all()
    assert np.allclose(g.tissue, 1.0)
    g2 = make_grid(slide, patch_size=100, tissue=half_mask, min_tissue=0.5)
    # the patch straddling the boundary (700..800) is 68 % tissue: kept
    assert 700 in g2.coords[:, 1]
    for c, f in zip(g2.coords, g2.tissue, strict=True):
        assert f == pytest.approx(half_mask.fraction_in(c[0], c[1], 100, 100), abs=1e-6)


def test_tissue_of_another_slide_is_refused(synthetic):
    other = TissueMask(mask=np.ones((8, 8), bool), downsample=16.0, slide_mpp=0.5,
                       threshold=0.1, method="otsu", slide_shape=(128, 128))
    with pytest.raises(InputError, match="tissue mask was made on a slide of 128x128"):
        make_grid(_open(synthetic), tissue=other)


def test_entropy_filter(synthetic):
    slide = _open(synthetic)
    steps = []
    job = make_grid_job(slide, patch_size=256, entropy_min=4.0, batch_size=5)
    while True:
        try:
            steps.append(next(job))
        except StopIteration as stop:
            g = stop.value
            break
    assert all(isinstance(s, Progress) for s in steps) and steps[-1].done == steps[-1].total
    assert len(g) == 12 and (g.coords[:, 1] < 768).all()  # white patches have entropy 0
    assert (g.entropy >= 4.0).all()


def test_grey_entropy_matches_skimage():
    from skimage.measure import shannon_entropy

    rng = np.random.default_rng(3)
    patch = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    grey = (patch[..., 0] * 0.2125 + patch[..., 1] * 0.7154 + patch[..., 2] * 0.0721
            + 0.5).astype(np.uint8)
    assert grey_entropy(patch) == pytest.approx(shannon_entropy(grey))
    assert grey_entropy(np.full((8, 8, 3), 255, np.uint8)) == 0.0


def test_roi_csv_seed_format(tmp_path, synthetic):
    csv = tmp_path / "rois.csv"
    csv.write_text("patient_id\ttma_id\tstain\txs\tys\txe\tye\n"
                   "17658\tTA255\tHE\t0\t0\t512\t256\n"
                   "17673\tTA255\tHE\t1024\t512\t1536\t1024\n")
    boxes = read_roi_csv(csv)
    assert boxes.tolist() == [[0, 0, 256, 512], [512, 1024, 1024, 1536]]  # (y0, x0, y1, x1)
    g = make_grid(_open(synthetic), patch_size=256, rois=csv)
    assert sorted(map(tuple, g.coords.tolist())) == [(0, 0), (0, 256), (512, 1024), (512, 1280),
                                                     (768, 1024), (768, 1280)]
    plain = tmp_path / "plain.csv"
    plain.write_text("10, 20, 30, 40\n")
    assert read_roi_csv(plain).tolist() == [[20, 10, 40, 30]]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="xs, ys, xe, ye"):
        read_roi_csv(bad)


def test_polygon_and_mask_restriction(synthetic):
    slide = _open(synthetic)
    tri = [np.array([[0, 0], [0, 1536], [1024, 0]], dtype=float)]  # upper-left triangle
    g = make_grid(slide, patch_size=256, mask=tri, min_region=0.99)
    assert len(g) > 0
    assert all(r * 256 + 256 <= 1024 * (1 - (c * 256 + 256) / 1536) + 1 for r, c in g.index)
    arr = np.zeros((4, 6), dtype=bool)
    arr[1:3, 2:4] = True
    g2 = make_grid(slide, patch_size=256, mask=(arr, SlideFrame(downsample=256)))
    assert sorted(map(tuple, g2.index.tolist())) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    g3 = make_grid(slide, patch_size=256, mask=arr)  # a bool array covering the slide
    assert np.array_equal(np.sort(g3.index, axis=0), np.sort(g2.index, axis=0))
    with pytest.raises(InputError, match="mask must be"):
        make_grid(slide, mask="nonsense")


def test_save_load_batches_and_layers(synthetic, half_mask, tmp_path):
    slide = _open(synthetic)
    g = make_grid(slide, patch_size=128, stride=96, tissue=half_mask)
    path = g.save(tmp_path / "g.npz")
    back = PatchGrid.load(path)
    assert np.array_equal(back.coords, g.coords) and np.array_equal(back.index, g.index)
    assert back.meta() == g.meta() and back.frame() == g.frame()
    assert np.allclose(back.tissue, g.tissue)
    with pytest.raises(Exception, match="already exists"):
        g.save(path)
    idx = list(g.batches(7))
    assert sum(len(i) for i in idx) == len(g) and len(idx[-1]) <= 7
    assert np.array_equal(np.concatenate(idx), np.arange(len(g)))
    assert g.points_data().shape == (len(g), 2)
    rect = g.shapes_data()
    assert rect.shape == (len(g), 4, 2)
    assert np.allclose(rect[:, 2] - rect[:, 0], 128)
    heat = g.to_heatmap(np.ones(len(g)))
    assert heat.shape == g.grid_shape and np.nansum(heat) == len(g)
    # a heatmap cell lands on its patch centre in napari world coordinates
    tr = layer_transform(g.frame())
    i, j = g.index[0]
    cell_centre = np.array(tr["translate"]) + np.array(tr["scale"]) * [i, j]
    assert np.allclose(cell_centre, g.centers()[0] * 0.5)
    not_grid = tmp_path / "x.npz"
    np.savez(not_grid, a=np.zeros(2))
    with pytest.raises(InputError, match="not a patch-grid"):
        PatchGrid.load(not_grid)


def test_camelyon_grid(camelyon):
    from napari_lnmeta.core.tissue import tissue_mask

    slide = _open(camelyon / "tumor_001_level5_pyramid.tif", mpp=7.776)
    tm = tissue_mask(slide, target_mpp=15.0)
    assert tm.downsample == 2.0
    g = make_grid(slide, patch_size=64, tissue=tm, min_tissue=0.5)
    assert 100 < len(g) < g.grid_shape[0] * g.grid_shape[1] / 2
    assert (g.tissue >= 0.5).all()
