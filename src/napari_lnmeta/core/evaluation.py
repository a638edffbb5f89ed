"""Per-slide, patch-level evaluation of a heatmap against a tumour mask (seed 000).

Every analysed patch gets a ground-truth label from the fraction of its level-0 box that
the mask covers, with seed 000's rule: **positive** when more than 20 % of the patch is
tumour, **negative** when none of it is, and *ambiguous* in between (left out of the
metrics and counted). The prediction is ``p > 0.5`` (the binary map). The metrics are
those of :mod:`napari_lnmeta.core.metrics` (ACC, SEN, SPE, PPV, NPV, F1, weighted F1,
ROC AUC and the confusion counts), with undefined ratios as ``None`` so the result is
plain JSON.

The truth may be anything :func:`napari_lnmeta.io.annotations.load_labels` reads (an
OME-Zarr mask, a mask image covering the slide, CAMELYON16 ASAP XML, the NCRF JSON,
QuPath GeoJSON, ROI CSV, a :class:`~napari_lnmeta.io.annotations.LabelMask` or a list of
its polygons), a ``(array, SlideFrame)`` pair, a
:class:`~napari_lnmeta.core.tissue.TissueMask`, or a list of ``(N, 2)`` level-0
``(row, col)`` polygons. In labelled files, classes whose name says tumour
("tumour", "Tumor", "metastasis", "_0"/"_1" in ASAP...) are tumour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from ..io.frame import SlideFrame

#: seed 000: a patch is positive when more than this fraction of it is tumour
POSITIVE_FRACTION = 0.2
#: substrings of class names that mean tumour
TUMOUR_WORDS = ("tum", "metast", "positive", "cancer", "carcinom", "malignan")


@dataclass
class PatchBoxes:
    """Level-0 boxes of the analysed patches and their heatmap cells."""

    coords: np.ndarray      # (N, 2) top-left (row, col), level-0
    size0: float            # patch side, level-0 pixels
    cells: np.ndarray       # (N, 2) heatmap cells
    slide_shape: tuple[int, int]
    slide_mpp: float | None = None

    @classmethod
    def from_frame(cls, scored: np.ndarray, frame: SlideFrame, size0: float,
                   slide_shape: tuple[int, int]) -> PatchBoxes:
        """Boxes of the scored cells of a heatmap whose cells are centred on their patch."""
        cells = np.argwhere(np.asarray(scored, dtype=bool)).astype(np.int64)
        off = (size0 - frame.downsample) / 2
        coords = np.asarray(frame.origin, np.float64) + cells * frame.downsample - off
        return cls(coords=coords, size0=float(size0), cells=cells,
                   slide_shape=tuple(slide_shape), slide_mpp=frame.slide_mpp)


def tumour_values(names: dict[int, str]) -> list[int]:
    """Raster values whose class is tumour (by name; else every non-negative class)."""
    from ..io.annotations import NEGATIVE_NAMES

    hits = [v for v, n in names.items() if any(w in n.lower() for w in TUMOUR_WORDS)]
    if hits:
        return hits
    return [v for v, n in names.items() if n.lower() not in NEGATIVE_NAMES]


def truth_fractions(truth: Any, boxes: PatchBoxes, *, scale: float = 1.0) -> np.ndarray:
    """Fraction of each patch box covered by tumour in ``truth`` (see module docstring).

    ``scale`` (slide pixels per file pixel) brings polygon files drawn at another
    resolution onto the slide (e.g. ``1/32`` for CAMELYON16 polygons on a level-5 image).
    """
    from ..io.annotations import LabelMask, Polygon, load_labels
    from ..io.frame import SlideFrame
    from .tissue import TissueMask, box_fractions, integral_image

    coords, size0 = boxes.coords, boxes.size0
    if isinstance(truth, TissueMask):
        return truth.fractions(coords, size0)
    if isinstance(truth, tuple) and len(truth) == 2 and isinstance(truth[1], SlideFrame):
        arr, fr = np.asarray(truth[0]) > 0, truth[1]
        return box_fractions(integral_image(arr), coords, size0, downsample=fr.downsample,
                             origin=fr.origin)
    if isinstance(truth, (list, tuple)) and truth and not isinstance(truth[0], Polygon):
        truth = [Polygon(np.asarray(p, dtype=np.float64)) for p in truth]
    if isinstance(truth, (str, Path)) and not Path(truth).exists():
        raise InputError(f"{truth}: no such ground-truth file")
    if not isinstance(truth, LabelMask):
        # polygons are rasterised at 1/8 patch (at most 16384 px a side)
        ds = max(size0 / 8, max(boxes.slide_shape) / 16384, 1.0)
        truth = load_labels(truth, slide_shape=boxes.slide_shape, slide_mpp=boxes.slide_mpp,
                            scale=scale, downsample=ds)
    values = tumour_values(truth.names)
    mask = np.isin(truth.labels, values)
    fr = truth.frame
    return box_fractions(integral_image(mask), coords, size0, downsample=fr.downsample,
                         origin=fr.origin)


def check_truth(truth: Any, *, slide_shape: tuple[int, int], slide_mpp: float | None = None,
                scale: float = 1.0) -> None:
    """Read a ground-truth file once, coarsely, so a bad one fails before any long work.

    Raises :class:`~napari_lnmeta.errors.InputError` naming the file and the problem;
    in-memory sources (masks, polygons) are left to :func:`truth_fractions`.
    """
    from ..io.annotations import load_labels

    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"truth scale {scale!r} must be a finite number > 0")
    if not isinstance(truth, (str, Path)):
        return
    if not Path(truth).exists():
        raise InputError(f"{truth}: no such ground-truth file")
    load_labels(truth, slide_shape=slide_shape, slide_mpp=slide_mpp, scale=scale,
                downsample=max(max(slide_shape) / 2048, 1.0))


def _none_for_nan(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def evaluate_heatmap(prob: np.ndarray, boxes: PatchBoxes, truth: Any, *,
                     threshold: float = 0.5, positive_fraction: float = POSITIVE_FRACTION,
                     negative_fraction: float = 0.0, scale: float = 1.0) -> dict[str, Any]:
    """Patch-level metrics of a heatmap against a tumour mask (seed 000's whole-slide test).

    Parameters
    ----------
    prob
        Probability heatmap.
    boxes
        The analysed patches (:meth:`PatchBoxes.from_frame`, or from a patch grid).
    truth
        Tumour ground truth (see module docstring).
    threshold
        Predicted positive when ``p > threshold`` (the binary map).
    positive_fraction, negative_fraction
        A patch is positive when its tumour fraction is above ``positive_fraction``,
        negative when at most ``negative_fraction``; others are ambiguous and left out.
    scale
        Slide pixels per file pixel for polygon files.

    Returns
    -------
    dict
        :func:`napari_lnmeta.core.metrics.binary_metrics` (``ACC``, ``SEN``, ``SPE``,
        ``PPV``, ``NPV``, ``F1``, ``F1_weighted``, ``AUC``, ``TP``, ``FP``, ``TN``,
        ``FN``, ``n``) plus ``n_positive``, ``n_negative``, ``n_ambiguous`` and the rule.
    """
    from .metrics import binary_metrics

    if len(boxes.cells) == 0:
        raise InputError("no analysed patch to evaluate")
    frac = truth_fractions(truth, boxes, scale=scale)
    p = np.asarray(prob, dtype=np.float64)[boxes.cells[:, 0], boxes.cells[:, 1]]
    pos = frac > positive_fraction + 1e-9
    neg = frac <= negative_fraction + 1e-9
    keep = pos | neg
    if not keep.any():
        raise InputError("no patch is clearly tumour or clearly not (all are ambiguous)")
    y = pos[keep].astype(np.int64)
    out = _none_for_nan(binary_metrics(y, p[keep], y_pred=(p[keep] > threshold).astype(np.int64)))
    out.update({"n_positive": int(y.sum()), "n_negative": int(len(y) - y.sum()),
                "n_ambiguous": int((~keep).sum()), "threshold": float(threshold),
                "positive_fraction": positive_fraction, "negative_fraction": negative_fraction,
                "rule": f"positive if tumour > {positive_fraction:.0%} of the patch, negative "
                        f"if <= {negative_fraction:.0%}, others left out (seed 000)"})
    return out
