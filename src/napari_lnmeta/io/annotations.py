"""Label sources: polygons and masks from the formats pathologists use, in slide pixels.

Every reader returns level-0 ``(row, col)`` geometry of the slide the labels belong to
(x is the column, y the row; files that store ``x, y`` are swapped on reading and on
writing). Polygon files written at another resolution than the slide being used (the
CAMELYON16 polygons are at 0.243 µm/px, the shared low-resolution slide at 7.776 µm/px)
are brought onto the slide with ``scale`` (slide pixels per file pixel, e.g. ``1/32``).

Formats
-------
* CAMELYON JSON (NCRF): ``{"positive": [{"name", "vertices": [[x, y], ...]}], "negative": [...]}``;
* ASAP XML (CAMELYON16 / 17): ``<Annotation PartOfGroup=...><Coordinates><Coordinate X Y/>``;
* QuPath GeoJSON (read and write): ``Polygon`` / ``MultiPolygon`` features with holes,
  class in ``properties.classification.name``;
* ROI CSV (seed 001): rectangles ``xs, ys, xe, ye``;
* label rasters: an OME-Zarr mask (:func:`napari_lnmeta.io.omezarr.read_ome_zarr`) or a
  napari Labels array, each with its :class:`~napari_lnmeta.io.frame.SlideFrame`.

All of them become a :class:`LabelMask`: an integer raster on a known frame plus the
names of its values, which is what the patch datasets need.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, LnmetaWarning
from . import jsonio
from .frame import SlideFrame, frame_for

#: class names meaning "tumour" (lower case; compare case-insensitively), best first: the
#: one list for recognising a model's tumour class, tumour labels and tumour slides
TUMOUR_NAMES = ("tumour", "tumor", "metastasis", "metastases", "positive", "cancer",
                "carcinoma", "malignant", "breast metastasis")
#: class names treated as "not tumour" (explicitly annotated normal tissue or exclusions)
NEGATIVE_NAMES = frozenset({"normal", "negative", "non-tumour", "non-tumor", "nontumour",
                            "nontumor", "benign", "exclusion", "excluded", "background",
                            "other", "stroma", "none"})
#: ASAP / CAMELYON16 groups: ``_0``/``_1``/``Tumor`` are tumour, ``_2``/``Exclusion`` are not
ASAP_GROUPS = {"tumor": "tumour", "tumour": "tumour", "_0": "tumour", "_1": "tumour",
               "metastases": "tumour", "_2": "normal", "exclusion": "normal", "none": "normal"}


@dataclass
class Polygon:
    """One annotated region.

    Attributes
    ----------
    vertices
        ``(N, 2)`` float64 level-0 ``(row, col)`` of the exterior ring.
    label
        Class name (``"tumour"``, ``"normal"``, ``"fibrosis"``...).
    name
        Name of the annotation in its file.
    holes
        Interior rings (``(M, 2)`` arrays), cut out of the region.
    """

    vertices: np.ndarray
    label: str = "tumour"
    name: str = ""
    holes: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.vertices = np.asarray(self.vertices, dtype=np.float64).reshape(-1, 2)
        self.holes = [np.asarray(h, dtype=np.float64).reshape(-1, 2) for h in self.holes]

    def scaled(self, scale: float, offset: tuple[float, float] = (0.0, 0.0)) -> Polygon:
        off = np.asarray(offset, dtype=np.float64)
        return Polygon(self.vertices * scale + off, self.label, self.name,
                       [h * scale + off for h in self.holes])

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(row0, col0, row1, col1)`` of the exterior."""
        v = self.vertices
        return (float(v[:, 0].min()), float(v[:, 1].min()),
                float(v[:, 0].max()), float(v[:, 1].max()))

    @property
    def area(self) -> float:
        """Shoelace area of the exterior minus the holes (level-0 pixels²)."""
        def a(v):
            y, x = v[:, 0], v[:, 1]
            return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
        return a(self.vertices) - sum(a(h) for h in self.holes)


@dataclass
class LabelMask:
    """An integer label raster placed on a slide.

    Attributes
    ----------
    labels
        ``(H, W)`` integer array; 0 means "no annotation".
    frame
        Where pixel ``(i, j)`` lies on the slide (level-0 ``origin + (i, j) * downsample``).
    names
        Class name of each non-zero value, e.g. ``{1: "tumour", 2: "normal"}``.
    source
        Where it came from (a path or layer name), for messages.
    """

    labels: np.ndarray
    frame: SlideFrame
    names: dict[int, str]
    source: str = ""

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        if self.labels.ndim != 2:
            raise InputError(f"{self.source or 'labels'}: expected a 2-D label image, got "
                             f"shape {self.labels.shape}")
        if not np.issubdtype(self.labels.dtype, np.integer) and self.labels.dtype != bool:
            raise InputError(f"{self.source or 'labels'}: labels must be integers, got "
                             f"{self.labels.dtype}")
        self.names = {int(k): str(v) for k, v in self.names.items()}

    def values_for(self, name: str) -> list[int]:
        return [v for v, n in self.names.items() if n == name]

    def present(self) -> list[int]:
        """Non-zero values that occur in the raster."""
        return [int(v) for v in np.unique(self.labels) if v != 0]

    def check_fits(self, slide_shape: tuple[int, int], slide_name: str = "slide",
                   tol_cells: float = 1.5) -> None:
        """Raise InputError when the raster does not cover ``slide_shape`` at its frame."""
        d = self.frame.downsample
        oy, ox = self.frame.origin
        exp_h = (slide_shape[0] - oy) / d
        exp_w = (slide_shape[1] - ox) / d
        h, w = self.labels.shape
        if abs(h - exp_h) > tol_cells or abs(w - exp_w) > tol_cells:
            raise InputError(
                f"{self.source or 'labels'}: shape {h}x{w} does not match {slide_name} "
                f"({slide_shape[0]}x{slide_shape[1]} px) at downsample {d:g} "
                f"(expected about {math.ceil(exp_h)}x{math.ceil(exp_w)}); the labels were "
                "drawn on another image or at another resolution")


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


class AnnotationWarning(LnmetaWarning):
    """An annotation was repaired on reading (non-finite vertices dropped)."""


def _ring(points: Any, path: Path, what: str, xy: bool = True) -> np.ndarray:
    """An ``(N, 2)`` ring from a file, validated.

    Vertices with a non-finite coordinate (``NaN``/``Infinity``, an export glitch) are
    dropped with an :class:`AnnotationWarning` naming the annotation and the count: the
    annotated region keeps its other vertices instead of vanishing. A ring left with
    fewer than 3 finite vertices is refused.
    """
    if isinstance(points, (str, bytes, dict)) or points is None:
        raise InputError(f"{path}: {what}: coordinates are not a list of (x, y) pairs")
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {what}: coordinates are not numbers") from e
    if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3:
        raise InputError(f"{path}: {what}: a polygon needs at least 3 (x, y) vertices, got "
                         f"shape {arr.shape}")
    arr = arr[:, :2]
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        n_bad, n = int((~finite).sum()), len(arr)
        if int(finite.sum()) < 3:
            raise InputError(f"{path}: {what}: {n_bad} of {n} vertices are not finite "
                             "numbers; fewer than 3 remain, so the polygon cannot be repaired")
        warnings.warn(f"{path}: {what}: dropped {n_bad} of {n} vertices that are not finite "
                      f"numbers (kept the polygon with {n - n_bad} vertices)",
                      AnnotationWarning, stacklevel=3)
        arr = arr[finite]
    if len(arr) > 3 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]  # GeoJSON closes its rings
    return arr[:, ::-1].copy() if xy else arr


def read_camelyon_json(path: str | Path, *, scale: float = 1.0,
                       positive: str = "tumour", negative: str = "normal") -> list[Polygon]:
    """Polygons of an NCRF-style CAMELYON JSON (``positive`` / ``negative`` lists of x, y).

    ``negative`` polygons are normal regions (inside tumour they are holes); they are
    returned with the label ``negative`` and drawn after the positive ones.
    """
    path = Path(path)
    d = _load_json(path)
    if not isinstance(d, dict) or not ({"positive", "negative"} & set(d)):
        raise InputError(f"{path}: not a CAMELYON JSON annotation (expected 'positive' / "
                         "'negative' lists)")
    out = []
    for key, label in (("positive", positive), ("negative", negative)):
        if not isinstance(d.get(key) or [], list):
            raise InputError(f"{path}: '{key}' is not a list of polygons")
        for i, item in enumerate(d.get(key) or []):
            if not isinstance(item, dict) or "vertices" not in item:
                raise InputError(f"{path}: {key}[{i}] has no 'vertices'")
            v = _ring(item["vertices"], path, f"{key}[{i}]")
            out.append(Polygon(v * scale, label, str(item.get("name", f"{key}_{i}"))))
    return out


def read_asap_xml(path: str | Path, *, scale: float = 1.0,
                  groups: dict[str, str] | None = None) -> list[Polygon]:
    """Polygons of an ASAP XML annotation (CAMELYON16 / 17 ground truth).

    ``groups`` maps ``PartOfGroup`` (case-insensitive) to a class name; the default
    follows CAMELYON16: ``Tumor``, ``_0``, ``_1`` are tumour; ``_2`` / ``Exclusion`` are
    normal. Unknown groups keep their own name.
    """
    import xml.etree.ElementTree as ET

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise InputError(f"{path}: not valid XML ({e})") from e
    mapping = {k.lower(): v for k, v in (groups or ASAP_GROUPS).items()}
    out = []
    for i, ann in enumerate(root.iter("Annotation")):
        coords = ann.find("Coordinates")
        if coords is None:
            continue
        pts = []
        for c in coords.iter("Coordinate"):
            try:
                pts.append((float(c.get("Order", len(pts))), float(c.get("X")), float(c.get("Y"))))
            except (TypeError, ValueError) as e:
                raise InputError(f"{path}: annotation {ann.get('Name', i)}: bad coordinate") from e
        pts.sort(key=lambda t: t[0])
        typ = (ann.get("Type") or "Polygon").lower()
        if typ in ("dot", "pointset") or len(pts) < 3:
            continue
        xy = np.asarray([(x, y) for _, x, y in pts])
        if typ == "rectangle" and len(xy) == 2:
            (x0, y0), (x1, y1) = xy
            xy = np.asarray([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        group = (ann.get("PartOfGroup") or "None").strip()
        label = mapping.get(group.lower(), group)
        out.append(Polygon(_ring(xy, path, f"annotation {ann.get('Name', i)}") * scale,
                           label, ann.get("Name", f"annotation_{i}")))
    if not out:
        raise InputError(f"{path}: no polygon annotations found in the ASAP XML")
    return out


def _geo_label(props: dict[str, Any], default: str) -> str:
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str):
        return cls
    for key in ("label", "class", "name"):
        if props.get(key):
            return str(props[key])
    return default


def read_geojson(path: str | Path, *, scale: float = 1.0, default_label: str = "tumour",
                 label_map: dict[str, str] | None = None) -> list[Polygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, Feature list or Geometry).

    Coordinates are ``x, y`` (GeoJSON order); interior rings become holes. The class is
    ``properties.classification.name`` (QuPath), else ``label`` / ``class`` / ``name``,
    else ``default_label``; ``label_map`` renames classes (case-insensitive), e.g.
    ``{"Tumor": "tumour"}``.
    """
    path = Path(path)
    d = _load_json(path)
    if isinstance(d, list):
        feats = d
    elif isinstance(d, dict) and d.get("type") == "FeatureCollection":
        feats = d.get("features") or []
    elif isinstance(d, dict) and d.get("type") == "Feature":
        feats = [d]
    elif isinstance(d, dict) and "coordinates" in d:
        feats = [{"type": "Feature", "geometry": d, "properties": {}}]
    else:
        raise InputError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or "
                         "Geometry)")
    if not isinstance(feats, list):
        raise InputError(f"{path}: GeoJSON 'features' is not a list")
    lmap = {k.lower(): v for k, v in (label_map or {}).items()}
    out = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise InputError(f"{path}: feature {i} is not a GeoJSON object")
        geom = f.get("geometry") or {}
        props = f.get("properties") or {}
        if not isinstance(geom, dict):
            raise InputError(f"{path}: feature {i}: 'geometry' is not an object")
        if not isinstance(props, dict):
            raise InputError(f"{path}: feature {i}: 'properties' is not an object")
        label = _geo_label(props, default_label)
        label = lmap.get(label.lower(), label)
        name = str(props.get("name") or f.get("id") or f"feature_{i}")
        typ = geom.get("type")
        if typ == "Polygon":
            polys = [geom.get("coordinates") or []]
        elif typ == "MultiPolygon":
            polys = geom.get("coordinates") or []
        else:
            continue  # points, lines: not regions
        if not isinstance(polys, list):
            raise InputError(f"{path}: feature {name}: {typ} coordinates are not a list")
        for k, rings in enumerate(polys):
            if not rings:
                continue
            if not isinstance(rings, list):
                raise InputError(f"{path}: feature {name}: {typ} rings are not lists of "
                                 "(x, y) pairs")
            what = f"feature {name}" + (f" part {k}" if len(polys) > 1 else "")
            ext = _ring(rings[0], path, what) * scale
            holes = [_ring(r, path, what + " hole") * scale for r in rings[1:]]
            out.append(Polygon(ext, label, name, holes))
    if not out:
        raise InputError(f"{path}: no Polygon or MultiPolygon features in the GeoJSON")
    return out


#: QuPath's default colours (packed RGB lists) for the classes we write
_QUPATH_COLOURS = {"tumour": [200, 0, 0], "tumor": [200, 0, 0], "normal": [0, 160, 60],
                   "fibrosis": [220, 160, 0], "stroma": [150, 200, 150]}


def write_geojson(path: str | Path, polygons: Iterable[Polygon], *, scale: float = 1.0,
                  overwrite: bool = False, object_type: str = "annotation") -> Path:
    """Write polygons as QuPath-compatible GeoJSON (``x, y`` coordinates, closed rings).

    ``scale`` multiplies level-0 ``(row, col)`` before writing (e.g. ``32`` to write for
    the full-resolution slide from a 1/32 one). Atomic.
    """
    from .atomic import write_text_atomic

    feats = []
    for i, p in enumerate(polygons):
        rings = []
        for r in [p.vertices] + list(p.holes):
            xy = (np.asarray(r)[:, ::-1] * scale).tolist()
            if xy and xy[0] != xy[-1]:
                xy.append(xy[0])
            rings.append([[round(x, 3), round(y, 3)] for x, y in xy])
        props: dict[str, Any] = {"objectType": object_type,
                                 "classification": {"name": p.label,
                                                    "color": _QUPATH_COLOURS.get(
                                                        p.label.lower(), [120, 120, 255])}}
        if p.name:
            props["name"] = p.name
        feats.append({"type": "Feature", "id": f"lnmeta-{i}",
                      "geometry": {"type": "Polygon", "coordinates": rings},
                      "properties": props})
    text = jsonio.dumps({"type": "FeatureCollection", "features": feats})
    return write_text_atomic(path, text, overwrite=overwrite)


def read_roi_csv(path: str | Path, *, slide: str | None = None) -> np.ndarray:
    """ROI rectangles from a CSV with columns ``xs, ys, xe, ye`` (seed 001).

    Comma-, semicolon- or tab-separated, with a header naming the columns (other
    columns are ignored) or exactly four numeric columns in that order. ``x`` is the
    column and ``y`` the row, in level-0 pixels. When ``slide`` is given and the file
    has a ``slide``, ``image`` or ``file`` column, only rows whose value equals the slide
    name or its stem are kept.

    Returns
    -------
    numpy.ndarray
        ``(K, 4)`` float64 rectangles as ``(y0, x0, y1, x1)`` (row/col convention),
        sorted corners.
    """
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read ROI CSV ({e.strerror or e})") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"{path}: the ROI CSV is empty")
    delim = "\t" if "\t" in lines[0] else ";" if ";" in lines[0] else ","
    rows = [[c.strip() for c in r] for r in csv.reader(lines, delimiter=delim)]
    header = [c.lower() for c in rows[0]]
    want = ["xs", "ys", "xe", "ye"]
    if all(w in header for w in want):
        cols = [header.index(w) for w in want]
        body = rows[1:]
        scol = next((header.index(k) for k in ("slide", "image", "file", "slide_name")
                     if k in header), None)
    else:
        cols, body, scol = [0, 1, 2, 3], rows, None
        if len(rows[0]) != 4:
            raise InputError(f"{path}: ROI CSV needs columns xs, ys, xe, ye "
                             f"(header found: {', '.join(rows[0])})")
    if slide is not None and scol is not None:
        names = {slide, Path(slide).name, Path(slide).stem, Path(slide).name.split(".")[0]}
        body = [r for r in body if len(r) > scol and r[scol] in names]
    out = []
    for n, r in enumerate(body, start=2 if cols != [0, 1, 2, 3] or scol else 1):
        try:
            xs, ys, xe, ye = (float(r[c]) for c in cols)
        except (ValueError, IndexError) as e:
            raise InputError(f"{path}: line {n}: expected numbers in xs, ys, xe, ye") from e
        out.append([min(ys, ye), min(xs, xe), max(ys, ye), max(xs, xe)])
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


def read_roi_rectangles(path: str | Path, *, scale: float = 1.0, label: str = "tumour",
                        slide: str | None = None) -> list[Polygon]:
    """ROI rectangles of a seed-001 CSV (``xs, ys, xe, ye``) as 4-vertex polygons."""
    boxes = read_roi_csv(path, slide=slide) * scale
    if len(boxes) == 0:
        raise InputError(f"{path}: no ROI rectangles" + (f" for slide {slide}" if slide else ""))
    return [Polygon(np.asarray([(y0, x0), (y0, x1), (y1, x1), (y1, x0)]), label,
                    f"roi_{i}") for i, (y0, x0, y1, x1) in enumerate(boxes)]


def read_polygons(path: str | Path, *, scale: float = 1.0, **kw) -> list[Polygon]:
    """Any polygon file, chosen by its suffix (.json, .xml, .geojson, .csv)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".geojson"):
        return read_geojson(path, scale=scale, **kw)
    if name.endswith(".xml"):
        return read_asap_xml(path, scale=scale, **kw)
    if name.endswith(".csv") or name.endswith(".tsv"):
        return read_roi_rectangles(path, scale=scale, **kw)
    if name.endswith(".json"):
        d = _load_json(path)
        if isinstance(d, dict) and ({"positive", "negative"} & set(d)):
            return read_camelyon_json(path, scale=scale, **kw)
        return read_geojson(path, scale=scale, **kw)
    raise InputError(f"{path}: unknown annotation format (expected .json, .geojson, .xml "
                     "or .csv)")


# --------------------------------------------------------------------------------------
# Rasterising
# --------------------------------------------------------------------------------------
def rasterize(polygons: Sequence[Polygon], frame: SlideFrame, shape: tuple[int, int], *,
              values: dict[str, int] | None = None, order: Sequence[str] | None = None,
              dtype=np.uint8) -> tuple[np.ndarray, dict[int, str]]:
    """Draw polygons into an integer raster on ``frame``.

    Parameters
    ----------
    polygons
        Level-0 polygons.
    frame, shape
        The raster's frame and ``(H, W)``; pixel ``(i, j)`` covers level-0
        ``[origin + i*d, origin + (i+1)*d)`` and is set when its centre is inside.
    values
        Class name -> raster value (default: 1, 2, ... in order of first appearance,
        with negative names after the others).
    order
        Class names in drawing order (later ones overwrite); default: non-negative
        classes first, then negative ones (so CAMELYON "negative" regions cut holes).

    Returns
    -------
    (raster, names)
        The raster and ``{value: class name}``.
    """
    from skimage.draw import polygon as draw_polygon

    labels_seen: list[str] = []
    for p in polygons:
        if p.label not in labels_seen:
            labels_seen.append(p.label)
    if order is None:
        order = ([n for n in labels_seen if n.lower() not in NEGATIVE_NAMES]
                 + [n for n in labels_seen if n.lower() in NEGATIVE_NAMES])
    if values is None:
        values = {n: i + 1 for i, n in enumerate(order)}
    missing = [n for n in labels_seen if n not in values]
    if missing:
        raise InputError(f"no raster value for classes {missing}")
    out = np.zeros(shape, dtype=dtype)
    d = float(frame.downsample)
    oy, ox = frame.origin

    def to_px(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # level-0 pixel centres -> raster pixel-centre coordinates
        return (v[:, 0] - oy + 0.5) / d - 0.5, (v[:, 1] - ox + 0.5) / d - 0.5

    rank = {n: i for i, n in enumerate(order)}
    for p in sorted(polygons, key=lambda q: rank.get(q.label, len(rank))):
        val = values[p.label]
        rr, cc = draw_polygon(*to_px(p.vertices), shape=shape)
        if not p.holes:
            out[rr, cc] = val
            continue
        region = np.zeros(shape, dtype=bool)
        region[rr, cc] = True
        for h in p.holes:
            hr, hc = draw_polygon(*to_px(h), shape=shape)
            region[hr, hc] = False
        out[region] = val
    return out, {v: n for n, v in values.items()}


def polygons_to_mask(polygons: Sequence[Polygon], slide_shape: tuple[int, int], downsample: float,
                     *, slide_mpp: float | None = None, slide: str | None = None,
                     source: str = "", values: dict[str, int] | None = None) -> LabelMask:
    """Rasterise level-0 polygons at ``downsample`` over a whole slide."""
    if not polygons:
        raise InputError(f"{source or 'annotations'}: no polygons to rasterise")
    frame, shape = frame_for(slide_shape, downsample, slide_mpp=slide_mpp, slide=slide)
    arr, names = rasterize(polygons, frame, shape, values=values)
    return LabelMask(arr, frame, names, source=source)


def mask_to_polygons(mask: np.ndarray, frame: SlideFrame, *, label: str = "tumour",
                     min_area_px: float = 4.0) -> list[Polygon]:
    """Outlines of a binary raster as level-0 polygons (for GeoJSON export)."""
    from skimage import measure

    m = np.asarray(mask) > 0
    if not m.any():
        return []
    padded = np.pad(m, 1).astype(np.float32)
    d = float(frame.downsample)
    oy, ox = frame.origin
    out = []
    for i, c in enumerate(measure.find_contours(padded, 0.5)):
        c = c - 1  # undo padding
        v = np.column_stack([oy + (c[:, 0] + 0.5) * d - 0.5, ox + (c[:, 1] + 0.5) * d - 0.5])
        p = Polygon(v, label, f"{label}_{i}")
        if p.area >= min_area_px * d * d:
            out.append(p)
    return out


# --------------------------------------------------------------------------------------
# One entry point for every label source
# --------------------------------------------------------------------------------------
def read_label_raster(path: str | Path, *, names: dict[int, str] | None = None) -> LabelMask:
    """An OME-Zarr label mask (as written by lnmeta) as a :class:`LabelMask`."""
    from .omezarr import read_ome_zarr

    res = read_ome_zarr(path)
    arr = np.asarray(res.pyramid[0])
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if names is None:
        stored = res.attrs.get("lnmeta", {}).get("classes") or res.attrs.get("lnmeta", {}).get("names")
        if isinstance(stored, dict):
            names = {int(k): str(v) for k, v in stored.items()}
        elif isinstance(stored, list):
            names = {i + 1: str(v) for i, v in enumerate(stored)}
        else:
            names = {int(v): ("tumour" if v == 1 else f"class_{int(v)}")
                     for v in np.unique(arr) if v != 0}
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return LabelMask(arr, res.frame, names, source=str(path))


def load_labels(source: Any, *, slide_shape: tuple[int, int], slide_mpp: float | None = None,
                slide: str | None = None, scale: float = 1.0, downsample: float | None = None,
                names: dict[int, str] | None = None, frame: SlideFrame | None = None) -> LabelMask:
    """Turn any supported label source into a :class:`LabelMask` on a slide.

    Parameters
    ----------
    source
        A path (``.json`` CAMELYON or GeoJSON, ``.geojson``, ``.xml`` ASAP, ``.csv`` ROI,
        ``.zarr`` OME-Zarr mask, ``.png``/``.tif`` label image covering the slide), a
        :class:`LabelMask`, a list of :class:`Polygon`, or an integer array (with
        ``frame``, else it must cover the slide).
    slide_shape, slide_mpp, slide
        The level-0 shape, µm/px and name of the slide the labels go with.
    scale
        Slide pixels per file pixel for polygon files.
    downsample
        Raster resolution for polygons (level-0 px per raster px); default: about 2 µm/px
        or 1/8192 of the slide's longest side, whichever is coarser.
    names
        ``{value: class name}`` for rasters (default ``{1: "tumour"}``, others
        ``class_<v>``).
    frame
        Frame of an array source.
    """
    if isinstance(source, LabelMask):
        return source
    if downsample is None:
        fine = 2.0 / slide_mpp if slide_mpp else 1.0
        downsample = max(fine, max(slide_shape) / 8192, 1.0)
    if isinstance(source, (list, tuple)) and (not source or isinstance(source[0], Polygon)):
        return polygons_to_mask(list(source), slide_shape, downsample, slide_mpp=slide_mpp,
                                slide=slide, source="polygons")
    if isinstance(source, np.ndarray):
        arr = source
        if frame is None:
            ds = (slide_shape[0] / arr.shape[0] + slide_shape[1] / arr.shape[1]) / 2
            frame = SlideFrame(downsample=ds, slide_mpp=slide_mpp, slide=slide,
                               slide_shape=tuple(slide_shape))
        if names is None:
            names = {int(v): ("tumour" if v == 1 else f"class_{int(v)}")
                     for v in np.unique(arr) if v != 0}
        return LabelMask(arr.astype(np.uint8) if arr.dtype == bool else arr, frame, names,
                         source="labels array")
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such label file")
    low = path.name.lower()
    if path.is_dir() or low.endswith(".zarr"):
        lm = read_label_raster(path, names=names)
        if lm.frame.slide_shape is None:
            lm.frame.slide_shape = tuple(slide_shape)
        return lm
    if low.endswith((".png", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise InputError(f"{path}: not a readable label image ({e})") from e
        why = mask_problem(arr)
        if why is not None:  # a picture saved as *_mask.png: refuse, never "evaluate" it
            raise InputError(f"{path}: {why}")
        if arr.ndim == 3:
            arr = arr[..., 0]
        if names is None and set(np.unique(arr)) <= {0, 255}:
            arr = (arr > 0).astype(np.uint8)
        return load_labels(arr, slide_shape=slide_shape, slide_mpp=slide_mpp, slide=slide,
                           names=names)
    polys = read_polygons(path, scale=scale)
    lm = polygons_to_mask(polys, slide_shape, downsample, slide_mpp=slide_mpp, slide=slide,
                          source=str(path))
    return lm


__all__ = ["ASAP_GROUPS", "LabelMask", "NEGATIVE_NAMES", "Polygon", "TUMOUR_NAMES", "load_labels",
           "mask_to_polygons", "polygons_to_mask", "rasterize", "read_asap_xml",
           "read_camelyon_json", "read_geojson", "read_label_raster", "read_polygons",
           "read_roi_csv", "read_roi_rectangles", "write_geojson"]


# --------------------------------------------------------------------------------------
# Points (lesion candidates, detections) as QuPath GeoJSON
# --------------------------------------------------------------------------------------
def read_points_geojson(path: str | Path) -> dict[str, Any]:
    """Point features of a GeoJSON file (lesion candidates, QuPath point annotations).

    Returns ``{"coords": (N, 2) (row, col) level-0 pixels, "probability": (N,) float
    (NaN where absent), "names": [...], "labels": [...], "properties": {...}}``;
    ``MultiPoint`` features give one row per point.
    """
    path = Path(path)
    d = _load_json(path)
    feats = d.get("features") if isinstance(d, dict) else d if isinstance(d, list) else None
    if not isinstance(feats, list):
        raise InputError(f"{path}: not a GeoJSON FeatureCollection")
    rows, probs, names, labels = [], [], [], []
    for i, f in enumerate(feats):
        g = (f or {}).get("geometry") or {}
        props = (f or {}).get("properties") or {}
        if g.get("type") == "Point":
            pts = [g.get("coordinates")]
        elif g.get("type") == "MultiPoint":
            pts = g.get("coordinates") or []
        else:
            continue
        m = props.get("measurements")
        p = m.get("probability") if isinstance(m, dict) else props.get("probability")
        for xy in pts:
            if not isinstance(xy, (list, tuple)) or len(xy) < 2:
                raise InputError(f"{path}: feature {i} has a point without x, y")
            try:
                rows.append((float(xy[1]), float(xy[0])))
            except (TypeError, ValueError) as e:
                raise InputError(f"{path}: feature {i} has a non-numeric coordinate") from e
            probs.append(float(p) if isinstance(p, (int, float)) else np.nan)
            names.append(str(props.get("name") or f.get("id") or f"point_{i}"))
            labels.append(_geo_label(props, "Tumor"))
    return {"coords": np.asarray(rows, dtype=np.float64).reshape(-1, 2),
            "probability": np.asarray(probs, dtype=np.float32), "names": names,
            "labels": labels, "properties": d.get("properties") if isinstance(d, dict) else None}


def write_points_geojson(path: str | Path, coords: np.ndarray, *,
                         probability: np.ndarray | None = None, label: str = "Tumor",
                         names: Sequence[str] | None = None, overwrite: bool = False,
                         properties: dict[str, Any] | None = None) -> Path:
    """Write level-0 ``(row, col)`` points as QuPath GeoJSON point annotations (atomic).

    ``probability`` (one per point, NaN for none) goes to ``measurements.probability``,
    which QuPath shows as a measurement and :func:`read_points_geojson` reads back.
    """
    from .atomic import write_text_atomic

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    colour = _QUPATH_COLOURS.get(label.lower(), [200, 0, 0])
    feats = []
    for i, (r, c) in enumerate(coords):
        props: dict[str, Any] = {"objectType": "annotation",
                                 "classification": {"name": label, "color": colour},
                                 "isLocked": False}
        p = None if probability is None else float(probability[i])
        if names is not None:
            props["name"] = str(names[i])
        elif p is not None and np.isfinite(p):
            props["name"] = f"lesion {i + 1} (p={p:.3f})"
        if p is not None and np.isfinite(p):
            props["measurements"] = {"probability": p}
        feats.append({"type": "Feature", "id": f"point-{i + 1}",
                      "geometry": {"type": "Point", "coordinates": [round(float(c), 3),
                                                                    round(float(r), 3)]},
                      "properties": props})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats,
                           "properties": {"coordinates": "level-0 pixels, [x, y] = [col, row]",
                                          **(properties or {})}}
    return write_text_atomic(path, json.dumps(doc, indent=1), overwrite=overwrite)


def mask_problem(arr: np.ndarray, *, max_values: int = 16) -> str | None:
    """Why ``arr`` cannot be a tumour mask (``None`` when it can).

    A mask is a 2-D array (or an RGB(A) one whose colour channels are equal) of
    integers or booleans with a few label values; a colour photo or thumbnail, a
    float heatmap or a grey-level picture is not.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and
                np.array_equal(rgb[..., 0], rgb[..., 2])):
            return "a colour (RGB) image, not a mask (a mask has one channel of label values)"
        a = rgb[..., 0]
    if a.ndim != 2:
        return f"expected a 2-D mask, got shape {a.shape}"
    if a.dtype.kind not in "biu":
        return f"a {a.dtype} image, not a mask (expected integer or boolean label values)"
    n = len(np.unique(a[:: max(1, a.shape[0] // 2048), :: max(1, a.shape[1] // 2048)]))
    if n > max_values:
        return (f"{n} distinct grey levels: a picture, not a mask (a mask holds at most "
                f"{max_values} label values)")
    return None
