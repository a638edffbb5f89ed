"""Ground truth of the CAMELYON16 evaluation: tumour regions from masks and polygons.

:func:`load_truth` reads a mask or a polygon file into a label mask at the evaluation
resolution; :func:`evaluation_regions` dilates it and labels its regions, ITC included.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from ...io.frame import SlideFrame
from .config import CAMELYON_LEVEL5_MPP, DILATION_UM, ITC_UM, FrocConfig

_POLYGON_SUFFIXES = (".xml", ".json", ".geojson")
_MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


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
    from ..evaluation import tumour_values

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
    from ...io.annotations import NEGATIVE_NAMES, rasterize
    from ..evaluation import tumour_values

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
    from ...io.annotations import LabelMask, Polygon, read_label_raster, read_polygons

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

        from ...io.annotations import mask_problem

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

    from ...io.annotations import mask_problem

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
