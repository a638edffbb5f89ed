"""Maps derived from a probability heatmap: binary map, seed-000 3-tier map, slide score, overview.

A heatmap is a 2-D float grid with one cell per patch-grid position (see
:meth:`napari_lnmeta.core.tiling.PatchGrid.frame`), plus a boolean ``scored`` grid that
says which cells were analysed (tissue). Cells that were not analysed hold 0.

Seed 000's visual aid, reproduced exactly:

* **binary map**: ``p > 0.5`` in red;
* **3-tier map**: red for ``p > 0.9`` (high), green for ``0.7 < p <= 0.9`` (medium), blue
  for ``0.5 < p <= 0.7`` (low); nothing below. The three tiers partition the binary map.

Seed 004's slide score is the maximum of the heatmap; the mean of the ``top_k`` highest
cells is reported beside it because a single cell is noisy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..io.frame import SlideFrame
    from ..io.slide import Slide

#: p above this is "tumour" in the binary map (seed 000)
BINARY_THRESHOLD = 0.5
#: lower bounds (exclusive) of the low, medium and high tiers (seed 000)
TIER_BOUNDS = (0.5, 0.7, 0.9)
#: label values of the 3-tier Labels map
TIER_LOW, TIER_MEDIUM, TIER_HIGH = 1, 2, 3
TIER_NAMES = {TIER_LOW: "low (0.5-0.7)", TIER_MEDIUM: "medium (0.7-0.9)", TIER_HIGH: "high (>0.9)"}
#: RGBA colours (0-255) of the 3-tier map: blue, green, red (seed 000, Figure 4E)
TIER_COLORS: dict[int, tuple[int, int, int, int]] = {
    TIER_LOW: (0, 0, 255, 255),
    TIER_MEDIUM: (0, 255, 0, 255),
    TIER_HIGH: (255, 0, 0, 255),
}
#: label value and colour of the binary map (red, seed 000 Figure 4D)
BINARY_LABEL = 1
BINARY_COLORS: dict[int, tuple[int, int, int, int]] = {BINARY_LABEL: (255, 0, 0, 255)}
#: the probability heatmap's colour map: (position, RGBA in [0, 1]); low values are
#: transparent so the slide stays visible under a heatmap at full opacity
HEATMAP_COLORMAP: list[tuple[float, tuple[float, float, float, float]]] = [
    (0.0, (0.0, 0.0, 0.5, 0.0)),
    (0.3, (0.0, 0.3, 1.0, 0.25)),
    (0.5, (0.0, 0.9, 0.9, 0.6)),
    (0.7, (1.0, 1.0, 0.0, 0.85)),
    (1.0, (1.0, 0.0, 0.0, 1.0)),
]


def binary_map(prob: np.ndarray, threshold: float = BINARY_THRESHOLD) -> np.ndarray:
    """uint8 labels: :data:`BINARY_LABEL` where ``prob > threshold``, else 0."""
    return (np.asarray(prob, dtype=np.float32) > threshold).astype(np.uint8) * BINARY_LABEL


def tier_map(prob: np.ndarray, bounds: tuple[float, float, float] = TIER_BOUNDS) -> np.ndarray:
    """uint8 labels of the seed-000 3-tier map.

    ``0`` for ``p <= 0.5``, :data:`TIER_LOW` (blue) for ``0.5 < p <= 0.7``,
    :data:`TIER_MEDIUM` (green) for ``0.7 < p <= 0.9``, :data:`TIER_HIGH` (red) above 0.9.
    """
    p = np.asarray(prob, dtype=np.float32)
    lo, mid, hi = bounds
    out = np.zeros(p.shape, dtype=np.uint8)
    out[p > lo] = TIER_LOW
    out[p > mid] = TIER_MEDIUM
    out[p > hi] = TIER_HIGH
    return out


def tier_counts(tiers: np.ndarray) -> dict[str, int]:
    """Cells per tier, keyed ``"low"``, ``"medium"``, ``"high"``."""
    c = np.bincount(np.asarray(tiers, dtype=np.uint8).ravel(), minlength=4)
    return {"low": int(c[TIER_LOW]), "medium": int(c[TIER_MEDIUM]), "high": int(c[TIER_HIGH])}


def slide_score(prob: np.ndarray, scored: np.ndarray | None = None, *,
                top_k: int = 10) -> dict[str, Any]:
    """Slide-level scores: the heatmap maximum (seed 004) and the mean of the top ``k`` cells.

    Parameters
    ----------
    prob
        Probability grid.
    scored
        Cells that were analysed (others are ignored); all cells when ``None``.
    top_k
        How many of the highest cells to average.

    Returns
    -------
    dict
        ``{"max", "top_k_mean", "top_k", "argmax"}``; ``argmax`` is the ``(row, col)``
        cell of the maximum. Scores are ``None`` when no cell was analysed.
    """
    p = np.asarray(prob, dtype=np.float32)
    vals = p[scored] if scored is not None else p.ravel()
    if vals.size == 0:
        return {"max": None, "top_k_mean": None, "top_k": int(top_k), "argmax": None}
    k = max(1, min(int(top_k), vals.size))
    top = np.partition(vals, vals.size - k)[vals.size - k:]
    masked = np.where(scored, p, -np.inf) if scored is not None else p
    am = np.unravel_index(int(np.argmax(masked)), p.shape)
    return {"max": float(vals.max()), "top_k_mean": float(top.mean()), "top_k": k,
            "argmax": [int(am[0]), int(am[1])]}


def to_storage(prob: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """Probabilities in their storage type: ``float16`` or ``uint8`` (``round(p * 255)``)."""
    p = np.clip(np.asarray(prob, dtype=np.float32), 0.0, 1.0)
    if dtype == "float16":
        return p.astype(np.float16)
    if dtype == "uint8":  # no NaN in uint8: unknown cells are 0 (see analysed.ome.zarr)
        return np.round(np.nan_to_num(p, nan=0.0) * 255).astype(np.uint8)
    if dtype == "float32":
        return p
    raise ValueError(f"heatmap dtype must be 'float16', 'uint8' or 'float32', got {dtype!r}")


def from_storage(arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_storage`: float32 probabilities in [0, 1]."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def cell_index_map(frame: SlideFrame, grid_shape: tuple[int, int], out_shape: tuple[int, int],
                   out_downsample: tuple[float, float]) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray, np.ndarray]:
    """For an image whose pixel ``(r, c)`` covers level-0 ``[r*dy, (r+1)*dy) x [c*dx, ...)``,
    the heatmap cell under each pixel centre.

    Returns
    -------
    (rows, cols, row_ok, col_ok)
        Cell row per image row, cell column per image column, and which are inside the grid.
    """
    dy, dx = out_downsample
    yc = (np.arange(out_shape[0]) + 0.5) * dy
    xc = (np.arange(out_shape[1]) + 0.5) * dx
    ri = np.floor((yc - frame.origin[0]) / frame.downsample).astype(np.int64)
    ci = np.floor((xc - frame.origin[1]) / frame.downsample).astype(np.int64)
    rok = (ri >= 0) & (ri < grid_shape[0])
    cok = (ci >= 0) & (ci < grid_shape[1])
    return np.clip(ri, 0, grid_shape[0] - 1), np.clip(ci, 0, grid_shape[1] - 1), rok, cok


def overview_image(slide: Slide, tiers: np.ndarray, frame: SlideFrame, *, max_size: int = 2048,
                   alpha: float = 0.5, lesions: np.ndarray | None = None,
                   scored: np.ndarray | None = None) -> np.ndarray:
    """A slide thumbnail with the 3-tier map blended on top (and lesion markers).

    Parameters
    ----------
    slide
        The slide the heatmap was computed on (a low-resolution level is read).
    tiers
        :func:`tier_map` output on the heatmap grid.
    frame
        The heatmap's frame.
    max_size
        Longest side of the thumbnail in pixels.
    alpha
        Opacity of the tier colours.
    lesions
        Optional ``(N, 2)`` level-0 ``(row, col)`` lesion centres, drawn as black rings.
    scored
        Optional analysed-cells grid; its outline is drawn in grey so the analysed area
        is visible.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8.
    """
    from PIL import Image, ImageDraw

    h0, w0 = slide.shape
    want = max(h0, w0) / max_size
    # the same level as Slide.low_res, read directly when it is a file level (no dask)
    from .tissue import low_res

    thumb, _ = low_res(slide, want * slide.mpp if slide.mpp else None, max_size=max_size)
    img = Image.fromarray(thumb)
    if max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.BILINEAR)
    base = np.asarray(img.convert("RGB"))
    th, tw = base.shape[:2]
    dy, dx = h0 / th, w0 / tw
    ri, ci, rok, cok = cell_index_map(frame, tiers.shape, (th, tw), (dy, dx))
    lab = tiers[ri[:, None], ci[None, :]]
    lab = np.where(rok[:, None] & cok[None, :], lab, 0)
    lut = np.zeros((256, 3), np.float32)
    for k, c in TIER_COLORS.items():
        lut[k] = c[:3]
    on = lab > 0
    edge = None
    if scored is not None:
        sc = scored[ri[:, None], ci[None, :]] & rok[:, None] & cok[None, :]
        edge = sc ^ _erode(sc)
    # only coloured pixels are blended (in float); the others are the thumbnail as read
    touched = on | edge if edge is not None else on
    rgb = base[touched].astype(np.float32)
    on_t = on[touched]
    rgb[on_t] = (1 - alpha) * rgb[on_t] + alpha * lut[lab[touched][on_t]]
    if edge is not None:
        e_t = edge[touched]
        rgb[e_t] = 0.5 * rgb[e_t] + 0.5 * np.array([90, 90, 90], np.float32)
    blended = base.copy()
    blended[touched] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    out = Image.fromarray(blended)
    if lesions is not None and len(lesions):
        draw = ImageDraw.Draw(out)
        r = max(4, round(max_size / 200))
        for y, x in np.asarray(lesions, dtype=np.float64):
            cy, cx = (y + 0.5) / dy, (x + 0.5) / dx
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(0, 0, 0), width=2)
    return np.asarray(out)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, constant_values=False)
    return (m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])


def write_png(path, rgb: np.ndarray, *, overwrite: bool = False) -> None:
    """Write an RGB array as PNG, atomically."""
    import io

    from PIL import Image

    from ..io.atomic import write_bytes_atomic

    buf = io.BytesIO()
    # zlib level 1: a quarter of the default's encoding time for a ~10 % larger file
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False, compress_level=1)
    write_bytes_atomic(path, buf.getvalue(), overwrite=overwrite)
