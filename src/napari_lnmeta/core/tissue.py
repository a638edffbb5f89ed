"""Tissue detection at low resolution.

The slide is read once at a coarse level (about 8–16 µm/px, :meth:`Slide.low_res`), so
memory and time are bounded by that level whatever the size of level 0. On it:

1. pixels outside the scanned area (OpenSlide ``bounds`` of MRXS/SCN slides) and
   near-black padding are excluded;
2. a foreground score is thresholded: HSV saturation with Otsu's threshold (seed 004,
   ``method="otsu"``), optical density with Otsu (``method="od"``, the only choice for a
   grayscale image), or fixed HSV thresholds (seed 001, ``method="hsv"``: saturation
   above ``0.07`` and brightness below ``0.8`` by default);
3. pen marks are removed when ``pen=True``: black ink by darkness (cores far darker
   than H&E and their blurred rims), green/blue ink by hue;
4. holes smaller than ``max_hole_um2`` are filled and objects smaller than
   ``min_object_um2`` are dropped.

The result, :class:`TissueMask`, carries its frame (level-0 pixels per mask pixel), so
``mask.fraction_in(y0, x0, h, w)`` answers "how much of this level-0 box is tissue"
exactly (area-weighted, through an integral image), which the patch grid uses.

Bad input gives :class:`~napari_lnmeta.errors.InputError` with a one-line reason: a blank
(all white) or all black slide ("no tissue found at threshold ..."), an image too small
to analyse, or a grayscale image with a colour-based method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io.frame import SlideFrame

if TYPE_CHECKING:
    from ..io.slide import Slide

#: the methods :func:`tissue_mask_from_rgb` knows
METHODS = ("otsu", "od", "hsv")
#: Otsu thresholds are never below these (so a blank slide's noise is never "tissue")
MIN_THRESHOLD = {"otsu": 0.05, "od": 0.10}
#: label value and colour of tissue in the written Labels layer / OME-Zarr
TISSUE_LABEL = 1
TISSUE_COLOR = (0, 200, 90, 255)
#: smallest mask (pixels on its short side) worth analysing
MIN_MASK_SIDE = 16


@dataclass
class TissueMask:
    """A boolean tissue mask at low resolution and where it sits on the slide.

    Attributes
    ----------
    mask
        ``(H, W)`` bool; mask pixel ``(i, j)`` covers level-0 pixels
        ``[origin + i * downsample, origin + (i + 1) * downsample)``.
    downsample
        Level-0 pixels per mask pixel.
    slide_mpp
        µm per level-0 pixel (``None`` when unknown).
    threshold
        The threshold used (saturation in [0, 1] for ``otsu``/``hsv``, summed optical
        density for ``od``).
    method
        ``"otsu"``, ``"od"`` or ``"hsv"``.
    """

    mask: np.ndarray
    downsample: float
    slide_mpp: float | None
    threshold: float
    method: str
    origin: tuple[float, float] = (0.0, 0.0)
    slide: str | None = None
    slide_shape: tuple[int, int] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {self.mask.shape}")
        self._integral: np.ndarray | None = None

    # -- geometry ------------------------------------------------------------------------
    @property
    def frame(self) -> SlideFrame:
        """The slide frame of the mask grid (for napari ``scale``/``translate``)."""
        return SlideFrame(downsample=float(self.downsample),
                          origin=(float(self.origin[0]), float(self.origin[1])),
                          slide_mpp=self.slide_mpp, slide=self.slide,
                          slide_shape=tuple(self.slide_shape) if self.slide_shape else None)

    @property
    def mpp(self) -> float | None:
        """µm per mask pixel."""
        return None if self.slide_mpp is None else self.slide_mpp * self.downsample

    @property
    def area_fraction(self) -> float:
        """Fraction of the mask (the whole slide) that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_um2(self) -> float | None:
        """Tissue area in µm² (``None`` without a pixel size)."""
        return None if self.mpp is None else float(self.mask.sum()) * self.mpp ** 2

    def fraction_in(self, y0: float, x0: float, h: float, w: float) -> float:
        """Tissue fraction of the level-0 box ``[y0, y0 + h) x [x0, x0 + w)``.

        Area-weighted over partial mask pixels; what lies outside the mask counts as
        background.
        """
        return float(self.fractions(np.array([[y0, x0]], dtype=np.float64), (h, w))[0])

    def fractions(self, coords: np.ndarray, size: float | tuple[float, float]) -> np.ndarray:
        """Vectorised :meth:`fraction_in` for ``(N, 2)`` level-0 top-left corners."""
        if self._integral is None:
            self._integral = integral_image(self.mask)
        return box_fractions(self._integral, coords, size, downsample=self.downsample,
                             origin=self.origin)

    def labels(self) -> np.ndarray:
        """The mask as uint8 labels (``TISSUE_LABEL`` on tissue, 0 elsewhere)."""
        return self.mask.astype(np.uint8) * TISSUE_LABEL

    # -- persistence ---------------------------------------------------------------------
    def attrs(self) -> dict[str, Any]:
        """JSON-able description stored beside the pixels."""
        return {"tissue": {"threshold": float(self.threshold), "method": self.method,
                           "params": _jsonable(self.params)}}

    def save(self, path: str | Path, *, overwrite: bool = False,
             inputs: tuple[str | Path, ...] = ()) -> Path:
        """Write the mask as a multiscale OME-Zarr Labels image (atomic)."""
        from ..io.omezarr import write_ome_zarr

        return write_ome_zarr(path, self.labels(), frame=self.frame, kind="labels",
                              name="tissue", overwrite=overwrite, attrs=self.attrs(),
                              colors={TISSUE_LABEL: TISSUE_COLOR}, inputs=inputs)

    @classmethod
    def load(cls, path: str | Path) -> TissueMask:
        """Read a mask written by :meth:`save` (or any labels OME-Zarr: label > 0 = tissue)."""
        from ..io.omezarr import read_ome_zarr

        res = read_ome_zarr(path)
        info = res.attrs.get("lnmeta", {}).get("tissue", {})
        fr = res.frame
        return cls(mask=np.asarray(res.data) > 0, downsample=fr.downsample,
                   slide_mpp=fr.slide_mpp, threshold=float(info.get("threshold", float("nan"))),
                   method=str(info.get("method", "unknown")), origin=tuple(fr.origin),
                   slide=fr.slide, slide_shape=fr.slide_shape,
                   params=dict(info.get("params", {})))


# ------------------------------------------------------------------------------------------
# Integral-image box fractions (shared with the patch grid's mask/polygon restriction)
# ------------------------------------------------------------------------------------------
def integral_image(mask: np.ndarray) -> np.ndarray:
    """``S[i, j] = mask[:i, :j].sum()`` with a zero first row and column (float64)."""
    s = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=s[1:, 1:])
    return s


def _bilinear(s: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    # The integral of a piecewise-constant image over [0, y) x [0, x) is bilinear inside
    # each cell, so interpolating S at fractional positions is exact.
    hmax, wmax = s.shape[0] - 1, s.shape[1] - 1
    y = np.clip(y, 0, hmax)
    x = np.clip(x, 0, wmax)
    y0 = np.minimum(np.floor(y).astype(np.int64), max(hmax - 1, 0))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(wmax - 1, 0))
    y1 = np.minimum(y0 + 1, hmax)
    x1 = np.minimum(x0 + 1, wmax)
    fy = y - y0
    fx = x - x0
    return (s[y0, x0] * (1 - fy) * (1 - fx) + s[y1, x0] * fy * (1 - fx)
            + s[y0, x1] * (1 - fy) * fx + s[y1, x1] * fy * fx)


def box_fractions(integral: np.ndarray, coords: np.ndarray, size: float | tuple[float, float],
                  *, downsample: float, origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Mean of a mask over level-0 boxes, from its :func:`integral_image`.

    Parameters
    ----------
    integral
        :func:`integral_image` of a mask whose pixel ``(i, j)`` covers level-0
        ``[origin + i * downsample, origin + (i + 1) * downsample)``.
    coords
        ``(N, 2)`` level-0 ``(row, col)`` of the boxes' top-left corners.
    size
        Box ``(height, width)`` in level-0 pixels (or one number for squares).

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float64 in [0, 1]; area outside the mask counts as 0.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    h, w = (float(size), float(size)) if np.isscalar(size) else (float(size[0]), float(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"box size must be positive, got {size}")
    ya = (coords[:, 0] - origin[0]) / downsample
    xa = (coords[:, 1] - origin[1]) / downsample
    yb = ya + h / downsample
    xb = xa + w / downsample
    tot = (_bilinear(integral, yb, xb) - _bilinear(integral, ya, xb)
           - _bilinear(integral, yb, xa) + _bilinear(integral, ya, xa))
    area = (h / downsample) * (w / downsample)
    return np.clip(tot / area, 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# Pixel scores
# ------------------------------------------------------------------------------------------
def ink_pixels(rgb: np.ndarray) -> np.ndarray:
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
BLACK_INK_CORE = 60
#: ... or below this with a saturation under BLACK_INK_GREY_SAT % (dark grey) ...
BLACK_INK_GREY = 120
BLACK_INK_GREY_SAT = 12
#: ... and below this on the blurred rim around the core
BLACK_INK_RIM = 150


def black_ink(rgb: np.ndarray, *, min_core_px: int = 12, rim_px: int = 3,
              val: np.ndarray | None = None) -> np.ndarray:
    """Black (or very dark) marker-pen pixels of an ``(H, W, 3)`` low-resolution image.

    Ink is far darker than H&E at 8-16 µm/px (its brightest channel stays below
    :data:`BLACK_INK_CORE`, where dense tumour is above 70) or, for thin strokes blurred
    with the glass, dark and grey (below :data:`BLACK_INK_GREY` with a saturation under
    12 %, where H&E that dark is strongly tinted): connected cores of at least
    ``min_core_px`` such pixels are ink, and so is the ink's blurred rim, the pixels
    within ``rim_px`` of a core whose brightest channel is below :data:`BLACK_INK_RIM`.
    Thin strokes and crosses alike: only darkness and adjacency are used. ``val`` is
    the brightest channel when the caller has it already.
    """
    rgb = np.asarray(rgb)
    if val is None:
        val, _ = _max_min(rgb)
    out = np.zeros(val.shape, dtype=bool)
    found = _black_ink_box(rgb, val, min_core_px=min_core_px, rim_px=rim_px)
    if found is not None:
        box, ink = found
        out[box] = ink
    return out


def _black_ink_box(rgb: np.ndarray, val: np.ndarray, *, min_core_px: int = 12,
                   rim_px: int = 3) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """:func:`black_ink` on the box around the ink only: ``(box, ink pixels in it)``, or
    ``None`` when there is no ink. Work scales with the dark pixels, not the image."""
    from scipy import ndimage as ndi

    h, w = val.shape
    # very dark, or dark grey (a thin stroke blurred with the glass): H&E this dark is
    # strongly tinted (haematoxylin), ink and its blur are not. Dark pixels are few:
    # they are examined by index.
    idx = np.flatnonzero(val < BLACK_INK_GREY)
    if idx.size == 0:
        return None
    v = val.reshape(-1)[idx]
    px = rgb.reshape(-1, 3)[idx]
    mn = np.minimum(np.minimum(px[:, 0], px[:, 1]), px[:, 2])
    vi = v.astype(np.int32)
    is_core = (v < BLACK_INK_CORE) | ((vi - mn) * 100 < BLACK_INK_GREY_SAT * vi)
    idx = idx[is_core]
    if idx.size < max(min_core_px, 1):
        return None  # no connected core can be large enough
    ys, xs = np.divmod(idx, w)
    # the cores' bounding box plus the rim: dilation there equals the whole image's
    y0, y1 = max(int(ys[0]) - rim_px, 0), min(int(ys[-1]) + 1 + rim_px, h)
    x0, x1 = max(int(xs.min()) - rim_px, 0), min(int(xs.max()) + 1 + rim_px, w)
    ink = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    # groups of cores with empty rows or columns between them are never connected:
    # each group is labelled on its own bounding box
    found = False
    for sel in _separate(ys, xs, _INK_BAND_GAP):
        if sel.size < max(min_core_px, 1):
            continue  # too few core pixels in the group for a large core
        gy, gx = ys[sel], xs[sel]
        r0, c0 = int(gy.min()), int(gx.min())
        core = np.zeros((int(gy.max()) + 1 - r0, int(gx.max()) + 1 - c0), dtype=bool)
        core[gy - r0, gx - c0] = True
        lab, n = ndi.label(core)
        big = np.bincount(lab[core], minlength=n + 1) >= min_core_px
        big[0] = False
        if big.any():
            found = True
            ink[r0 - y0:r0 - y0 + core.shape[0], c0 - x0:c0 - x0 + core.shape[1]] |= \
                _lookup(big, lab)
    if not found:
        return None
    # each large core grown by the disk, kept where dark: the union over marks equals
    # the dilation of their union (the disk never reaches past the box's rim margin)
    if rim_px > 0:  # the disk of dilate(), r² + r / 2
        dark = val[y0:y1, x0:x1]
        rim = [(box, grown & (dark[box] < BLACK_INK_RIM))
               for box, grown in _dilated_boxes(ink, rim_px)]
        for box, grown in rim:
            ink[box] |= grown
    return (slice(y0, y1), slice(x0, x1)), ink


#: empty rows or columns that separate two groups :func:`_black_ink_box` labels apart
_INK_BAND_GAP = 16


def _separate(ys: np.ndarray, xs: np.ndarray, gap: int, depth: int = 4) -> list[np.ndarray]:
    """Indices of the points ``(ys, xs)`` in groups separated by more than ``gap`` empty
    rows or columns (cut along rows, then columns, and so on, ``depth`` times): no
    point of one group touches a point of another."""
    def cut(v: np.ndarray, sel: np.ndarray) -> list[np.ndarray]:
        order = sel[np.argsort(v[sel], kind="stable")]
        return np.split(order, np.flatnonzero(np.diff(v[order]) > gap) + 1)

    groups = [np.arange(ys.size)]
    for level in range(depth):
        v = ys if level % 2 == 0 else xs
        nxt = [part for sel in groups for part in cut(v, sel)]
        if len(nxt) == len(groups) and level > 0:
            break
        groups = nxt
    return groups


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # channel-wise maximum/minimum: much faster than reducing over a length-3 last axis
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` in [0, 1] (float32; 0 for black)."""
    mx, mn = _max_min(rgb)
    return _sat(mx, mn)


def _sat(mx: np.ndarray, mn: np.ndarray, diff: np.ndarray | None = None) -> np.ndarray:
    # one float32 pass (mx >= mn, so the difference never wraps)
    return np.divide(mx - mn if diff is None else diff, np.maximum(mx, 1), dtype=np.float32)


#: columns per strip of :func:`_gaussian`'s vertical pass
_BLUR_STRIP = 64


def _gaussian(score: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(score, sigma, truncate=2.0)`` of a 2-D float32 image,
    the same numbers, faster on large images.

    scipy filters along rows (axis 0) first, then along columns, each pass rounded to
    float32. Its row pass walks columns with a stride of a whole row, which is several
    times slower than the column pass; here it runs on contiguous copies of narrow
    column strips (the filter treats every column alone, so a strip's columns come out
    exactly as in the whole image), and the column pass runs in place on the whole
    result as ``gaussian_filter`` does.
    """
    from scipy import ndimage as ndi

    score = np.asarray(score)
    if score.ndim != 2 or score.dtype != np.float32 or score.shape[1] <= 2 * _BLUR_STRIP:
        return ndi.gaussian_filter(score, sigma, truncate=2.0)
    return _strip_gaussian(score.shape, lambda cols: np.ascontiguousarray(score[:, cols]),
                           sigma)


def _strip_gaussian(shape: tuple[int, int], strip, sigma: float) -> np.ndarray:
    """:func:`_gaussian` of the float32 image whose column strips ``strip(cols)`` makes
    (contiguous): the image itself is never held whole."""
    from scipy import ndimage as ndi

    out = np.empty(shape, dtype=np.float32)
    for j in range(0, shape[1], _BLUR_STRIP):
        cols = slice(j, j + _BLUR_STRIP)
        out[:, cols] = ndi.gaussian_filter1d(strip(cols), sigma, axis=0, truncate=2.0)
    return ndi.gaussian_filter1d(out, sigma, axis=1, truncate=2.0, output=out)


def _score_image(shape: tuple[int, int], strip, sigma: float) -> np.ndarray:
    """The float32 image whose column strips ``strip(cols)`` makes, blurred as
    :func:`_gaussian` when ``sigma > 0`` (made and blurred strip by strip: the unblurred
    image is never held whole), else made whole."""
    if sigma > 0:
        return _strip_gaussian(shape, strip, sigma)
    return strip(slice(None))


_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0).astype(np.float32)


def optical_density_sum(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density ``-sum(log(I / 255))`` over R, G, B (float32, never inf)."""
    return _OD_LUT[rgb[..., 0]] + _OD_LUT[rgb[..., 1]] + _OD_LUT[rgb[..., 2]]


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
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


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of a 1-D sample (NaN-free).

    A constant sample has no threshold; just below its value is returned so the floor
    of :data:`MIN_THRESHOLD` decides (all tissue, or none for a blank image).
    """
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("inf")
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return lo - 1e-6
    return otsu_threshold(values)


def tissue_mask_from_rgb(rgb: np.ndarray, *, method: str = "otsu",
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
        Drop marker pen: black ink (:func:`black_ink`, dark cores and their rims,
        also left out of the threshold's sample) and saturated green/blue pixels
        (:func:`ink_pixels`; H&E is pink/purple).
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
    if method not in METHODS:
        raise InputError(f"unknown tissue method {method!r} (choose from {', '.join(METHODS)})")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    val, mn = _max_min(rgb)
    diff = val - mn  # never wraps: val >= mn
    allowed = val >= dark
    if valid is not None:
        allowed &= np.asarray(valid, dtype=bool)
    if pen:  # black ink is neither tissue nor part of the threshold's sample
        ink = _black_ink_box(rgb, val)
        if ink is not None:
            allowed[ink[0]] &= ~ink[1]
    # a grayscale image with content (not a blank/black one: that is "no tissue" below)
    if method in ("otsu", "hsv") and int(diff.max()) <= 2 and \
            float((allowed & (val < 230)).mean()) > 0.001:
        raise InputError("the image is grayscale (R = G = B): saturation-based tissue detection "
                         f"(method {method!r}) needs a stained colour slide; use method 'od'")
    sigma = float(blur_sigma) if blur_sigma and blur_sigma > 0 else 0.0
    if method == "od":
        score = _score_image(val.shape, lambda cols: optical_density_sum(rgb[:, cols]), sigma)
    else:
        score = _score_image(val.shape, lambda cols: _sat(np.ascontiguousarray(val[:, cols]),
                                                          None,
                                                          np.ascontiguousarray(diff[:, cols])),
                             sigma)
    if method == "hsv":
        thr = float(sat_min if threshold is None else threshold)
        v = _score_image(val.shape, lambda cols: val[:, cols].astype(np.float32) / 255.0, sigma)
        fg = (score > thr) & (v < value_max)
    else:
        if threshold is None:
            sample = score[allowed]
            if sample.size > 1_000_000:  # Otsu on a regular subsample: same histogram
                sample = sample[:: sample.size // 1_000_000 + 1]
            thr = max(_otsu(sample), MIN_THRESHOLD[method])
        else:
            thr = float(threshold)
        fg = score > thr
    fg &= allowed
    if pen:
        # green (hue ~0.2-0.5) or blue (~0.55-0.68), clearly saturated: ink, not H&E
        # H&E has red or blue as its brightest channel and red above green
        # saturation > 0.25 <=> 4 (max - min) > max <=> max - min > max // 4, exactly:
        # a float32 quotient of 8-bit integers is never within rounding of 0.25 unless
        # it equals it
        cand = fg & (diff > (val >> 2))
        cand &= rgb[..., 1] >= rgb[..., 0]
        if cand.any():
            fg[cand] = ~ink_pixels(rgb[cand])
    return fg, float(thr)


# ------------------------------------------------------------------------------------------
# Whole-slide tissue mask
# ------------------------------------------------------------------------------------------
def _bounds_valid(slide: Slide, shape: tuple[int, int], downsample: float) -> np.ndarray | None:
    bounds = getattr(slide, "bounds", None)
    if not bounds:
        return None
    by, bx, bh, bw = bounds
    valid = np.zeros(shape, dtype=bool)
    y0, x0 = int(math.floor(by / downsample)), int(math.floor(bx / downsample))
    y1, x1 = int(math.ceil((by + bh) / downsample)), int(math.ceil((bx + bw) / downsample))
    valid[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return valid


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """The rows and columns that hold ``mask``'s pixels, grown by ``margin`` (clipped)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(axis=0))
    h, w = mask.shape
    return (slice(max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)),
            slice(max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)))


#: labels per block of :func:`_label_sizes` (its int64 copy stays in cache)
_SIZE_BLOCK = 1 << 18


def _label_sizes(lab: np.ndarray, n: int) -> np.ndarray:
    """``np.bincount(lab.ravel(), minlength=n + 1)``, block by block (same counts)."""
    flat = lab.reshape(-1)
    sizes = np.zeros(n + 1, dtype=np.intp)
    for i in range(0, flat.size, _SIZE_BLOCK):
        sizes += np.bincount(flat[i:i + _SIZE_BLOCK], minlength=n + 1)
    return sizes


def _lookup(table: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """``table[lab]`` for a bool table, block by block (same values)."""
    flat = lab.reshape(-1)
    out = np.empty(flat.size, dtype=bool)
    for i in range(0, flat.size, _SIZE_BLOCK):
        np.take(table, flat[i:i + _SIZE_BLOCK], out=out[i:i + _SIZE_BLOCK])
    return out.reshape(lab.shape)


def clean_mask(mask: np.ndarray, *, min_object_px: float, max_hole_px: float) -> np.ndarray:
    """Fill holes smaller than ``max_hole_px`` and drop objects smaller than ``min_object_px``.

    Holes and objects are 4-connected. Only the bounding box of the mask is labelled:
    background outside it reaches the image border, and so does any background
    component touching the box's edge, so neither is ever a hole, and every object
    lies inside.
    """
    out = np.array(mask, dtype=bool)  # a copy: the caller's mask is never modified
    box = _bbox(out)
    if box is None:
        return out
    out[box] = _clean_box(out[box], min_object_px=min_object_px, max_hole_px=max_hole_px)
    return out


def _clean_box(out: np.ndarray, *, min_object_px: float, max_hole_px: float) -> np.ndarray:
    from scipy import ndimage as ndi

    if max_hole_px > 0:
        lab, n = ndi.label(~out)
        if n:
            small = _label_sizes(lab, n) < max_hole_px
            small[0] = False
            # background touching the border is never a hole
            small[lab[0]] = False
            small[lab[-1]] = False
            small[lab[:, 0]] = False
            small[lab[:, -1]] = False
            if small.any():
                out = out | _lookup(small, lab)
    if min_object_px > 1:
        lab, n = ndi.label(out)
        if n:
            # tissue is the smaller part: count its pixels only
            keep = np.bincount(lab[out], minlength=n + 1) >= min_object_px
            keep[0] = False
            if not keep[1:].all():
                out = _lookup(keep, lab)
    return out


def _half_width(radius: int, dy: int) -> int:
    # largest dx with dy² + dx² <= r² + r / 2 (the disk of dilate)
    lim = radius * radius + radius * 0.5 - dy * dy
    dx = math.isqrt(int(lim))
    while (dx + 1) ** 2 <= lim:
        dx += 1
    while dx > 0 and dx * dx > lim:
        dx -= 1
    return dx


def _hdilate(mask: np.ndarray, half: int) -> np.ndarray:
    """Dilation along rows by the segment ``[-half, half]`` (outside counts as False)."""
    out = mask.copy()
    reach = 0
    while reach < half:  # doubling: reach 1, 3, 7, ... then the remainder
        step = min(reach + 1, half - reach)
        src = out.copy()
        out[:, step:] |= src[:, :-step]
        out[:, :-step] |= src[:, step:]
        reach += step
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of ``radius`` pixels (``dy² + dx² <= r² + r / 2``).

    The disk is a stack of horizontal segments: the dilation is the union, over rows
    ``dy`` of the disk, of the mask dilated along rows by that row's segment and shifted
    by ``dy`` (exactly :func:`scipy.ndimage.binary_dilation` with the disk, outside the
    image counting as background). Only the bounding boxes of bands of rows holding
    the mask (grown by the radius) are worked on.
    """
    if radius <= 0:
        return mask
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    for box, grown in _dilated_boxes(mask, radius):
        out[box] = grown
    return out


def _dilated_boxes(mask: np.ndarray, radius: int):
    """:func:`dilate` band by band: ``(box, dilation inside it)`` for disjoint boxes outside
    which the dilation is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return
    h, w = mask.shape
    # bands of rows further apart than the disk's diameter grow independently (and
    # their boxes, grown by the radius, do not overlap)
    cuts = np.flatnonzero(np.diff(rows) > 2 * radius + 1)
    starts = np.concatenate([[rows[0]], rows[cuts + 1]])
    stops = np.concatenate([rows[cuts], [rows[-1]]]) + 1
    for r0, r1 in zip(starts.tolist(), stops.tolist(), strict=True):
        cols = np.flatnonzero(mask[r0:r1].any(axis=0))
        y0, y1 = max(r0 - radius, 0), min(r1 + radius, h)
        x0, x1 = max(int(cols[0]) - radius, 0), min(int(cols[-1]) + 1 + radius, w)
        box = (slice(y0, y1), slice(x0, x1))
        yield box, _dilate_box(mask[box], radius)


def _dilate_box(m: np.ndarray, radius: int) -> np.ndarray:
    h = m.shape[0]
    by_half: dict[int, np.ndarray] = {}
    grown = np.zeros(m.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        half = _half_width(radius, dy)
        if half not in by_half:
            by_half[half] = _hdilate(m, half)
        seg = by_half[half]
        # grown[y] |= seg[y - dy]
        if dy >= 0:
            grown[dy:] |= seg[:h - dy]
        else:
            grown[:h + dy] |= seg[-dy:]
    return grown


def low_res(slide: Slide, target_mpp: float | None, *,
            max_size: int = 4096) -> tuple[np.ndarray, float]:
    """:meth:`Slide.low_res`: a file level near ``target_mpp``, or a synthetic level
    built once per open, tile by tile, when the file has none (never level 0 whole)."""
    return slide.low_res(target_mpp, max_size=max_size)


def tissue_mask(slide: Slide, *, target_mpp: float = 10.0, method: str = "otsu",
                threshold: float | None = None, min_object_um2: float = 20_000.0,
                max_hole_um2: float = 250_000.0, dilate_um: float = 16.0,
                pen: bool = True, dark: int = 30,
                sat_min: float = 0.07, value_max: float = 0.8, max_size: int = 4096,
                allow_empty: bool = False) -> TissueMask:
    """Detect tissue on a low-resolution level of ``slide``.

    Parameters
    ----------
    slide
        An open :class:`~napari_lnmeta.io.slide.Slide`.
    target_mpp
        µm/px of the level to analyse (the nearest pyramid level is used; 8–16 is
        plenty). Without a known µm/px the level whose longest side is at most
        ``max_size`` is used.
    method, threshold, pen, dark, sat_min, value_max
        See :func:`tissue_mask_from_rgb`.
    min_object_um2
        Connected tissue pieces smaller than this (µm²) are dropped (dust, debris).
    max_hole_um2
        Holes in tissue smaller than this (µm²) are filled (nuclei-poor, pale areas;
        tumour clusters can be paler than the node around them). Without a µm/px both
        areas are taken as fractions of the image: ``min_object`` 0.05 %,
        ``max_hole`` 0.5 %.
    dilate_um
        The mask is grown by this margin (µm; at least one mask pixel when positive)
        so that tissue edges, which blur into the background at low resolution, are
        kept. Without a µm/px, one mask pixel.
    max_size
        Longest side of the analysed image is kept near this many pixels.
    allow_empty
        Return an empty mask instead of raising when no tissue is found.

    Returns
    -------
    TissueMask

    Raises
    ------
    InputError
        Blank or black slide ("no tissue found at threshold ..."), an image too small
        to analyse, a grayscale slide with a colour method, an unknown method.
    """
    if method not in METHODS:
        raise InputError(f"unknown tissue method {method!r} (choose from {', '.join(METHODS)})")
    if not target_mpp or target_mpp <= 0:
        raise InputError(f"target µm/px must be positive, got {target_mpp}")
    h0, w0 = slide.shape
    if min(h0, w0) < MIN_MASK_SIDE:
        raise InputError(f"{slide.name}: image of {w0}x{h0} px is too small for tissue "
                         f"detection (needs at least {MIN_MASK_SIDE} px a side)")
    rgb, ds = low_res(slide, target_mpp, max_size=max_size)
    if min(rgb.shape[:2]) < MIN_MASK_SIDE and ds > 1:
        # too coarse for this (small) slide: go finer so that objects stay resolvable
        finer = target_mpp * min(rgb.shape[:2]) / (4 * MIN_MASK_SIDE)
        rgb, ds = slide.low_res(finer if slide.mpp else None, max_size=max_size)
    valid = _bounds_valid(slide, rgb.shape[:2], ds)
    mask, thr = tissue_mask_from_rgb(rgb, method=method, threshold=threshold, pen=pen, dark=dark,
                                     sat_min=sat_min, value_max=value_max, valid=valid)
    mpp = slide.mpp
    if mpp is not None:
        px_um2 = (mpp * ds) ** 2
        min_px, hole_px = min_object_um2 / px_um2, max_hole_um2 / px_um2
    else:
        min_px, hole_px = 0.0005 * mask.size, 0.005 * mask.size
    mask = clean_mask(mask, min_object_px=min_px, max_hole_px=hole_px)
    radius = 0
    if dilate_um and dilate_um > 0:
        radius = max(1, round(dilate_um / (mpp * ds))) if mpp is not None else 1
        mask = dilate(mask, radius)
        if valid is not None:
            mask &= valid
    label = {"otsu": "saturation (Otsu)", "od": "optical density (Otsu)",
             "hsv": "saturation (HSV)"}[method]
    if not mask.any() and not allow_empty:
        dark_frac = float((rgb.max(axis=-1) < dark).mean())
        why = ("the slide is almost entirely black" if dark_frac > 0.9 else
               "the slide looks blank" if float(rgb.min(axis=-1).mean()) > 220 else
               "try another method or a lower threshold")
        raise InputError(f"{slide.name}: no tissue found at threshold {thr:.3g} of {label} "
                         f"({why})")
    return TissueMask(mask=mask, downsample=float(ds), slide_mpp=mpp, threshold=thr,
                      method=method, slide=slide.name, slide_shape=tuple(slide.shape),
                      params={"target_mpp": target_mpp, "min_object_um2": min_object_um2,
                              "max_hole_um2": max_hole_um2, "pen": pen, "dark": dark,
                              "dilate_um": dilate_um, "dilate_px": radius,
                              "min_object_px": float(min_px), "max_hole_px": float(hole_px)})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, np.integer)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Re-use: one tissue mask per slide and parameters within a process
# --------------------------------------------------------------------------------------
#: the last few masks computed, keyed by :func:`tissue_key`
_CACHE: dict[tuple, TissueMask] = {}
_CACHE_SIZE = 4


def tissue_key(slide: Slide, **params: Any) -> tuple:
    """What makes two tissue masks equal: the file (path, size, mtime), its µm/px and every
    parameter of :func:`tissue_mask` (defaults filled in)."""
    import inspect

    bound = inspect.signature(tissue_mask).bind(slide, **params)
    bound.apply_defaults()
    args = tuple(sorted((k, v) for k, v in bound.arguments.items() if k != "slide"))
    p = Path(slide.path)
    try:
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    return (str(p.resolve()), stamp, slide.mpp, args)


def cached_tissue(slide: Slide, **params: Any) -> TissueMask | None:
    """The mask already computed in this process for this slide and parameters, if any."""
    return _CACHE.get(tissue_key(slide, **params))


def remember_tissue(slide: Slide, mask: TissueMask, **params: Any) -> None:
    """Keep ``mask`` for :func:`cached_tissue` (the last few only)."""
    key = tissue_key(slide, **params)
    _CACHE.pop(key, None)
    _CACHE[key] = mask
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))


def tissue_mask_job(slide: Slide, **params: Any):
    """:func:`tissue_mask` as a job that answers Cancel at once and re-uses a mask already
    computed in this process with the same parameters (the Tissue & stain widget's mask
    serves Detect metastases)."""
    from ..progress import Progress, in_thread

    hit = cached_tissue(slide, **params)
    if hit is not None:
        yield Progress(1, 1, "tissue (already computed)")
        return hit
    tm = yield from in_thread(tissue_mask, slide, message="detecting tissue", **params)
    remember_tissue(slide, tm, **params)
    return tm
