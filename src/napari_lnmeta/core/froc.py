"""CAMELYON16 evaluation: slide-level ROC AUC and lesion-level FROC (seed 004).

The rules are those of the challenge's evaluation code (``Evaluation_FROC.py``), so
that scores are comparable with the published ones:

* **Ground-truth regions.** The tumour mask (or the polygons, rasterised at
  :attr:`FrocConfig.eval_mpp`, 7.776 µm/px = CAMELYON16 level 5 by default) is dilated
  by 75 µm "the equivalent of 5 tumour cells": as in the reference code, every pixel
  closer than ``dilation_um / 2`` to tumour joins it (so a region's diameter grows by
  ``dilation_um``), holes are filled, and 8-connected components are labelled. Each
  component is one tumour region.
* **Isolated tumour cells (ITC).** A region whose major axis (of the equivalent
  ellipse, ``skimage.measure.regionprops``) is shorter than ``itc_um + dilation_um``
  (200 + 75 = 275 µm, the reference code's threshold on the dilated region) is an ITC
  region: it is neither a hit nor a miss, and a detection inside it is ignored (not a
  false positive).
* **Matching.** A detection (a point with a probability) inside a tumour region is a
  true positive for that region; the region's score is the highest probability among
  its detections and the others are *duplicates*, ignored (not false positives). A
  detection outside every region is a false positive. On a slide without tumour every
  detection is a false positive.
* **FROC.** Thresholds as the reference code builds them: the false-positive
  probabilities plus one float32 entry per region label (its score; 0 for a missed or
  ITC region), distinct, sorted, the lowest dropped. At threshold ``t`` sensitivity =
  regions whose float32 score is ``>= float32(t)`` / all non-ITC regions of all slides,
  and average FPs per slide = false positives with ``p >= t`` / number of slides; the
  curve starts at (0, 0) and keeps every point (repeated FP values included). The
  sensitivities at 1/4, 1/2, 1, 2, 4 and 8 FPs per slide are read on that whole curve
  by ``numpy.interp`` (as the reference code; beyond the last point the curve's final
  sensitivity), and the **FROC score** is their mean. A mask covers the slide: its
  regions do not grow past its edge (polygons are rasterised over their own window).
* **Slide-level ROC.** A slide is positive when its ground truth has any tumour (ITC
  included, as in the challenge's ``reference.csv``); its score is the prediction's
  slide score (``summary.json``: heatmap maximum by default) or, without one, the
  highest detection probability. AUC with a stratified bootstrap 95 % CI
  (:func:`napari_lnmeta.train.metrics.auc_bootstrap_ci`).

Ground truth for a slide comes from a mask (OME-Zarr written by lnmeta, PNG/TIFF covering
the slide, a :class:`~napari_lnmeta.io.annotations.LabelMask` or ``(array, SlideFrame)``)
or from polygons (CAMELYON16 ASAP XML, NCRF JSON, QuPath GeoJSON; tumour classes by name,
see :func:`napari_lnmeta.core.evaluation.tumour_values`). A file with no tumour (an empty
FeatureCollection, ``{"positive": []}``, an all-zero mask) is an explicit *negative*
slide. A slide with no ground-truth file is never assumed negative: it is skipped unless
listed in ``negatives``.

Everything here is Qt-free; :func:`evaluate_folders_job` is the progress generator that
``lnmeta evaluate-slides`` and the *Evaluate* widget run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LnmetaError, OutputExistsError
from ..io import jsonio
from ..io.omezarr import SlideFrame
from ..progress import Job, Progress

#: the challenge's dilation of the annotations (µm): regions grow by this in diameter
DILATION_UM = 75.0
#: isolated tumour cells: regions smaller than this (µm, before dilation)
ITC_UM = 200.0
#: average false positives per slide at which FROC sensitivity is read
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: CAMELYON16 evaluation masks are level 5 of a 0.243 µm/px scan
CAMELYON_LEVEL5_MPP = 0.243 * 32
#: outcome of a detection
HIT, DUPLICATE, ITC, FP = "TP", "duplicate", "ITC", "FP"
REPORT_FORMAT = "lnmeta-camelyon16-evaluation"
#: files written by :func:`write_report`
REPORT_FILES = ("report.json", "slides.csv", "detections.csv", "roc.png", "froc.png")

_POLYGON_SUFFIXES = (".xml", ".json", ".geojson")
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
_TRUTH_STRIP = ("_evaluation_mask", "_tumor_mask", "_tumour_mask", "_mask", "_annotations",
                "_annotation", "_truth", "_gt")
_PRED_STRIP = ("_lesions", "_detections", "_predictions")


@dataclass
class FrocConfig:
    """Parameters of the CAMELYON16 evaluation (defaults: the challenge's).

    Attributes
    ----------
    dilation_um
        Growth of each annotated region's diameter (µm): pixels closer than
        ``dilation_um / 2`` to tumour join it.
    itc_um
        Regions whose major axis is below ``itc_um + dilation_um`` after dilation are ITC.
    fp_rates
        Average FPs per slide at which the sensitivity is read.
    eval_mpp
        µm/px at which polygons are rasterised; finer masks are reduced to about this
        (``None``: polygons at level-5-equivalent, masks as they are).
    truth_scale
        Slide pixels per polygon-file pixel (``1/32`` for level-0 CAMELYON polygons on
        a level-5 slide).
    mpp
        Level-0 µm/px of the slides when the predictions do not say (flat files).
    mask_downsample
        Level-0 pixels per mask pixel of PNG/TIFF masks when the slide size is unknown.
    lesions
        Where detections come from in a prediction folder: ``"file"`` (its
        ``lesions.geojson``), ``"nms"`` or ``"components"`` (recomputed from its heatmap).
    lesion_threshold, lesion_radius_um
        Parameters of a recomputation.
    score
        Slide score key of ``summary.json`` (``"max"`` or ``"top_k_mean"``).
    slide_threshold
        Slide score above which a slide is called positive (ACC/SEN/SPE in the report).
    n_boot, seed
        Bootstrap replicates and seed of the AUC confidence interval.
    """

    dilation_um: float = DILATION_UM
    itc_um: float = ITC_UM
    fp_rates: tuple[float, ...] = FP_RATES
    eval_mpp: float | None = CAMELYON_LEVEL5_MPP
    truth_scale: float = 1.0
    mpp: float | None = None
    mask_downsample: float | None = None
    lesions: str = "file"
    lesion_threshold: float = 0.5
    lesion_radius_um: float = 200.0
    score: str = "max"
    slide_threshold: float = 0.5
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self):
        if self.lesions not in ("file", "nms", "components"):
            raise InputError(f"lesions must be 'file', 'nms' or 'components', got "
                             f"{self.lesions!r}")
        if self.dilation_um < 0 or self.itc_um < 0:
            raise InputError("dilation and ITC size must be >= 0 µm")
        self.fp_rates = tuple(float(r) for r in self.fp_rates)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp_rates"] = list(self.fp_rates)
        return d


# --------------------------------------------------------------------------------------
# Ground-truth regions
# --------------------------------------------------------------------------------------
@dataclass
class Regions:
    """Labelled evaluation regions of one slide (dilated, filled, 8-connected).

    Attributes
    ----------
    labels
        ``(H, W)`` int32 raster; 0 outside every region, ``k`` in region ``k``.
    frame
        Where the raster lies on the slide (gives its µm/px).
    major_axis_um
        ``(K,)`` major axis of each region after dilation (µm); region ``k`` is entry
        ``k - 1``.
    itc
        ``(K,)`` bool: region is isolated tumour cells.
    """

    labels: np.ndarray
    frame: SlideFrame
    major_axis_um: np.ndarray
    itc: np.ndarray
    source: str = ""

    @property
    def n_regions(self) -> int:
        return int(len(self.itc))

    @property
    def n_tumours(self) -> int:
        """Regions that count (not ITC)."""
        return int((~self.itc).sum())

    @property
    def n_itc(self) -> int:
        return int(self.itc.sum())

    def region_at(self, coords: np.ndarray) -> np.ndarray:
        """Region label under level-0 ``(row, col)`` points (0 outside the raster)."""
        c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        d = float(self.frame.downsample)
        idx = np.floor((c + 0.5 - np.asarray(self.frame.origin, np.float64)) / d).astype(np.int64)
        h, w = self.labels.shape
        ok = (idx[:, 0] >= 0) & (idx[:, 0] < h) & (idx[:, 1] >= 0) & (idx[:, 1] < w)
        out = np.zeros(len(c), dtype=np.int64)
        out[ok] = self.labels[idx[ok, 0], idx[ok, 1]]
        return out


def evaluation_regions(mask: np.ndarray, frame: SlideFrame, *, dilation_um: float = DILATION_UM,
                       itc_um: float = ITC_UM, source: str = "",
                       clip_to_mask: bool = True) -> Regions:
    """Dilate, fill and label a tumour mask, and mark its ITC regions (module docstring).

    Parameters
    ----------
    mask
        2-D bool (or integer, non-zero = tumour) raster.
    frame
        Its frame on the slide; ``frame.mpp`` (slide µm/px × downsample) must be known.
    clip_to_mask
        The mask covers the slide: regions do not grow past its edge, and a background
        pocket between a region and the edge is not a hole (as in the challenge's code,
        which works on the whole level-5 mask). ``False`` for a raster that is only a
        window around rasterised polygons.
    """
    from scipy import ndimage as ndi
    from skimage.measure import regionprops

    mpp = frame.mpp
    if mpp is None:
        raise InputError(f"{source or 'ground truth'}: the slide's µm/px is unknown, so the "
                         "75 µm dilation and the 200 µm ITC size cannot be applied (pass --mpp)")
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise InputError(f"{source or 'ground truth'}: expected a 2-D mask, got {m.shape}")
    radius_px = dilation_um / 2.0 / mpp
    pad = int(math.ceil(radius_px)) + 1
    d = float(frame.downsample)
    oy, ox = frame.origin
    full_h, full_w = m.shape
    y0 = x0 = 0
    if m.any():  # only the tumour's bounding box (plus the margin) is worked on
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        y0, x0 = int(rows[0]), int(cols[0])
        m = m[y0:int(rows[-1]) + 1, x0:int(cols[-1]) + 1]
        oy, ox = oy + y0 * d, ox + x0 * d
    m = np.pad(m, pad)
    origin = (oy - pad * d, ox - pad * d)
    if not m.any():
        lab = np.zeros(m.shape, np.int32)
    else:
        grown = ndi.distance_transform_edt(~m) < radius_px if radius_px > 0 else m.copy()
        if clip_to_mask:  # nothing grows past the mask's edge
            r0, c0 = max(0, pad - y0), max(0, pad - x0)
            r1, c1 = pad - y0 + full_h, pad - x0 + full_w
            inside = np.zeros_like(grown)
            inside[r0:max(r0, r1), c0:max(c0, c1)] = True
            grown &= inside
        filled = ndi.binary_fill_holes(grown)
        lab, _ = ndi.label(filled, structure=np.ones((3, 3), bool))
        lab = lab.astype(np.int32)
    props = regionprops(lab)
    major = np.array([p.axis_major_length * mpp for p in props], dtype=np.float64)
    itc = major < (itc_um + dilation_um)
    fr = SlideFrame(downsample=d, origin=origin, slide_mpp=frame.slide_mpp, slide=frame.slide,
                    slide_shape=frame.slide_shape)
    return Regions(labels=lab, frame=fr, major_axis_um=major, itc=itc, source=source)


def _tumour_mask_of(lm) -> np.ndarray:
    from .evaluation import tumour_values

    values = tumour_values(lm.names) if lm.names else []
    if not values:
        return np.zeros(lm.labels.shape, bool)
    return np.isin(lm.labels, values)


def _reduce(mask: np.ndarray, frame: SlideFrame, eval_mpp: float | None) -> tuple[np.ndarray, SlideFrame]:
    """Reduce a mask finer than ``eval_mpp`` by an integer factor ('any' in each block)."""
    mpp = frame.mpp
    if eval_mpp is None or mpp is None or mpp * 1.5 > eval_mpp:
        return mask, frame
    f = int(eval_mpp // mpp)
    if f < 2:
        return mask, frame
    h, w = mask.shape
    hh, ww = -(-h // f) * f, -(-w // f) * f
    m = np.zeros((hh, ww), bool)
    m[:h, :w] = mask
    red = m.reshape(hh // f, f, ww // f, f).any(axis=(1, 3))
    return red, SlideFrame(downsample=frame.downsample * f, origin=frame.origin,
                           slide_mpp=frame.slide_mpp, slide=frame.slide,
                           slide_shape=frame.slide_shape)


def _polygons_mask(polys, *, slide_mpp: float | None, eval_mpp: float | None,
                   dilation_um: float, source: str) -> tuple[np.ndarray, SlideFrame] | None:
    """Rasterise tumour polygons over their bounding box (plus the dilation margin)."""
    from ..io.annotations import NEGATIVE_NAMES, rasterize
    from .evaluation import tumour_values

    if not polys:
        return None
    names = {i: n for i, n in enumerate(dict.fromkeys(p.label for p in polys), 1)}
    tumour_names = {names[v] for v in tumour_values(names)}
    tum = [p for p in polys if p.label in tumour_names and p.label.lower() not in NEGATIVE_NAMES]
    if not tum:
        return None
    if slide_mpp is None:
        raise InputError(f"{source}: the slide's µm/px is unknown, so polygons cannot be "
                         "rasterised for the 75 µm / 200 µm rules (pass --mpp)")
    d = max(1.0, (eval_mpp or CAMELYON_LEVEL5_MPP) / slide_mpp)
    v = np.concatenate([p.vertices for p in tum])
    margin = (dilation_um / 2 / slide_mpp) + 2 * d
    y0, x0 = np.floor((v.min(axis=0) - margin) / d) * d
    y1, x1 = v.max(axis=0) + margin
    shape = (int(math.ceil((y1 - y0) / d)) + 1, int(math.ceil((x1 - x0) / d)) + 1)
    frame = SlideFrame(downsample=d, origin=(float(y0), float(x0)), slide_mpp=slide_mpp)
    # negative classes (CAMELYON16 "_2" exclusions) are drawn last and cut holes
    tum_ids = {id(p) for p in tum}
    keep = [p for p in polys if id(p) in tum_ids or p.label.lower() in NEGATIVE_NAMES]
    arr, nm = rasterize(keep, frame, shape)
    tumour_values_ = [k for k, n in nm.items() if n in tumour_names]
    return np.isin(arr, tumour_values_), frame


def check_same_frame(regions: Regions | None, slide_shape: tuple[int, int] | None, *,
                     source: str = "ground truth", tolerance: float = 0.02) -> None:
    """Refuse ground truth that does not lie on the slide the detections belong to.

    The tumour regions (before the dilation margin) must lie inside the slide's level-0
    extent, give or take ``tolerance`` of its size: CAMELYON16 polygons in level-0
    coordinates against a 1/32 slide land 32× too far and are refused here instead of
    giving FROC 0 and a false positive for every detection.
    """
    if regions is None or slide_shape is None or not regions.labels.any():
        return
    pad = regions.frame.downsample  # the dilation margin reaches a little past the tumour
    lab = regions.labels > 0
    rows, cols = np.flatnonzero(lab.any(axis=1)), np.flatnonzero(lab.any(axis=0))
    d, (oy, ox) = regions.frame.downsample, regions.frame.origin
    y0, y1 = oy + rows[0] * d, oy + (rows[-1] + 1) * d
    x0, x1 = ox + cols[0] * d, ox + (cols[-1] + 1) * d
    _check_bbox((y0, x0, y1, x1), slide_shape, source=source,
                margin=pad + _margin_px(regions), tolerance=tolerance)


def _check_bbox(bbox, slide_shape, *, source: str, margin: float = 0.0,
                tolerance: float = 0.02) -> None:
    y0, x0, y1, x1 = bbox
    h, w = slide_shape
    my, mx = tolerance * h + margin, tolerance * w + margin
    if y0 < -my or x0 < -mx or y1 > h + my or x1 > w + mx:
        raise InputError(
            f"{source}: the tumour lies at rows {y0:.0f}-{y1:.0f}, cols {x0:.0f}-{x1:.0f} "
            f"(level-0 px), outside the {h}×{w} px slide the detections are on: truth and "
            "detections do not share a frame (e.g. polygons in level-0 coordinates of the "
            "full scan against a low-resolution slide: set the truth scale, e.g. 1/32)")


def check_detections_on_slide(coords: np.ndarray, slide_shape: tuple[int, int] | None, *,
                              source: str = "detections", tolerance: float = 0.02) -> None:
    """Refuse detections most of which lie outside the slide (another frame)."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if slide_shape is None or not len(c):
        return
    h, w = slide_shape
    out = ((c[:, 0] < -tolerance * h) | (c[:, 0] > h * (1 + tolerance))
           | (c[:, 1] < -tolerance * w) | (c[:, 1] > w * (1 + tolerance)))
    if out.mean() > 0.5:
        raise InputError(
            f"{source}: {int(out.sum())} of {len(c)} detections lie outside the {h}×{w} px "
            "slide: detections and slide do not share a frame (level-0 pixels expected)")


def _check_polygons(polys, slide_shape, *, source: str) -> None:
    """:func:`check_same_frame` for polygons, before they are rasterised (cheap)."""
    if slide_shape is None or not polys:
        return
    v = np.concatenate([p.vertices for p in polys])
    y0, x0 = v.min(axis=0)
    y1, x1 = v.max(axis=0)
    _check_bbox((y0, x0, y1, x1), slide_shape, source=source)


def _margin_px(regions: Regions) -> float:
    mpp = regions.frame.slide_mpp
    return 0.0 if not mpp else DILATION_UM / 2 / mpp


def load_truth(source: Any, *, slide_mpp: float | None = None,
               slide_shape: tuple[int, int] | None = None,
               config: FrocConfig | None = None) -> Regions | None:
    """Evaluation regions of one slide, or ``None`` for an explicitly tumour-free slide.

    As :func:`_load_truth`, then :func:`check_same_frame` when the slide's shape is known.
    """
    regions = _load_truth(source, slide_mpp=slide_mpp, slide_shape=slide_shape, config=config)
    name = str(source) if isinstance(source, (str, Path)) else "ground truth"
    check_same_frame(regions, slide_shape, source=name)
    return regions


def _load_truth(source: Any, *, slide_mpp: float | None = None,
                slide_shape: tuple[int, int] | None = None,
                config: FrocConfig | None = None) -> Regions | None:
    """Evaluation regions of one slide, or ``None`` for an explicitly tumour-free slide.

    Parameters
    ----------
    source
        A polygon file (``.xml`` ASAP, ``.json`` NCRF / GeoJSON, ``.geojson``), a mask
        (``.zarr`` OME-Zarr, ``.png``/``.tif`` covering the slide), a
        :class:`~napari_lnmeta.io.annotations.LabelMask`, an ``(array, SlideFrame)``
        pair, or a list of :class:`~napari_lnmeta.io.annotations.Polygon`.
    slide_mpp, slide_shape
        Level-0 µm/px and ``(height, width)`` of the slide (from the prediction); a PNG
        or TIFF mask needs the shape (or ``config.mask_downsample``).
    """
    from ..io.annotations import LabelMask, Polygon, read_label_raster, read_polygons

    cfg = config or FrocConfig()
    mpp = slide_mpp if slide_mpp is not None else cfg.mpp
    name = str(source) if isinstance(source, (str, Path)) else type(source).__name__
    reg = dict(dilation_um=cfg.dilation_um, itc_um=cfg.itc_um, source=name)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], SlideFrame):
        arr, fr = np.asarray(source[0]) > 0, source[1]
        if fr.slide_mpp is None and mpp is not None:
            fr = SlideFrame(fr.downsample, fr.origin, mpp, fr.slide, fr.slide_shape)
        if not arr.any():
            return None
        return evaluation_regions(*_reduce(arr, fr, cfg.eval_mpp), **reg)
    if isinstance(source, LabelMask):
        fr = source.frame
        if fr.slide_mpp is None and mpp is not None:
            fr = SlideFrame(fr.downsample, fr.origin, mpp, fr.slide, fr.slide_shape)
        m = _tumour_mask_of(source)
        if not m.any():
            return None
        return evaluation_regions(*_reduce(m, fr, cfg.eval_mpp), **reg)
    if isinstance(source, (list, tuple)) and all(isinstance(p, Polygon) for p in source):
        _check_polygons(list(source), slide_shape, source=name)
        r = _polygons_mask(list(source), slide_mpp=mpp, eval_mpp=cfg.eval_mpp,
                           dilation_um=cfg.dilation_um, source=name)
        return None if r is None else evaluation_regions(*r, **reg, clip_to_mask=False)
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such ground-truth file")
    low = path.name.lower()
    if path.is_dir() or low.endswith(".zarr"):
        lm = read_label_raster(path)
        return _load_truth(lm, slide_mpp=mpp, slide_shape=slide_shape, config=cfg)
    if low.endswith(_MASK_SUFFIXES):
        shape0, read = _mask_levels(path)
        if cfg.mask_downsample:
            base = float(cfg.mask_downsample)
        elif slide_shape is not None:
            fy, fx = slide_shape[0] / shape0[0], slide_shape[1] / shape0[1]
            if abs(fy - fx) > 0.05 * max(fy, fx):
                raise InputError(
                    f"{path}: the mask ({shape0[0]}×{shape0[1]} px) does not have the aspect "
                    f"ratio of the slide ({slide_shape[0]}×{slide_shape[1]} px): it is not "
                    "this slide's mask, or not in its frame")
            base = (fy + fx) / 2
        else:
            raise InputError(f"{path}: the slide size is unknown, so the mask's resolution is "
                             "unknown (give --mask-downsample, e.g. 32 for a level-5 mask)")
        want = cfg.eval_mpp / (mpp * base) if (cfg.eval_mpp and mpp) else 1.0
        arr, level_ds = read(want)
        fr = SlideFrame(downsample=base * level_ds, slide_mpp=mpp,
                        slide_shape=None if slide_shape is None else tuple(slide_shape))
        return _load_truth((arr > 0, fr), slide_mpp=mpp, config=cfg)
    if low.endswith(_POLYGON_SUFFIXES):
        if _is_empty_annotation(path):
            return None
        polys = read_polygons(path, scale=cfg.truth_scale)
        _check_polygons(polys, slide_shape, source=str(path))
        r = _polygons_mask(polys, slide_mpp=mpp, eval_mpp=cfg.eval_mpp,
                           dilation_um=cfg.dilation_um, source=str(path))
        return None if r is None else evaluation_regions(*r, **reg, clip_to_mask=False)
    raise InputError(f"{path}: unknown ground-truth format (expected .xml, .json, .geojson, "
                     ".png, .tif or an OME-Zarr mask)")


def _mask_levels(path: Path):
    """``(level-0 shape, read)`` of a mask image; ``read(want)`` returns the coarsest
    pyramid level whose downsample is at most ``want`` (TIFF pyramids such as the
    CAMELYON16 masks) as a 2-D array, with that downsample."""
    low = path.name.lower()
    if low.endswith((".tif", ".tiff")):
        import tifffile

        from ..io.annotations import mask_problem

        with tifffile.TiffFile(path) as tf:
            s = tf.series[0]
            shapes = [tuple(lv.shape[:2]) for lv in getattr(s, "levels", [s])]
            last = list(getattr(s, "levels", [s]))[-1]
            coarsest = last.asarray() if np.prod(last.shape[:2]) <= 4096 ** 2 else None
        why = None if coarsest is None else mask_problem(coarsest)
        if why is not None:
            raise InputError(f"{path}: {why}")

        def read_tiff(want: float) -> tuple[np.ndarray, float]:
            dss = [shapes[0][0] / sh[0] for sh in shapes]
            k = max((i for i, d in enumerate(dss) if d <= want * (1 + 1e-6)), default=0)
            with tifffile.TiffFile(path) as tf:
                ser = tf.series[0]
                arr = list(getattr(ser, "levels", [ser]))[k].asarray()
            return (arr[..., 0] if arr.ndim == 3 else arr), dss[k]

        return shapes[0], read_tiff
    from PIL import Image

    from ..io.annotations import mask_problem

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except OSError as e:
        raise InputError(f"{path}: not a readable mask image ({e})") from e
    why = mask_problem(arr)
    if why is not None:
        raise InputError(f"{path}: {why}")
    arr = arr[..., 0] if arr.ndim == 3 else arr
    return arr.shape[:2], lambda _want: (arr, 1.0)


def _is_empty_annotation(path: Path) -> bool:
    """True for an annotation file that explicitly holds no region."""
    import xml.etree.ElementTree as ET

    low = path.name.lower()
    try:
        if low.endswith(".xml"):
            root = ET.parse(path).getroot()
            return not any(True for _ in root.iter("Coordinate"))
        d = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, ET.ParseError) as e:
        raise InputError(f"{path}: cannot read the annotation ({e})") from e
    if isinstance(d, dict) and ({"positive", "negative"} & set(d)):
        return not (d.get("positive") or [])
    if isinstance(d, dict) and d.get("type") == "FeatureCollection":
        return not (d.get("features") or [])
    return isinstance(d, list) and not d


# --------------------------------------------------------------------------------------
# Matching detections to regions
# --------------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """The detections of one slide matched against its regions.

    Attributes
    ----------
    slide
        Slide key (lower-case name without suffixes).
    is_tumour
        The ground truth has tumour (ITC included).
    coords, probability
        ``(N, 2)`` level-0 ``(row, col)`` and ``(N,)`` probabilities of the detections.
    region
        ``(N,)`` region label hit by each detection (0: none).
    outcome
        ``(N,)`` ``"TP"``, ``"duplicate"``, ``"ITC"`` or ``"FP"``.
    region_score
        ``(K,)`` highest probability among each region's detections (0: missed).
    regions
        The regions (``None`` for a tumour-free slide).
    score
        Slide score used for the ROC.
    """

    slide: str
    is_tumour: bool
    coords: np.ndarray
    probability: np.ndarray
    region: np.ndarray
    outcome: np.ndarray
    region_score: np.ndarray
    regions: Regions | None
    score: float
    score_source: str = ""
    name: str = ""
    prediction: str = ""
    truth: str = ""
    slide_mpp: float | None = None

    @property
    def n_tumours(self) -> int:
        return 0 if self.regions is None else self.regions.n_tumours

    @property
    def n_itc(self) -> int:
        return 0 if self.regions is None else self.regions.n_itc

    def counts(self) -> dict[str, int]:
        o = self.outcome
        return {"detections": int(len(o)), "tumours": self.n_tumours, "itc": self.n_itc,
                "hits": int((o == HIT).sum()), "missed": self.n_tumours - int((o == HIT).sum()),
                "duplicates": int((o == DUPLICATE).sum()),
                "itc_detections": int((o == ITC).sum()), "fp": int((o == FP).sum())}

    def summary_row(self) -> dict[str, Any]:
        c = self.counts()
        sens = c["hits"] / c["tumours"] if c["tumours"] else None
        return {"slide": self.name or self.slide, "status": "evaluated",
                "label": "tumour" if self.is_tumour else "normal", "score": self.score,
                **c, "sensitivity": sens,
                "max_probability": float(self.probability.max()) if len(self.probability) else None,
                "prediction": self.prediction, "truth": self.truth, "reason": ""}

    def detection_rows(self) -> list[dict[str, Any]]:
        return [{"slide": self.name or self.slide, "index": i, "row": float(r), "col": float(c),
                 "probability": float(p), "outcome": str(o), "region": int(g),
                 "itc_region": bool(self.regions is not None and g > 0
                                    and self.regions.itc[g - 1])}
                for i, ((r, c), p, o, g) in enumerate(zip(self.coords, self.probability,
                                                          self.outcome, self.region, strict=True))]


def match_detections(coords: np.ndarray, probability: np.ndarray, regions: Regions | None, *,
                     slide: str = "slide", score: float | None = None,
                     score_source: str = "", is_tumour: bool | None = None) -> SlideResult:
    """Match detections to the regions of one slide (rules in the module docstring).

    Parameters
    ----------
    coords, probability
        Level-0 ``(row, col)`` and probability of each detection.
    regions
        :func:`evaluation_regions` / :func:`load_truth` output; ``None`` for a slide
        without tumour.
    score
        Slide score; default the highest detection probability (0 without detections).
    is_tumour
        Slide label for the ROC; default: the ground truth has a region.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    if len(c) != len(p):
        raise InputError(f"{slide}: {len(c)} detections but {len(p)} probabilities")
    if not np.all(np.isfinite(p)):
        raise InputError(f"{slide}: detections without a probability (NaN)")
    n = len(p)
    outcome = np.full(n, FP, dtype=object)
    region = np.zeros(n, np.int64)
    k = 0 if regions is None else regions.n_regions
    best = np.zeros(k, np.float64)
    if regions is not None and n:
        region = regions.region_at(c)
        winner = np.full(k, -1, np.int64)
        # highest probability first; ties by input order
        for i in np.argsort(-p, kind="stable"):
            g = region[i]
            if g == 0:
                continue
            if regions.itc[g - 1]:
                outcome[i] = ITC
            elif winner[g - 1] < 0:
                winner[g - 1] = i
                best[g - 1] = p[i]
                outcome[i] = HIT
            else:
                outcome[i] = DUPLICATE
    if score is None:
        score, score_source = (float(p.max()) if n else 0.0), "max detection probability"
    tumour = (regions is not None and regions.n_regions > 0) if is_tumour is None else is_tumour
    region_score = best[~regions.itc] if regions is not None else best
    return SlideResult(slide=slide, is_tumour=bool(tumour), coords=c, probability=p,
                       region=region, outcome=outcome.astype(str), region_score=region_score,
                       regions=regions, score=float(score), score_source=score_source,
                       name=slide)


# --------------------------------------------------------------------------------------
# FROC and slide-level ROC
# --------------------------------------------------------------------------------------
def froc_curve(results: Sequence[SlideResult]) -> dict[str, np.ndarray]:
    """Average FPs per slide and sensitivity at every threshold, starting at (0, 0).

    The thresholds are built as the challenge's code builds them: the false-positive
    probabilities plus one entry per region label (its score stored as float32 — the
    highest probability among its detections, 0 for a missed region or an ITC region),
    made distinct, sorted, and the lowest dropped. At a threshold ``t`` a false positive
    counts when ``p >= t`` (float64) and a region when ``float32(score) >=
    float32(t)``; a region and a false positive of equal probability therefore give
    two thresholds when the probability is not exact in float32 (0.6 and
    ``float32(0.6)`` = 0.600000024).

    Returns ``{"fps", "sensitivity", "thresholds"}``, thresholds decreasing (the first is
    ``inf``): the challenge's curve reversed, every point kept (repeated FP values
    included).
    """
    n_slides = len(results)
    if n_slides == 0:
        raise InputError("no slide to evaluate")
    n_tum = sum(r.n_tumours for r in results)
    if n_tum == 0:
        raise InputError("no tumour region (other than isolated tumour cells) in the ground "
                         "truth: FROC needs at least one")
    fp = np.concatenate([r.probability[r.outcome == FP] for r in results] + [np.zeros(0)])
    # one float32 entry per region label; ITC labels enter the threshold list as 0
    tp32 = np.concatenate([np.asarray(r.region_score, np.float32) for r in results]
                          + [np.zeros(r.n_itc, np.float32) for r in results]
                          + [np.zeros(0, np.float32)])
    thr = np.unique(np.concatenate([fp.astype(np.float64), tp32.astype(np.float64)]))[1:][::-1]
    fp_s, tp_s = np.sort(fp.astype(np.float64)), np.sort(tp32)
    n_fp = len(fp_s) - np.searchsorted(fp_s, thr, side="left")
    n_tp = len(tp_s) - np.searchsorted(tp_s, thr.astype(np.float32), side="left")
    return {"fps": np.r_[0.0, n_fp / n_slides], "sensitivity": np.r_[0.0, n_tp / n_tum],
            "thresholds": np.r_[np.inf, thr]}


def froc_score(results: Sequence[SlideResult],
               fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Sensitivity at ``fp_rates`` average FPs per slide and their mean (the FROC score).

    Read as the challenge's code reads it: ``numpy.interp`` on the whole curve of
    :func:`froc_curve` (repeated FP values kept), so between two FP levels the line runs
    from the most sensitive point of the lower level to the *least* sensitive point of
    the next one; beyond the last point, the final sensitivity.
    """
    curve = froc_curve(results)
    fps, sens = curve["fps"], curve["sensitivity"]
    at = np.interp(np.asarray(fp_rates, dtype=np.float64), fps, sens)
    return {"score": float(at.mean()), "fp_rates": [float(v) for v in fp_rates],
            "sensitivity": [float(v) for v in at],
            "n_slides": len(results), "n_tumours": int(sum(r.n_tumours for r in results)),
            "n_itc": int(sum(r.n_itc for r in results)),
            "curve": {"fps": [float(v) for v in fps], "sensitivity": [float(v) for v in sens],
                      "thresholds": [None if math.isinf(v) else float(v)
                                     for v in curve["thresholds"]]}}


def slide_roc(results: Sequence[SlideResult], *, threshold: float = 0.5, n_boot: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Slide-level ROC AUC (bootstrap 95 % CI) and ACC/SEN/SPE at ``threshold``."""
    from ..train.metrics import auc_bootstrap_ci, binary_metrics

    y = np.array([int(r.is_tumour) for r in results], np.int64)
    s = np.array([r.score for r in results], np.float64)
    if len(y) == 0:
        raise InputError("no slide to evaluate")
    if y.min() == y.max():
        which = "tumour" if y[0] else "normal"
        raise InputError(f"all {len(y)} evaluated slides are {which}: the slide-level AUC "
                         "needs both tumour and normal slides")
    auc, lo, hi = auc_bootstrap_ci(y, s, n_boot=n_boot, seed=seed)
    m = binary_metrics(y, s, threshold=threshold)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
    return {"AUC": auc, "AUC_CI": [lo, hi], "n_boot": n_boot, "threshold": threshold,
            "n_tumour": int(y.sum()), "n_normal": int(len(y) - y.sum()),
            **{k: clean[k] for k in ("ACC", "SEN", "SPE", "PPV", "NPV", "TP", "FP", "TN", "FN")}}


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """Everything :func:`write_report` writes."""

    slides: list[SlideResult]
    config: FrocConfig
    skipped: list[dict[str, str]] = field(default_factory=list)
    froc: dict[str, Any] | None = None
    roc: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)

    def slide_rows(self, *, with_summary: bool = True) -> list[dict[str, Any]]:
        """One row per slide (evaluated, then skipped), then ``mean`` and ``sd`` rows."""
        rows = [r.summary_row() for r in self.slides]
        if with_summary and rows:
            num = ["score", "detections", "tumours", "itc", "hits", "missed", "duplicates",
                   "itc_detections", "fp", "sensitivity", "max_probability"]
            mean = {"slide": "mean", "status": "", "label": ""}
            sd = {"slide": "sd", "status": "", "label": ""}
            for k in num:
                v = np.array([r[k] for r in rows if r[k] is not None], np.float64)
                mean[k] = float(v.mean()) if len(v) else None
                sd[k] = float(v.std(ddof=1)) if len(v) > 1 else None
            extra = [mean, sd]
        else:
            extra = []
        skipped = [{"slide": s["slide"], "status": "skipped", "reason": s["reason"],
                    "prediction": s.get("prediction", ""), "truth": s.get("truth", "")}
                   for s in self.skipped]
        return rows + skipped + extra

    def detection_rows(self) -> list[dict[str, Any]]:
        return [d for r in self.slides for d in r.detection_rows()]

    def to_json(self) -> dict[str, Any]:
        slides = []
        for r in self.slides:
            row = r.summary_row()
            row["score_source"] = r.score_source
            if r.regions is not None:
                row["regions"] = [{"label": i + 1, "major_axis_um": float(a), "itc": bool(t)}
                                  for i, (a, t) in enumerate(zip(r.regions.major_axis_um,
                                                                 r.regions.itc, strict=True))]
            row["points"] = r.detection_rows()
            slides.append(row)
        return {"format": REPORT_FORMAT, "version": 1, "inputs": self.inputs,
                "config": self.config.to_json(),
                "rules": {"dilation_um": self.config.dilation_um,
                          "dilation_radius_um": self.config.dilation_um / 2,
                          "itc_major_axis_um": self.config.itc_um + self.config.dilation_um,
                          "text": "regions dilated by dilation_um/2 on every side, holes "
                                  "filled, 8-connected; ITC regions (dilated major axis < "
                                  "itc_um + dilation_um) are neither hits nor misses and "
                                  "detections in them are ignored; one hit per region, "
                                  "duplicates ignored; detections outside all regions are FPs"},
                "evaluated": len(self.slides), "skipped": self.skipped,
                "slide_level": self.roc, "froc": self.froc, "notes": self.notes,
                "slides": slides}


def summarise(results: Sequence[SlideResult], config: FrocConfig | None = None, *,
              skipped: Sequence[dict[str, str]] = (), notes: Sequence[str] = (),
              inputs: dict[str, str] | None = None) -> EvaluationReport:
    """FROC and slide-level ROC of matched slides; what cannot be computed becomes a note."""
    cfg = config or FrocConfig()
    rep = EvaluationReport(slides=list(results), config=cfg, skipped=list(skipped),
                           notes=list(notes), inputs=dict(inputs or {}))
    if not rep.slides:
        rep.notes.append("no slide could be evaluated (see 'skipped')")
        return rep
    try:
        rep.froc = froc_score(rep.slides, cfg.fp_rates)
    except InputError as e:
        rep.notes.append(f"FROC not computed: {e}")
    try:
        rep.roc = slide_roc(rep.slides, threshold=cfg.slide_threshold, n_boot=cfg.n_boot,
                            seed=cfg.seed)
    except InputError as e:
        rep.notes.append(f"slide-level AUC not computed: {e}")
    return rep


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def slide_key(name: str | Path, strip: Iterable[str] = ()) -> str:
    """Lower-case slide name without folders, format suffixes and ``strip`` endings."""
    n = Path(str(name)).name.lower()
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr", ".lnmeta"):
        if n.endswith(suf):
            n = n[: -len(suf)]
            break
    else:
        n = re.sub(r"\.[a-z0-9]{1,8}$", "", n)
    for s in strip:
        if n.endswith(s) and len(n) > len(s):
            n = n[: -len(s)]
            break
    return n


@dataclass
class SlidePrediction:
    """Detections and slide score of one slide, as read from a prediction folder or file."""

    slide: str
    name: str
    coords: np.ndarray
    probability: np.ndarray
    score: float | None
    score_source: str
    source: str
    slide_mpp: float | None = None
    slide_shape: tuple[int, int] | None = None


def _read_point_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Detections of a CSV: CAMELYON16 submission ``p, x, y`` (no header) or columns
    ``probability``/``confidence`` + ``x``/``y`` or ``row``/``col``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text CSV (byte {e.start} is not UTF-8)") from e
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not rows:
        return np.zeros((0, 2)), np.zeros(0)
    head = [c.strip().lower() for c in rows[0]]

    def num(v: str) -> float:
        try:
            f = float(v)
        except ValueError as e:
            raise InputError(f"{path}: {v!r} is not a number") from e
        if not math.isfinite(f):
            raise InputError(f"{path}: {v.strip()!r} is not a finite number")
        return f

    if all(_is_number(c) for c in head):
        data = [[num(c) for c in r[:3]] for r in rows]
        if any(len(r) < 3 for r in data):
            raise InputError(f"{path}: expected 'probability, x, y' on every line")
        a = np.asarray(data, np.float64).reshape(-1, 3)
        return a[:, [2, 1]], a[:, 0]

    def col(*names: str) -> int | None:
        for nm in names:
            for i, h in enumerate(head):
                if h == nm or h.startswith(nm + " "):
                    return i
        return None

    ip = col("probability", "confidence", "p", "score")
    ix, iy = col("x", "col", "column"), col("y", "row")
    if ip is None or ix is None or iy is None:
        raise InputError(f"{path}: expected columns probability (or confidence), x (or col) and "
                         f"y (or row); got {', '.join(rows[0])}")
    if any(len(r) <= max(ip, ix, iy) for r in rows[1:]):
        raise InputError(f"{path}: a line has fewer columns than the header")
    a = np.asarray([[num(r[ip]), num(r[iy]), num(r[ix])] for r in rows[1:]],
                   np.float64).reshape(-1, 3)
    return a[:, 1:3], a[:, 0]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_scores(path: Path) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    out: dict[str, float] = {}
    for r in rows:
        if len(r) < 2 or not _is_number(r[1].strip()):
            continue
        out[slide_key(r[0].strip())] = float(r[1])
    return out


def _recompute_lesions(folder: Path, cfg: FrocConfig) -> tuple[np.ndarray, np.ndarray]:
    from ..io.omezarr import read_ome_zarr
    from .heatmap import from_storage
    from .lesions import find_lesions

    res = read_ome_zarr(folder / "probability.ome.zarr")
    prob = from_storage(np.asarray(res.pyramid[0]))
    scored = None
    if (folder / "analysed.ome.zarr").exists():
        scored = np.asarray(read_ome_zarr(folder / "analysed.ome.zarr").pyramid[0]) > 0
    les = find_lesions(prob, res.frame, threshold=cfg.lesion_threshold,
                       radius_um=cfg.lesion_radius_um, scored=scored, method=cfg.lesions)
    return les.coords, les.probability.astype(np.float64)


def find_predictions(pred_dir: str | Path, config: FrocConfig | None = None
                     ) -> tuple[dict[str, SlidePrediction], list[dict[str, str]]]:
    """Predictions under ``pred_dir``, keyed by :func:`slide_key`, and what was skipped.

    * prediction folders (``summary.json`` of ``lnmeta predict`` / ``lnmeta batch``, at
      any depth up to 3): lesions from ``lesions.geojson`` (or recomputed from
      ``probability.ome.zarr`` with ``config.lesions``), slide score from the summary;
    * flat files ``<slide>.geojson`` (lesion points with a ``probability`` measurement)
      or ``<slide>.csv`` (CAMELYON16 submission ``p, x, y`` in level-0 pixels); slide
      scores from ``scores.csv`` (``slide, score``) when present, else the highest
      detection probability.
    """
    from .lesions import read_lesions_geojson

    cfg = config or FrocConfig()
    root = Path(pred_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such prediction folder")
    preds: dict[str, SlidePrediction] = {}
    skipped: list[dict[str, str]] = []

    def add(p: SlidePrediction):
        if p.slide in preds:
            skipped.append({"slide": p.name, "reason": f"a second prediction for this slide "
                            f"({p.source}); the first ({preds[p.slide].source}) is used",
                            "prediction": p.source, "truth": ""})
            return
        preds[p.slide] = p

    summaries = sorted(s for depth in ("*", "*/*", "*/*/*")
                       for s in root.glob(f"{depth}/summary.json"))
    summaries = ([root / "summary.json"] if (root / "summary.json").is_file() else []) + summaries
    for sp in summaries:
        folder = sp.parent
        try:
            s = json.loads(sp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            skipped.append({"slide": folder.name, "reason": f"unreadable summary.json ({e})",
                            "prediction": str(folder), "truth": ""})
            continue
        if not isinstance(s, dict) or s.get("format") != "lnmeta-prediction":
            continue
        sl = s.get("slide") or {}
        name = slide_key(sl.get("path") or sl.get("name") or folder.name)
        if not s.get("complete"):
            skipped.append({"slide": name, "reason": "prediction folder is incomplete",
                            "prediction": str(folder), "truth": ""})
            continue
        try:
            if cfg.lesions == "file":
                coords, probs = read_lesions_geojson(folder / "lesions.geojson")
            else:
                coords, probs = _recompute_lesions(folder, cfg)
        except (LnmetaError, OSError) as e:
            skipped.append({"slide": name, "reason": f"cannot read its lesions ({e})",
                            "prediction": str(folder), "truth": ""})
            continue
        score = (s.get("score") or {}).get(cfg.score)
        shape = sl.get("shape")
        add(SlidePrediction(slide=name, name=name, coords=coords,
                            probability=np.asarray(probs, np.float64),
                            score=None if score is None else float(score),
                            score_source=f"summary.json score.{cfg.score}" if score is not None
                            else "", source=str(folder), slide_mpp=sl.get("mpp"),
                            slide_shape=tuple(shape) if shape else None))
    scores_csv = root / "scores.csv"
    scores = _read_scores(scores_csv) if scores_csv.is_file() else {}
    for f in sorted(root.iterdir()):
        low = f.name.lower()
        if not f.is_file() or f.name == "scores.csv" or not low.endswith((".geojson", ".csv")):
            continue
        name = slide_key(f, _PRED_STRIP)
        try:
            if low.endswith(".geojson"):
                coords, probs = read_lesions_geojson(f)
            else:
                coords, probs = _read_point_csv(f)
        except (LnmetaError, OSError) as e:
            skipped.append({"slide": name, "reason": f"cannot read its detections ({e})",
                            "prediction": str(f), "truth": ""})
            continue
        sc = scores.get(name)
        add(SlidePrediction(slide=name, name=name, coords=coords,
                            probability=np.asarray(probs, np.float64), score=sc,
                            score_source="scores.csv" if sc is not None else "",
                            source=str(f)))
    return preds, skipped


def find_truth(truth_dir: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Ground-truth files under ``truth_dir`` keyed by :func:`slide_key` (mask suffixes such
    as ``_mask``, ``_tumor_mask``, ``_evaluation_mask`` removed), and notes."""
    root = Path(truth_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such ground-truth folder")
    out: dict[str, Path] = {}
    notes: list[str] = []
    rank = {s: i for i, s in enumerate(_POLYGON_SUFFIXES + (".zarr",) + _MASK_SUFFIXES)}
    cands = []
    for f in sorted(root.iterdir()):
        low = f.name.lower()
        suf = next((s for s in rank if low.endswith(s)), None)
        if suf is None or f.name.startswith("."):
            continue
        cands.append((rank[suf], f))
    for _, f in sorted(cands, key=lambda t: (t[0], t[1].name)):
        key = slide_key(f, _TRUTH_STRIP)
        if key in out:
            notes.append(f"{key}: several ground-truth files; {out[key].name} used, "
                         f"{f.name} ignored")
            continue
        out[key] = f
    return out, notes


def read_negatives(spec: str | Path | Iterable[str] | None) -> set[str]:
    """Slide keys listed as tumour-free: a file (one slide per line, first CSV field; a
    CAMELYON ``reference.csv`` keeps only its ``Normal`` rows), or comma-separated names."""
    if spec is None:
        return set()
    if not isinstance(spec, (str, Path)):
        return {slide_key(s) for s in spec if str(s).strip()}
    p = Path(str(spec))
    if p.is_file():
        out = set()
        for r in csv.reader(io.StringIO(p.read_text(encoding="utf-8-sig"))):
            if not r or not r[0].strip() or r[0].strip().startswith("#"):
                continue
            if len(r) > 1 and r[1].strip().lower() in ("tumor", "tumour"):
                continue
            out.add(slide_key(r[0].strip()))
        return out
    return {slide_key(s.strip()) for s in str(spec).split(",") if s.strip()}


def evaluate_folders_job(pred_dir: str | Path, truth_dir: str | Path,
                         config: FrocConfig | None = None, *,
                         negatives: str | Path | Iterable[str] | None = None
                         ) -> Job[EvaluationReport]:
    """Evaluate every slide that has both a prediction and a ground truth (or is listed
    as negative); the others are reported in ``skipped`` with the reason.

    Yields :class:`~napari_lnmeta.progress.Progress` per slide; returns an
    :class:`EvaluationReport`. Raises :class:`InputError` only for missing folders.
    """
    cfg = config or FrocConfig()
    yield Progress(0, 1, "reading predictions")
    preds, skipped = find_predictions(pred_dir, cfg)
    truths, notes = find_truth(truth_dir)
    neg = read_negatives(negatives)
    if not preds:
        notes.append(f"{pred_dir}: no predictions found (expected lnmeta prediction folders "
                     "with summary.json, or <slide>.geojson / <slide>.csv detection files)")
    keys = sorted(set(preds) | set(truths) | neg)
    results: list[SlideResult] = []
    for i, key in enumerate(keys):
        yield Progress(i, len(keys), f"evaluating {key}")
        p, t = preds.get(key), truths.get(key)
        if p is None:
            why = ("ground truth but no prediction" if t is not None
                   else "listed as negative but no prediction")
            skipped.append({"slide": key, "reason": why, "prediction": "",
                            "truth": str(t) if t else ""})
            continue
        if t is None and key not in neg:
            skipped.append({"slide": key, "reason": "prediction but no ground truth (list the "
                            "slide in --negatives if it is tumour-free)",
                            "prediction": p.source, "truth": ""})
            continue
        try:
            check_detections_on_slide(p.coords, p.slide_shape, source=p.source)
            regions = None if t is None else load_truth(
                t, slide_mpp=p.slide_mpp, slide_shape=p.slide_shape, config=cfg)
            if regions is not None and key in neg:
                raise InputError("listed as negative, but its ground truth has tumour")
            r = match_detections(p.coords, p.probability, regions, slide=key, score=p.score,
                                 score_source=p.score_source)
        except LnmetaError as e:
            skipped.append({"slide": key, "reason": str(e), "prediction": p.source,
                            "truth": str(t) if t else ""})
            continue
        r.prediction, r.truth = p.source, str(t) if t else "negatives list"
        r.slide_mpp = p.slide_mpp if p.slide_mpp is not None else cfg.mpp
        results.append(r)
    yield Progress(len(keys), len(keys), "FROC and ROC")
    return summarise(results, cfg, skipped=skipped, notes=notes,
                     inputs={"predictions": str(pred_dir), "truth": str(truth_dir),
                             "negatives": "" if negatives is None else str(negatives)})


def evaluate_slide_job(coords: np.ndarray, probability: np.ndarray, truth: Any, *,
                       slide: str = "slide", slide_mpp: float | None = None,
                       slide_shape: tuple[int, int] | None = None, score: float | None = None,
                       config: FrocConfig | None = None) -> Job[EvaluationReport]:
    """One slide's detections against its ground truth (``None``: a tumour-free slide).

    The *Evaluate* widget's job for the layers of the current slide; FROC is computed
    over this one slide, the slide-level AUC is not defined (a note says so).
    """
    cfg = config or FrocConfig()
    yield Progress(0, 2, "ground-truth regions")
    check_detections_on_slide(coords, slide_shape, source=slide)
    regions = None if truth is None else load_truth(truth, slide_mpp=slide_mpp,
                                                    slide_shape=slide_shape, config=cfg)
    yield Progress(1, 2, "matching detections")
    r = match_detections(coords, probability, regions, slide=slide, score=score,
                         score_source="" if score is None else "given")
    r.slide_mpp = slide_mpp if slide_mpp is not None else cfg.mpp
    r.truth = "tumour-free" if truth is None else (
        str(truth) if isinstance(truth, (str, Path)) else "layer")
    yield Progress(2, 2, "done")
    return summarise([r], cfg, inputs={"predictions": slide, "truth": r.truth})


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _csv_text(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


SLIDE_COLUMNS = ("slide", "status", "label", "score", "detections", "tumours", "itc", "hits",
                 "missed", "duplicates", "itc_detections", "fp", "sensitivity",
                 "max_probability", "prediction", "truth", "reason")
DETECTION_COLUMNS = ("slide", "index", "row", "col", "probability", "outcome", "region",
                     "itc_region")


def froc_figure_png(froc: dict[str, Any], *, dpi: int = 110, title: str = "FROC") -> bytes:
    """The FROC curve (log FP axis) with the six operating points, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fps = np.asarray(froc["curve"]["fps"], np.float64)
    sens = np.asarray(froc["curve"]["sensitivity"], np.float64)
    lo = min(froc["fp_rates"]) / 2
    x = np.maximum(fps, lo)
    ax.step(x, sens, where="post", color="C0", lw=1.5, label="FROC")
    ax.plot(froc["fp_rates"], froc["sensitivity"], "o", color="C3",
            label=f"FROC score {froc['score']:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(lo, max(16.0, float(x.max()) * 1.2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("sensitivity (lesions)")
    ax.set_title(f"{title} ({froc['n_tumours']} lesions, {froc['n_slides']} slides)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def roc_figure_png(results: Sequence[SlideResult], *, dpi: int = 110) -> bytes:
    """The slide-level ROC curve as PNG bytes (via :func:`~napari_lnmeta.train.metrics.plot_roc`)."""
    import tempfile

    from ..train.metrics import plot_roc

    y = [int(r.is_tumour) for r in results]
    s = [r.score for r in results]
    with tempfile.TemporaryDirectory() as d:
        p = plot_roc({"slides": (y, s)}, Path(d) / "roc.png", title="Slide-level ROC", dpi=dpi)
        return p.read_bytes()


def write_report(report: EvaluationReport, out_dir: str | Path, *, overwrite: bool = False,
                 inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.json``, ``slides.csv``, ``detections.csv``, ``roc.png`` and
    ``froc.png`` (the plots when defined), each atomically.

    Every output is checked before anything is written: an existing one is refused
    (:class:`~napari_lnmeta.errors.OutputExistsError`) unless ``overwrite``.
    """
    from ..io.atomic import output_lock

    with output_lock(out_dir):  # one writer per output
        return _write_report_locked(report, out_dir, overwrite=overwrite, inputs=inputs)


def _write_report_locked(report: EvaluationReport, out_dir: str | Path, *, overwrite: bool = False,
                         inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    from ..io.atomic import check_inputs, write_bytes_atomic, write_text_atomic

    out = Path(out_dir)
    check_inputs(out, inputs, whole=False)
    for name in REPORT_FILES:
        check_inputs(out / name, inputs)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    for name in REPORT_FILES:
        if (out / name).exists() and not overwrite:
            raise OutputExistsError(out / name)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if report.roc is not None:
        paths["roc"] = write_bytes_atomic(out / "roc.png", roc_figure_png(report.slides),
                                          overwrite=True)
    if report.froc is not None:
        paths["froc"] = write_bytes_atomic(out / "froc.png", froc_figure_png(report.froc),
                                           overwrite=True)
    paths["slides"] = write_text_atomic(out / "slides.csv",
                                        _csv_text(report.slide_rows(), SLIDE_COLUMNS),
                                        overwrite=True)
    paths["detections"] = write_text_atomic(out / "detections.csv",
                                            _csv_text(report.detection_rows(), DETECTION_COLUMNS),
                                            overwrite=True)
    if overwrite:  # never leave a plot of an earlier run beside a new report
        for key in ("roc", "froc"):
            if key not in paths:
                (out / f"{key}.png").unlink(missing_ok=True)
    d = report.to_json()
    d["files"] = sorted(p.name for p in paths.values()) + ["report.json"]
    paths["report"] = write_text_atomic(out / "report.json", jsonio.dumps(d, indent=1),
                                        overwrite=True)
    return paths


__all__ = ["DILATION_UM", "FP_RATES", "ITC_UM", "EvaluationReport", "FrocConfig", "Regions",
           "SlidePrediction", "SlideResult", "evaluate_folders_job", "evaluate_slide_job",
           "evaluation_regions", "find_predictions", "find_truth", "froc_curve",
           "froc_figure_png", "froc_score", "load_truth", "match_detections", "read_negatives",
           "roc_figure_png", "slide_key", "slide_roc", "summarise", "write_report",
           "check_same_frame", "check_detections_on_slide"]
