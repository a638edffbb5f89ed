"""Tissue detection on the shared slides and on bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from napari_lnmeta.core.tissue import (
    TissueMask,
    clean_mask,
    ink_pixels,
    low_res,
    otsu_threshold,
    tissue_mask,
    tissue_mask_from_rgb,
)
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.slide import ImageSlide, MppWarning, open_slide


def _open(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return open_slide(path, **kw)


@pytest.fixture(scope="module")
def camelyon_tissue(camelyon):
    slide = _open(camelyon / "tumor_001_level5.ome.tif")
    return slide, tissue_mask(slide)


@pytest.fixture(scope="module")
def tumour_mask(camelyon):
    return np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0


def _coverage(tm: TissueMask, tumour: np.ndarray) -> float:
    ys, xs = np.nonzero(tumour)
    my = np.minimum((ys / tm.downsample).astype(int), tm.mask.shape[0] - 1)
    mx = np.minimum((xs / tm.downsample).astype(int), tm.mask.shape[1] - 1)
    return float(tm.mask[my, mx].mean())


def test_camelyon_tissue_covers_tumour(camelyon_tissue, tumour_mask):
    slide, tm = camelyon_tissue
    assert tm.mask.dtype == bool and tm.method == "otsu"
    assert tm.slide_mpp == pytest.approx(7.776)
    assert 7.0 < tm.mpp < 17.0  # analysed at about 8-16 µm/px
    assert tumour_mask.shape == slide.shape
    assert _coverage(tm, tumour_mask) == 1.0  # every annotated tumour pixel
    assert 0.02 < tm.area_fraction < 0.5
    # the white padding out to the tile grid (rightmost/bottom columns) is not tissue
    assert not tm.mask[-50:].any() and not tm.mask[:, -10:].any()
    assert np.isfinite(tm.threshold)


def test_camelyon_openslide_pyramid_without_mpp(camelyon, tumour_mask):
    slide = _open(camelyon / "tumor_001_level5_pyramid.tif")
    assert slide.mpp is None
    tm = tissue_mask(slide)
    assert tm.downsample > 1  # a coarser pyramid level, not level 0
    assert _coverage(tm, tumour_mask) == 1.0
    assert tm.area_fraction < 0.5
    assert tm.frame.slide_shape == slide.shape


def test_fraction_in_is_exact():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 30)) > 0.6
    tm = TissueMask(mask=mask, downsample=4.0, slide_mpp=0.5, threshold=0.1, method="otsu")
    full = np.kron(mask, np.ones((4, 4), dtype=bool))  # level-0 view of the mask
    for y0, x0, h, w in [(0, 0, 160, 120), (3, 5, 17, 9), (150, 100, 40, 40), (-8, -8, 16, 16)]:
        ys = slice(max(y0, 0), max(min(y0 + h, 160), 0))
        xs = slice(max(x0, 0), max(min(x0 + w, 120), 0))
        want = full[ys, xs].sum() / (h * w)
        assert tm.fraction_in(y0, x0, h, w) == pytest.approx(want, abs=1e-9)


def test_methods_on_real_he(cmu1):
    rgb, _ = _open(cmu1).low_res(10.0)
    fractions = {}
    for method in ("otsu", "od", "hsv"):
        mask, thr = tissue_mask_from_rgb(rgb, method=method)
        assert mask.any() and np.isfinite(thr)
        fractions[method] = mask.mean()
    # the three methods see the same tissue, give or take the pale edges
    assert max(fractions.values()) - min(fractions.values()) < 0.2


def test_uniform_tissue_is_all_tissue():
    mask, thr = tissue_mask_from_rgb(np.full((64, 64, 3), (180, 100, 160), np.uint8))
    assert mask.all() and np.isfinite(thr)


def test_otsu_matches_skimage():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(2)
    for sample in (rng.random(5000), np.concatenate([rng.normal(0.1, 0.02, 9000),
                                                     rng.normal(0.4, 0.05, 1000)])):
        assert otsu_threshold(sample) == pytest.approx(threshold_otsu(sample), abs=1e-12)


def test_holes_and_small_objects():
    m = np.zeros((60, 60), dtype=bool)
    m[10:50, 10:50] = True
    m[25:28, 25:28] = False  # a small hole
    m[2, 2] = True  # dust
    out = clean_mask(m, min_object_px=5, max_hole_px=20)
    assert out[26, 26] and not out[2, 2]


def test_ink_pixels_match_hsv_definition():
    from skimage.color import rgb2hsv

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (20000, 3), dtype=np.uint8)
    h, sat, _ = rgb2hsv(rgb[None].astype(np.float64) / 255)[0].T
    want = ((sat > 0.25) & (h > 0.2) & (h < 0.5)) | ((sat > 0.4) & (h >= 0.55) & (h < 0.68))
    got = ink_pixels(rgb)
    assert (got == want).mean() > 0.995  # hue ties at the range ends aside


def test_low_res_reads_the_file_level(camelyon):
    slide = _open(camelyon / "tumor_001_level5.ome.tif")
    rgb, ds = low_res(slide, 15.0)
    ref, ref_ds = slide.low_res(15.0)
    assert ds == ref_ds == 2.0 and np.array_equal(rgb, ref)


def test_pen_marks_removed():
    rng = np.random.default_rng(1)
    img = np.full((200, 200, 3), 245, np.uint8)
    img[40:160, 40:160] = (200 + rng.integers(-15, 15, (120, 120, 3))).clip(0, 255) * \
        np.array([0.9, 0.55, 0.8])  # pink/purple H&E-like tissue
    img[100:106, 0:200] = (30, 140, 60)  # green marker line across the tissue
    mask, _ = tissue_mask_from_rgb(img)
    assert mask[60:90, 60:90].mean() > 0.95
    assert not mask[101:105, 0:30].any()  # ink outside the tissue is not tissue


def _dark_marks(rgb: np.ndarray) -> list[tuple[slice, slice]]:
    """Bounding boxes of the large near-black connected marks of a low-resolution image,
    found independently of the detector (brightest channel < 50, > 2000 px)."""
    from scipy import ndimage as ndi

    lab, _ = ndi.label(rgb.max(axis=-1) < 50)
    sizes = np.bincount(lab.ravel())
    return [box for i, box in enumerate(ndi.find_objects(lab), start=1)
            if box is not None and sizes[i] > 2000]


def test_black_pen_crosses_on_tumor001_are_removed(camelyon, camelyon_tissue, tumour_mask):
    """tumor_001 has two black pen crosses above the tissue: with pen removal (the
    default) none of their pixels is tissue; without it they are; the annotated tumour
    keeps all its tissue either way."""
    slide, tm = camelyon_tissue
    rgb = slide.read_level(0)
    marks = _dark_marks(rgb)
    assert len(marks) == 2  # the two crosses
    for box in marks:
        ys, xs = box
        assert ys.stop < 700 and 100 < (xs.stop - xs.start) < 400  # top of the slide
    ds = tm.downsample

    def tissue_on(mask, box, grow=8):
        ys, xs = box
        return mask[max(int((ys.start - grow) / ds), 0):int((ys.stop + grow) / ds),
                    max(int((xs.start - grow) / ds), 0):int((xs.stop + grow) / ds)].mean()

    assert all(tissue_on(tm.mask, b) == 0 for b in marks)
    kept = tissue_mask(slide, pen=False)
    assert all(tissue_on(kept.mask, b) > 0.15 for b in marks)
    assert _coverage(tm, tumour_mask) == 1.0
    # the same on the OpenSlide pyramid without µm/px (a coarser analysis level)
    pyr = _open(camelyon / "tumor_001_level5_pyramid.tif")
    tm2 = tissue_mask(pyr)
    ds = tm2.downsample
    assert ds > 1 and all(tissue_on(tm2.mask, b) == 0 for b in marks)
    assert _coverage(tm2, tumour_mask) == 1.0


def test_black_ink_strokes_removed_but_dark_he_kept():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(2)
    img = np.full((240, 240, 3), 245, np.uint8)
    he = (np.array([150, 80, 170]) + rng.integers(-20, 20, (160, 160, 3))).clip(0, 255)
    img[40:200, 40:200] = he  # dense purple tissue, brightest channel ~150
    img[60:80, 60:80] = (85, 40, 110)  # very dense nuclei: still brighter than ink
    img[10:14, 0:240] = (40, 34, 38)  # a thin black stroke above the tissue
    img[120:123, 0:240] = (40, 34, 38)  # and one across it
    img[200:230, 100:104] = (40, 34, 38)  # a cross below the tissue
    img[213:217, 85:120] = (40, 34, 38)
    # the optics blur every edge at low resolution
    img = ndi.gaussian_filter(img.astype(np.float32), (1.2, 1.2, 0)).round().astype(np.uint8)
    # fixed HSV thresholds (saturation > 0.07): the ink's tint alone would pass
    mask, _ = tissue_mask_from_rgb(img, method="hsv", pen=True)
    assert not mask[10:14].any() and not mask[205:230, 95:110].any()
    assert not mask[120:123, 0:40].any()
    assert mask[60:80, 60:80].all() and mask[50:110, 50:190].mean() > 0.95
    inked, _ = tissue_mask_from_rgb(img, method="hsv", pen=False)
    assert inked[11:13].all() and inked[205:230, 101:103].mean() > 0.5


def test_scanned_area_bounds(tmp_path):
    img = np.full((256, 256, 3), 255, np.uint8)
    img[:, :] = (180, 100, 160)  # "tissue" everywhere...
    path = tmp_path / "bounded.png"
    Image.fromarray(img).save(path)
    slide = _open(path, mpp=8.0)
    slide.bounds = (64, 32, 128, 160)  # ...but only this (y, x, h, w) was scanned (MRXS/SCN)
    tm = tissue_mask(slide, min_object_um2=0)
    ys, xs = np.nonzero(tm.mask)
    assert ys.min() >= 64 and ys.max() < 192 and xs.min() >= 32 and xs.max() < 192


def test_save_load_roundtrip(camelyon_tissue, tmp_path):
    _, tm = camelyon_tissue
    out = tm.save(tmp_path / "t.ome.zarr")
    back = TissueMask.load(out)
    assert np.array_equal(back.mask, tm.mask)
    assert back.downsample == tm.downsample and back.method == "otsu"
    assert back.threshold == pytest.approx(tm.threshold)
    assert back.frame == tm.frame


# -- bad input ------------------------------------------------------------------------
def test_all_white_slide(pyramid_factory):
    path = pyramid_factory(np.full((1024, 1024, 3), 255, np.uint8), levels=3)
    with pytest.raises(InputError, match=r"no tissue found at threshold [0-9.]+ .*blank"):
        tissue_mask(_open(path))


def test_all_black_slide(pyramid_factory):
    path = pyramid_factory(np.zeros((1024, 1024, 3), np.uint8), levels=3)
    for method in ("otsu", "od", "hsv"):
        with pytest.raises(InputError, match="no tissue found at threshold .*black"):
            tissue_mask(_open(path), method=method)


def test_tiny_one_level_image(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full((8, 10, 3), 128, np.uint8)).save(path)
    slide = _open(path)
    assert slide.level_count == 1
    with pytest.raises(InputError, match="too small"):
        tissue_mask(slide)


def test_small_one_level_image_works(ihc_png):
    slide = _open(ihc_png)  # 512x512, one level, no µm/px
    tm = tissue_mask(slide)
    assert tm.mask.shape == (512, 512) and tm.downsample == 1.0
    assert 0.05 < tm.area_fraction < 0.95


def test_grayscale_image(ihc_png, tmp_path):
    grey = tmp_path / "grey.png"
    Image.open(ihc_png).convert("L").convert("RGB").save(grey)
    slide = _open(grey)
    with pytest.raises(InputError, match="grayscale.*method 'od'"):
        tissue_mask(slide)
    tm = tissue_mask(slide, method="od")  # intensity works on grey
    assert tm.mask.any() and np.isfinite(tm.threshold)


def test_unknown_method(cmu1):
    with pytest.raises(InputError, match="unknown tissue method"):
        tissue_mask(_open(cmu1), method="magic")


def test_allow_empty(pyramid_factory):
    path = pyramid_factory(np.full((512, 512, 3), 250, np.uint8), levels=2)
    tm = tissue_mask(_open(path), allow_empty=True)
    assert not tm.mask.any() and tm.fraction_in(0, 0, 100, 100) == 0.0


def test_image_slide_type(ihc_png):
    assert isinstance(_open(ihc_png), ImageSlide)
