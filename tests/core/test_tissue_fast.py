"""The tissue analysis gives exactly the masks of its plain restatement.

:func:`tissue_mask_from_rgb`, :func:`black_ink`, :func:`clean_mask` and :func:`dilate`
work on the ink's and the mask's bounding boxes, filter in column strips and label in
blocks; every mask they give must be bit-identical to the straightforward whole-image
version kept below (``_reference_*``, the implementation they replaced, verbatim), for
every method, with and without pen removal, with and without µm/px, on the shared real
slides and on hand-made images built to hit the edge cases (borders, holes at the edge,
ink, blank, tiny and odd-sized images).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from napari_lnmeta.core.tissue import (
    METHODS,
    _gaussian,
    black_ink,
    clean_mask,
    dilate,
    tissue_mask,
    tissue_mask_from_rgb,
)
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.slide import MppWarning, open_slide

# ------------------------------------------------------------------------------------------
# The reference: the whole-image implementation, as it was
# ------------------------------------------------------------------------------------------
_REFERENCE_METHODS = ("otsu", "od", "hsv")
_REFERENCE_MIN_THRESHOLD = {"otsu": 0.05, "od": 0.10}


def _reference_ink_pixels(rgb: np.ndarray) -> np.ndarray:
    """Green or blue marker-pen pixels of an ``(N, 3)`` uint8 sample.

    In HSV terms: saturation > 0.25 with hue in (0.2, 0.5) (green), or saturation > 0.4
    with hue in [0.55, 0.68) (blue). H&E is pink to purple (hue > 0.7 or < 0.1), so
    neither range touches it. Written with integer channel comparisons (no hue array).
    """
    c = rgb.astype(np.int16)
    r, g, b = c[:, 0], c[:, 1], c[:, 2]
    mx = np.maximum(np.maximum(r, g), b)
    d = mx - np.minimum(np.minimum(r, g), b)
    sat4 = 4 * d > mx  # saturation > 0.25
    # green: G is the maximum (hue in [1/6, 1/2)) and hue > 0.2 <=> (b - r) > -0.8 d
    green = (g > r) & (g >= b) & (5 * (b - r) > -4 * d) & sat4
    # blue: B is the maximum, hue = (4 + (r - g) / d) / 6 in [0.55, 0.68)
    #   <=> -0.7 d <= r - g < 0.08 d
    blue = (b > r) & (b > g) & (10 * (r - g) >= -7 * d) & (25 * (r - g) < 2 * d) & \
        (5 * d > 2 * mx)
    return green | blue


#: black ink: the brightest channel is below this at the core of a mark ...
_REFERENCE_BLACK_INK_CORE = 60
#: ... or below this with a saturation under _REFERENCE_BLACK_INK_GREY_SAT % (dark grey) ...
_REFERENCE_BLACK_INK_GREY = 120
_REFERENCE_BLACK_INK_GREY_SAT = 12
#: ... and below this on the blurred rim around the core
_REFERENCE_BLACK_INK_RIM = 150


def _reference_black_ink(rgb: np.ndarray, *, min_core_px: int = 12, rim_px: int = 3,
              val: np.ndarray | None = None) -> np.ndarray:
    """Black (or very dark) marker-pen pixels of an ``(H, W, 3)`` low-resolution image.

    Ink is far darker than H&E at 8-16 µm/px (its brightest channel stays below
    :data:`_REFERENCE_BLACK_INK_CORE`, where dense tumour is above 70) or, for thin strokes blurred
    with the glass, dark and grey (below :data:`_REFERENCE_BLACK_INK_GREY` with a saturation under
    12 %, where H&E that dark is strongly tinted): connected cores of at least
    ``min_core_px`` such pixels are ink, and so is the ink's blurred rim, the pixels
    within ``rim_px`` of a core whose brightest channel is below :data:`_REFERENCE_BLACK_INK_RIM`.
    Thin strokes and crosses alike: only darkness and adjacency are used. ``val`` is
    the brightest channel when the caller has it already.
    """
    from scipy import ndimage as ndi

    if val is None:
        val, _ = _reference_max_min(np.asarray(rgb))
    # very dark, or dark grey (a thin stroke blurred with the glass): H&E this dark is
    # strongly tinted (haematoxylin), ink and its blur are not
    core = val < _REFERENCE_BLACK_INK_CORE
    dark = val < _REFERENCE_BLACK_INK_GREY
    if dark.any():
        rgb = np.asarray(rgb)
        v = val[dark].astype(np.int32)
        mn = np.minimum(np.minimum(rgb[..., 0][dark], rgb[..., 1][dark]), rgb[..., 2][dark])
        core[dark] |= (v - mn) * 100 < _REFERENCE_BLACK_INK_GREY_SAT * v
    out = np.zeros(val.shape, dtype=bool)
    if not core.any():
        return out
    lab, n = ndi.label(core)
    sizes = np.bincount(lab[core], minlength=n + 1)
    yy, xx = np.mgrid[-rim_px:rim_px + 1, -rim_px:rim_px + 1]
    disk = (yy ** 2 + xx ** 2) <= rim_px ** 2 + rim_px * 0.5
    h, w = val.shape
    # each mark on its own bounding box (plus the rim): work ~ ink area, not image area
    for i, box in enumerate(ndi.find_objects(lab), start=1):
        if box is None or sizes[i] < min_core_px:
            continue
        y0, y1 = max(box[0].start - rim_px, 0), min(box[0].stop + rim_px, h)
        x0, x1 = max(box[1].start - rim_px, 0), min(box[1].stop + rim_px, w)
        c = lab[y0:y1, x0:x1] == i
        if rim_px > 0:
            c = c | (ndi.binary_dilation(c, structure=disk)
                     & (val[y0:y1, x0:x1] < _REFERENCE_BLACK_INK_RIM))
        out[y0:y1, x0:x1] |= c
    return out


def _reference_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # channel-wise maximum/minimum: much faster than reducing over a length-3 last axis
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def _reference_sat(mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    # one float32 pass (mx >= mn, so the difference never wraps)
    return np.divide(mx - mn, np.maximum(mx, 1), dtype=np.float32)


_REFERENCE_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0)
                            / 255.0).astype(np.float32)


def _reference_optical_density_sum(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density ``-sum(log(I / 255))`` over R, G, B (float32, never inf)."""
    return _REFERENCE_OD_LUT[rgb[..., 0]] + _REFERENCE_OD_LUT[rgb[..., 1]] + _REFERENCE_OD_LUT[rgb[..., 2]]


def _reference_otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of a sample: the histogram split maximising between-class variance.

    Same result as :func:`skimage.filters.threshold_otsu` (``nbins`` bins over the sample
    range, threshold at a bin centre), without importing scikit-image.
    """
    values = np.asarray(values).ravel()
    lo, hi = float(values.min()), float(values.max())
    hist, edges = np.histogram(values, bins=nbins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centers) / np.maximum(w1, 1e-300)
    m2 = (np.cumsum((hist * centers)[::-1]) / np.maximum(w2[::-1], 1e-300))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centers[int(np.argmax(between))])


def _reference_otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D sample (NaN-free).

    A constant sample has no threshold; just below its value is returned so the floor
    of :data:`_REFERENCE_MIN_THRESHOLD` decides (all tissue, or none for a blank image).
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("inf")
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return lo - 1e-6
    return _reference_otsu_threshold(values)


def _reference_tissue_mask_from_rgb(rgb: np.ndarray, *, method: str = "otsu",
                         threshold: float | None = None, sat_min: float = 0.07,
                         value_max: float = 0.8, dark: int = 30, pen: bool = True,
                         valid: np.ndarray | None = None,
                         blur_sigma: float = 1.0) -> tuple[np.ndarray, float]:
    """Foreground pixels of a low-resolution RGB image (no morphology).

    Parameters
    ----------
    rgb
        ``(H, W, 3)`` uint8.
    method
        ``"otsu"``: Otsu on HSV saturation (seed 004); ``"od"``: Otsu on the summed
        optical density (works on grayscale images); ``"hsv"``: fixed thresholds,
        saturation > ``sat_min`` and value < ``value_max`` (seed 001).
    threshold
        Use this threshold instead of Otsu's (saturation or OD, by method).
    dark
        Pixels whose brightest channel is below this are padding or ink, not tissue.
    pen
        Drop marker pen: black ink (:func:`_reference_black_ink`, dark cores and their rims,
        also left out of the threshold's sample) and saturated green/blue pixels
        (:func:`_reference_ink_pixels`; H&E is pink/purple).
    valid
        Optional bool mask of pixels that may be tissue (e.g. the scanned area).
    blur_sigma
        Gaussian smoothing (mask pixels) of the score before thresholding.

    Returns
    -------
    (mask, threshold)
        ``(H, W)`` bool and the threshold that was applied.

    Raises
    ------
    InputError
        Unknown method, not an RGB image, or a grayscale image with a colour method.
    """
    from scipy import ndimage as ndi

    if method not in _REFERENCE_METHODS:
        raise InputError(f"unknown tissue method {method!r} (choose from {', '.join(_REFERENCE_METHODS)})")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    val, mn = _reference_max_min(rgb)
    allowed = val >= dark
    if valid is not None:
        allowed &= np.asarray(valid, dtype=bool)
    if pen:  # black ink is neither tissue nor part of the threshold's sample
        allowed &= ~_reference_black_ink(rgb, val=val)
    # a grayscale image with content (not a blank/black one: that is "no tissue" below)
    if method in ("otsu", "hsv") and int((val - mn).max()) <= 2 and \
            float((allowed & (val < 230)).mean()) > 0.001:
        raise InputError("the image is grayscale (R = G = B): saturation-based tissue detection "
                         f"(method {method!r}) needs a stained colour slide; use method 'od'")
    sat = _reference_sat(val, mn)
    score = _reference_optical_density_sum(rgb) if method == "od" else sat
    if blur_sigma and blur_sigma > 0:
        score = ndi.gaussian_filter(score, blur_sigma, truncate=2.0)
    if method == "hsv":
        thr = float(sat_min if threshold is None else threshold)
        v = val.astype(np.float32) / 255.0
        if blur_sigma and blur_sigma > 0:
            v = ndi.gaussian_filter(v, blur_sigma, truncate=2.0)
        fg = (score > thr) & (v < value_max)
    else:
        if threshold is None:
            sample = score[allowed]
            if sample.size > 1_000_000:  # Otsu on a regular subsample: same histogram
                sample = sample[:: sample.size // 1_000_000 + 1]
            thr = max(_reference_otsu(sample), _REFERENCE_MIN_THRESHOLD[method])
        else:
            thr = float(threshold)
        fg = score > thr
    fg &= allowed
    if pen:
        # green (hue ~0.2-0.5) or blue (~0.55-0.68), clearly saturated: ink, not H&E
        # H&E has red or blue as its brightest channel and red above green
        cand = fg & (sat > 0.25) & (rgb[..., 1] >= rgb[..., 0])
        if cand.any():
            fg[cand] = ~_reference_ink_pixels(rgb[cand])
    return fg, float(thr)


def _reference_clean_mask(mask: np.ndarray, *, min_object_px: float, max_hole_px: float) -> np.ndarray:
    """Fill holes smaller than ``max_hole_px`` and drop objects smaller than ``min_object_px``."""
    from scipy import ndimage as ndi

    out = np.asarray(mask, dtype=bool)
    if max_hole_px > 0:
        lab, n = ndi.label(~out)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < max_hole_px
            small[0] = False
            # background touching the border is never a hole
            border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
            small[border] = False
            out = out | small[lab]
    if min_object_px > 1:
        lab, n = ndi.label(out)
        if n:
            sizes = np.bincount(lab.ravel())
            keep = sizes >= min_object_px
            keep[0] = False
            out = keep[lab]
    return out


def _reference_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels."""
    from scipy import ndimage as ndi

    if radius <= 0:
        return mask
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ndi.binary_dilation(mask, structure=(yy ** 2 + xx ** 2) <= radius ** 2 + radius * 0.5)




def _reference_analysis(rgb, *, method, pen, mpp, ds=1.0, valid=None, threshold=None,
                        min_object_um2=20_000.0, max_hole_um2=250_000.0, dilate_um=16.0):
    """What :func:`tissue_mask` did after reading the low-resolution image."""
    mask, thr = _reference_tissue_mask_from_rgb(rgb, method=method, threshold=threshold,
                                                pen=pen, valid=valid)
    min_px, hole_px, radius = _sizes(mask, mpp, ds, min_object_um2, max_hole_um2, dilate_um)
    mask = _reference_clean_mask(mask, min_object_px=min_px, max_hole_px=hole_px)
    if radius:
        mask = _reference_dilate(mask, radius)
        if valid is not None:
            mask &= valid
    return mask, thr


def _analysis(rgb, *, method, pen, mpp, ds=1.0, valid=None, threshold=None,
              min_object_um2=20_000.0, max_hole_um2=250_000.0, dilate_um=16.0):
    mask, thr = tissue_mask_from_rgb(rgb, method=method, threshold=threshold, pen=pen,
                                     valid=valid)
    min_px, hole_px, radius = _sizes(mask, mpp, ds, min_object_um2, max_hole_um2, dilate_um)
    mask = clean_mask(mask, min_object_px=min_px, max_hole_px=hole_px)
    if radius:
        mask = dilate(mask, radius)
        if valid is not None:
            mask &= valid
    return mask, thr


def _sizes(mask, mpp, ds, min_object_um2, max_hole_um2, dilate_um):
    # tissue_mask's conversion of areas and margin to mask pixels
    if mpp is not None:
        px_um2 = (mpp * ds) ** 2
        min_px, hole_px = min_object_um2 / px_um2, max_hole_um2 / px_um2
    else:
        min_px, hole_px = 0.0005 * mask.size, 0.005 * mask.size
    radius = 0
    if dilate_um and dilate_um > 0:
        radius = max(1, round(dilate_um / (mpp * ds))) if mpp is not None else 1
    return min_px, hole_px, radius


def _outcome(fn, *args, **kw):
    """``("ok", result)`` or ``("error", message)``."""
    try:
        return "ok", fn(*args, **kw)
    except InputError as e:
        return "error", str(e)


def _assert_same(rgb, **kw):
    """The analysis and its reference agree: the same mask and threshold, or the same
    error; returns the mask (or None)."""
    got = _outcome(_analysis, rgb, **kw)
    want = _outcome(_reference_analysis, rgb, **kw)
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1] == want[1]
        return None
    (mask, thr), (rmask, rthr) = got[1], want[1]
    assert mask.dtype == bool and mask.shape == rmask.shape == rgb.shape[:2]
    assert thr == rthr
    assert np.array_equal(mask, rmask), f"{int((mask != rmask).sum())} pixels differ"
    return mask


def _all_variants(rgb, mpps=(None, 2.0, 8.0), **kw):
    """Every method, with and without pen removal, with and without µm/px; returns how
    many variants found tissue (so a case cannot pass by finding nothing everywhere)."""
    found = 0
    for method in METHODS:
        for pen in (True, False):
            fg = _outcome(tissue_mask_from_rgb, rgb, method=method, pen=pen,
                          valid=kw.get("valid"))
            ref = _outcome(_reference_tissue_mask_from_rgb, rgb, method=method, pen=pen,
                           valid=kw.get("valid"))
            assert fg[0] == ref[0]
            if fg[0] == "error":
                assert fg[1] == ref[1]
                continue
            assert np.array_equal(fg[1][0], ref[1][0]) and fg[1][1] == ref[1][1]
            # the morphology of tissue_mask for each pixel size, on that same foreground
            for mpp in mpps:
                min_px, hole_px, radius = _sizes(fg[1][0], mpp, 1.0, 20_000.0, 250_000.0, 16.0)
                got = dilate(clean_mask(fg[1][0], min_object_px=min_px, max_hole_px=hole_px),
                             radius)
                want = _reference_dilate(_reference_clean_mask(
                    ref[1][0], min_object_px=min_px, max_hole_px=hole_px), radius)
                if kw.get("valid") is not None:
                    got, want = got & kw["valid"], want & kw["valid"]
                assert np.array_equal(got, want), (method, pen, mpp)
                found += bool(got.any())
    return found


# ------------------------------------------------------------------------------------------
# Hand-made images
# ------------------------------------------------------------------------------------------
_WHITE = 243
_HE = np.array([0.82, 0.5, 0.78])  # pink/purple tissue, as a fraction of the glass


def _blur(img, sigma=1.2):
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0)).round().clip(
        0, 255).astype(np.uint8)


def _paint(shape, tissue, rng, *, dark=False):
    """Glass with H&E-like tissue where ``tissue`` is True (noisy, blurred edges)."""
    img = np.full((*shape, 3), _WHITE, np.float32)
    img += rng.normal(0, 3, img.shape)
    level = 150 if dark else 215
    he = (level + rng.normal(0, 18, img.shape)) * _HE
    img[tissue] = he[tissue]
    return _blur(img.clip(0, 255))


def _blobs(shape, rng, n=12, r=(4, 40)):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        ry, rx = rng.integers(*r, size=2)
        out |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out


def _holey(shape, rng):
    """Tissue over most of the image with holes of every size, some at the edges."""
    t = np.ones(shape, bool)
    t[:, : shape[1] // 8] = False  # glass down the left side
    for _ in range(40):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        s = int(rng.integers(1, 25))
        t[y:y + s, x:x + s] = False
    t[0:6, 100:120] = False  # notches at the top, right and bottom edges
    t[100:110, -4:] = False
    t[-3:, 200:260] = False
    return t


def _ink(img, rng):
    h, w = img.shape[:2]
    img[h // 5:h // 5 + 3, :] = (40, 34, 38)  # black line, edge to edge
    img[:, w // 3:w // 3 + 2] = (55, 52, 50)  # dark grey, top to bottom
    cy, cx = int(0.8 * h), int(0.7 * w)  # a cross
    img[cy - 20:cy + 20, cx - 2:cx + 2] = (30, 28, 33)
    img[cy - 2:cy + 2, cx - 20:cx + 20] = (30, 28, 33)
    img[5:9, 5:12] = (20, 20, 20)  # a speck too small to be a mark (< 12 px? no: 28)
    img[-3:, -2:] = (10, 10, 12)  # a tiny one in the corner
    img[int(0.6 * h):int(0.6 * h) + 4, 10:w - 10] = (30, 140, 60)  # green marker
    img[10:w // 2, int(0.5 * w):int(0.5 * w) + 3] = (40, 60, 170)  # blue marker
    return _blur(img, 0.8)


def _case(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    if name == "blobs":
        return _paint((300, 389), _blobs((300, 389), rng), rng)
    if name == "blobs_touching_borders":
        t = _blobs((257, 331), rng, n=20, r=(20, 70))
        t[:, :3] = t[:3, :] = True
        return _paint(t.shape, t, rng)
    if name == "holes_at_edges":
        return _paint((300, 320), _holey((300, 320), rng), rng)
    if name == "pen_marks":
        return _ink(_paint((320, 330), _blobs((320, 330), rng, n=8, r=(20, 60)), rng), rng)
    if name == "pen_marks_dark_tissue":
        return _ink(_paint((260, 400), _holey((260, 400), rng), rng, dark=True), rng)
    if name == "all_white":
        return np.full((200, 300, 3), 255, np.uint8)
    if name == "all_black":
        return np.zeros((150, 140, 3), np.uint8)
    if name == "uniform_tissue":
        return np.full((64, 200, 3), (180, 100, 160), np.uint8)
    if name == "tiny":
        return rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    if name == "one_row":
        return _paint((1, 300), np.ones((1, 300), bool), rng)
    if name == "noise":
        return rng.integers(0, 256, (180, 333, 3), dtype=np.uint8)
    if name == "wide_odd":  # a last filter strip of one column; many strips
        return _paint((61, 1153), _blobs((61, 1153), rng, n=30, r=(3, 30)), rng)
    if name == "narrow_tall":
        return _paint((700, 33), _blobs((700, 33), rng, n=10, r=(3, 20)), rng)
    if name == "strip_plus_one":
        return _paint((90, 129), _blobs((90, 129), rng, n=6), rng)
    if name == "dust":  # specks and objects around the size limits
        t = rng.random((240, 250)) > 0.995
        for s in (3, 5, 8, 12, 18):
            y, x = rng.integers(0, 220, 2)
            t[y:y + s, x:x + s] = True
        return _paint(t.shape, t, rng)
    if name == "black_padding":  # scanner padding (near black) around tissue
        img = _paint((200, 260), _blobs((200, 260), rng, n=10, r=(10, 40)), rng)
        img[:20] = 0
        img[:, -30:] = 5
        return img
    if name == "grayscale":
        g = _paint((150, 200), _blobs((150, 200), rng), rng)[..., :1]
        return np.repeat(g, 3, axis=2)
    if name == "float_input":
        return _paint((120, 170), _blobs((120, 170), rng), rng).astype(np.float64) * 1.1 - 5
    raise KeyError(name)


CASES = ["blobs", "blobs_touching_borders", "holes_at_edges", "pen_marks",
         "pen_marks_dark_tissue", "all_white", "all_black", "uniform_tissue", "tiny",
         "one_row", "noise", "wide_odd", "narrow_tall", "strip_plus_one", "dust",
         "black_padding", "grayscale", "float_input"]


@pytest.mark.parametrize("name", CASES)
def test_hand_made_images_match_the_reference(name):
    rgb = _case(name)
    found = _all_variants(rgb)
    if name not in ("all_white", "all_black", "grayscale", "tiny"):
        assert found > 0


def test_scanned_area_and_fixed_threshold_match_the_reference():
    rng = np.random.default_rng(7)
    rgb = _ink(_paint((240, 300), _holey((240, 300), rng), rng), rng)
    valid = np.zeros(rgb.shape[:2], bool)
    valid[30:200, 17:290] = True
    assert _all_variants(rgb, mpps=(None, 4.0), valid=valid) > 0
    for method, thr in (("otsu", 0.12), ("od", 0.3), ("hsv", 0.1)):
        for pen in (True, False):
            _assert_same(rgb, method=method, pen=pen, mpp=4.0, threshold=thr)


def test_black_ink_matches_the_reference():
    rng = np.random.default_rng(3)
    rgb = _ink(_paint((300, 280), _blobs((300, 280), rng, n=10, r=(10, 50)), rng, dark=True),
               rng)
    rgb[150:152, 0:5] = 0  # ink at the left edge
    for min_core in (0, 1, 12, 60, 10_000):
        for rim in (0, 1, 3, 6):
            got = black_ink(rgb, min_core_px=min_core, rim_px=rim)
            want = _reference_black_ink(rgb, min_core_px=min_core, rim_px=rim)
            assert np.array_equal(got, want), (min_core, rim)
    assert black_ink(rgb).any()
    assert not black_ink(np.full((40, 50, 3), 200, np.uint8)).any()


def _random_masks():
    rng = np.random.default_rng(11)
    yield rng.random((97, 131)) > 0.5  # noise: many small objects and holes
    yield rng.random((64, 64)) > 0.97
    yield np.ones((40, 50), bool)
    yield np.zeros((40, 50), bool)
    m = _holey((150, 300), rng)  # touches three edges, holes at the edges
    yield m
    yield ~m
    yield _blobs((200, 170), rng, n=25, r=(2, 30))
    one = np.zeros((33, 35), bool)
    one[16, 17] = True
    yield one
    corner = np.zeros((20, 30), bool)
    corner[0, 0] = corner[-1, -1] = corner[0, -1] = True
    yield corner
    yield np.ones((1, 9), bool)


def test_clean_mask_matches_the_reference():
    for mask in _random_masks():
        for min_px, hole_px in ((0, 0), (1, 1), (2, 3), (5, 20), (30, 0), (0, 400),
                                (1e9, 1e9), (12.5, 0.5)):
            got = clean_mask(mask, min_object_px=min_px, max_hole_px=hole_px)
            want = _reference_clean_mask(mask, min_object_px=min_px, max_hole_px=hole_px)
            assert np.array_equal(got, want), (mask.shape, min_px, hole_px)


def test_dilate_matches_the_reference():
    for mask in _random_masks():
        for radius in (0, 1, 2, 3, 4, 5, 7, 12):
            got = dilate(mask, radius)
            want = _reference_dilate(mask, radius)
            assert np.array_equal(got, want), (mask.shape, radius)


def test_strip_filter_matches_gaussian_filter():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(4)
    for shape in ((50, 129), (7, 300), (130, 257), (3, 1000), (200, 128)):
        x = rng.random(shape, dtype=np.float32)
        for sigma in (0.5, 1.0, 2.5):
            assert np.array_equal(_gaussian(x, sigma), ndi.gaussian_filter(x, sigma, truncate=2.0))


# ------------------------------------------------------------------------------------------
# Real slides
# ------------------------------------------------------------------------------------------
def _open(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return open_slide(path, **kw)


@pytest.fixture(scope="module")
def tumor001(camelyon):
    slide = _open(camelyon / "tumor_001_level5.ome.tif")
    rgb, ds = slide.low_res(10.0)
    return slide, rgb, ds


def test_tumor001_default_mask_matches_the_reference(tumor001):
    """The whole 7168 x 3072 analysis level, end to end through tissue_mask."""
    slide, rgb, ds = tumor001
    tm = tissue_mask(slide)
    want, thr = _reference_analysis(rgb, method="otsu", pen=True, mpp=slide.mpp, ds=ds)
    assert tm.mask.shape == rgb.shape[:2] and tm.threshold == thr
    assert np.array_equal(tm.mask, want)
    assert 0.02 < tm.area_fraction < 0.5


@pytest.mark.parametrize("method", METHODS)
def test_tumor001_pen_crosses_band_matches_the_reference(tumor001, method):
    """The top of the slide (both black pen crosses) over a band of tissue, every variant."""
    slide, rgb, ds = tumor001
    band = np.concatenate([rgb[:700], rgb[2350:2800]])
    for pen in (True, False):
        for mpp in (slide.mpp, None):
            mask = _assert_same(band, method=method, pen=pen, mpp=mpp, ds=ds)
            assert mask is not None and mask.any()


def test_cmu1_matches_the_reference(cmu1):
    slide = _open(cmu1)
    rgb, ds = slide.low_res(10.0)
    assert _all_variants(rgb, mpps=(None, slide.mpp * ds)) == 12
    # and at a finer level (a bigger image)
    rgb, ds = slide.low_res(2.0)
    for method in METHODS:
        _assert_same(rgb, method=method, pen=True, mpp=slide.mpp, ds=ds)


def test_ihc_png_matches_the_reference(ihc_png):
    rgb = np.asarray(Image.open(ihc_png).convert("RGB"))
    assert _all_variants(rgb, mpps=(None, 2.0)) > 0
