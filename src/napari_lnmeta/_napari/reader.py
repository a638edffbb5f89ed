"""napari reader: slides, masks, lnmeta results and result folders, annotations.

``napari_get_reader`` looks at names, directory layout and magic bytes, then opens the
file's *metadata* (no pixels). It returns ``None`` (never raises) for anything it cannot
read, missing, empty, truncated or mislabelled files included, so napari can try other
readers or report that nothing could open the file.

What opens as what:

* a whole-slide image, OME-TIFF, OME-Zarr, PNG/JPEG: one RGB multiscale Image;
* a single-channel PNG/TIFF with a few integer values (a tumour mask such as
  ``tumor_001_level5_tumor_mask.png``): a Labels layer, offered as ground truth;
* one lnmeta result store (``probability.ome.zarr``, ``tiers.ome.zarr``,
  ``attention.ome.zarr``, a transferred mask...): one layer, styled as the widget that
  made it styles it (heat colour map, contrast, opacity, label colours);
* a result folder (``lnmeta predict`` / ``lnmeta mil`` output, or any folder of lnmeta
  stores and GeoJSON files): all its layers, in place and styled;
* GeoJSON / CAMELYON16 JSON / ASAP XML annotations: polygons as a Shapes layer, points
  (lesion candidates) as a Points layer with their probabilities, in level-0 pixels of
  the slide (µm when a sibling ``summary.json`` gives the slide's µm/px).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..io.slide import MppWarning, sniff

#: µm/px warnings already shown in this process (napari may ask a reader more than once)
_ANNOUNCED: set[str] = set()

#: result stores of a prediction folder, in the order they are layered
_FOLDER_ORDER = ("analysed.ome.zarr", "probability.ome.zarr", "binary.ome.zarr",
                 "tiers.ome.zarr", "attention.ome.zarr")
_ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")


def _zattrs(path: Path) -> dict[str, Any] | None:
    attrs = path / ".zattrs"
    if not attrs.is_file():
        return None
    try:
        meta = json.loads(attrs.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_result(path: Path) -> bool:
    meta = _zattrs(path)
    return meta is not None and ("lnmeta" in meta or "image-label" in meta)


def _folder_items(path: Path) -> list[Path]:
    """The lnmeta stores and GeoJSON files of a result folder (empty: not a result folder)."""
    if not path.is_dir() or _zattrs(path) is not None:
        return []
    stores = sorted((p for p in path.iterdir() if p.is_dir() and _is_result(p)),
                    key=lambda p: (_FOLDER_ORDER.index(p.name) if p.name in _FOLDER_ORDER
                                   else len(_FOLDER_ORDER), p.name))
    if not stores:
        return []
    return stores + sorted(p for p in path.iterdir()
                           if p.is_file() and p.name.lower().endswith(".geojson"))


def napari_get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(path)
        if p.is_dir() and _is_result(p):
            from ..io.omezarr import read_ome_zarr

            result = read_ome_zarr(p)
            return lambda _path: [result_layer_data(result)]
        items = _folder_items(p) if p.is_dir() else []
        if items:
            return lambda _path: folder_layer_data(p, items)
        if p.is_file() and p.name.lower().endswith(_ANNOTATION_SUFFIXES):
            data = annotation_layer_data(p)
            return (lambda _path: data) if data else None
        if sniff(p) is None:
            return None
        mask = mask_layer_data(p)
        if mask is not None:
            return lambda _path: [mask]
        from ..io.slide import open_slide

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MppWarning)
            slide = open_slide(p)
    except Exception:  # a reader must never raise: decline instead
        return None
    messages = [str(w.message) for w in caught if issubclass(w.category, MppWarning)]

    def reader(_path):
        from .layers import slide_layer_data

        if messages:
            from napari.utils.notifications import show_warning

            for m in messages:
                if m not in _ANNOUNCED:  # once per file, however often napari asks
                    _ANNOUNCED.add(m)
                    show_warning(m + " — or set it with Plugins > LN Metastasis > Pixel size")
        return [slide_layer_data(slide)]

    return reader


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
def result_layer_data(res, *, name: str | None = None):
    """Layer data tuple for a result read by :func:`napari_lnmeta.io.omezarr.read_ome_zarr`,
    styled by what it holds (probability heatmap, MIL attention, label colours)."""
    from .layers import META, frame_kwargs

    kw = frame_kwargs(res.frame)
    kw["name"] = name or res.path.name.replace(".ome.zarr", "").replace(".zarr", "")
    kw["multiscale"] = len(res.pyramid) > 1
    data = res.pyramid if len(res.pyramid) > 1 else res.pyramid[0]
    ln = res.attrs.get("lnmeta", {})
    kw["metadata"][META]["path"] = str(res.path)
    kw["metadata"][META]["result_attrs"] = {k: ln[k] for k in ("probability", "mil") if k in ln}
    if res.kind == "labels":
        colors = _label_colors(res.attrs)
        if colors:
            from .prediction_layers import label_colormap

            kw["colormap"] = label_colormap(colors)
        if "opacity" in ln:
            kw["opacity"] = float(ln["opacity"])
        return (data, kw, "labels")
    dtype = res.pyramid[0].dtype
    if "contrast_limits" in ln:
        kw["contrast_limits"] = tuple(ln["contrast_limits"])
    elif dtype.kind == "u" and dtype.itemsize == 1:
        kw["contrast_limits"] = (0, 255)
    elif dtype.kind == "f":
        kw["contrast_limits"] = (0.0, 1.0)
    if "probability" in ln:  # a tumour-probability heatmap: as Detect metastases shows it
        from .prediction_layers import heatmap_colormap

        kw.update(colormap=heatmap_colormap(), opacity=0.7, blending="translucent",
                  interpolation2d="nearest")
    elif "mil" in ln:  # MIL attention: as the Slide-level MIL widget shows it
        kw.update(colormap="inferno", opacity=0.6, blending="translucent",
                  interpolation2d="nearest")
    if ln.get("colormap"):
        kw["colormap"] = ln["colormap"]
    if "opacity" in ln:
        kw["opacity"] = float(ln["opacity"])
    if res.pyramid[0].ndim == 3 and res.pyramid[0].shape[-1] in (3, 4):
        kw["rgb"] = True
    return (data, kw, "image")


def _label_colors(attrs: dict[str, Any]) -> dict[int, tuple[int, int, int, int]]:
    out = {}
    for c in (attrs.get("image-label") or {}).get("colors") or []:
        try:
            out[int(c["label-value"])] = tuple(int(v) for v in c["rgba"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _folder_mpp(folder: Path) -> float | None:
    """The slide's level-0 µm/px from a result folder's ``summary.json`` (or ``None``)."""
    p = folder / "summary.json"
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    for v in ((s.get("slide") or {}).get("mpp"), (s.get("frame") or {}).get("slide_mpp")):
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None


def folder_layer_data(folder: Path, items: list[Path] | None = None) -> list[tuple]:
    """All layers of a result folder, named and styled as the widget that made them."""
    from ..io.omezarr import read_ome_zarr
    from .prediction_layers import BINARY_LAYER, HEATMAP_LAYER, TIERS_LAYER

    names = {"probability.ome.zarr": HEATMAP_LAYER, "binary.ome.zarr": BINARY_LAYER,
             "tiers.ome.zarr": TIERS_LAYER, "analysed.ome.zarr": "Analysed cells"}
    out = []
    mpp = _folder_mpp(folder)
    for p in items if items is not None else _folder_items(folder):
        if p.is_dir():
            res = read_ome_zarr(p)
            if mpp is None:
                mpp = res.frame.slide_mpp
            data, kw, kind = result_layer_data(res, name=names.get(p.name))
            if p.name in ("binary.ome.zarr", "analysed.ome.zarr"):
                kw["visible"] = False  # the tier map shows the same cells in colour
            out.append((data, kw, kind))
        else:
            out += annotation_layer_data(p, mpp=mpp)
    return out


# --------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------
def annotation_layer_data(path: Path, *, mpp: float | None = None) -> list[tuple]:
    """Shapes (polygons) and Points (point features) of an annotation file, in level-0
    pixels placed in µm when ``mpp`` (or a sibling ``summary.json``) gives the µm/px.

    Returns ``[]`` when the file holds neither (a JSON file that is not an annotation).
    """
    from ..errors import LnmetaError
    from ..io.annotations import read_points_geojson, read_polygons
    from .layers import META

    if mpp is None:
        mpp = _folder_mpp(path.parent)
    scale = (mpp, mpp) if mpp else (1.0, 1.0)
    common: dict[str, Any] = {"scale": scale}
    if mpp:
        common["units"] = ("µm", "µm")
    stem = path.name.split(".")[0]
    out: list[tuple] = []
    try:
        polys = read_polygons(path)
    except LnmetaError:
        polys = []
    if polys:
        colours = {"tumour": "red", "tumor": "red", "normal": "green"}
        edge = [colours.get(p.label.lower(), "yellow") for p in polys]
        allv = np.concatenate([p.vertices for p in polys])
        span = float((allv.max(axis=0) - allv.min(axis=0)).max())
        kw = {**common, "name": stem, "shape_type": "polygon", "edge_color": edge,
              "edge_width": max(2.0, span / 300), "face_color": "transparent",
              "features": {"label": [p.label for p in polys]},
              "metadata": {META: {"path": str(path), "annotation": True,
                                  **({"mpp": mpp} if mpp else {})}}}
        out.append(([np.asarray(p.vertices, dtype=np.float64) for p in polys], kw, "shapes"))
    if path.name.lower().endswith((".geojson", ".json")):
        try:
            pts = read_points_geojson(path)
        except LnmetaError:
            pts = None
        if pts is not None and len(pts["coords"]):
            out.append(_points_layer_data(path, stem, pts, mpp, common))
    return out


def _points_layer_data(path: Path, stem: str, pts: dict[str, Any], mpp: float | None,
                       common: dict[str, Any]) -> tuple:
    from .layers import META
    from .prediction_layers import LESIONS_LAYER

    prob = pts["probability"]
    has_p = bool(np.isfinite(prob).any())
    lesions = stem == "lesions"
    size = 100.0 / mpp if mpp else 16.0  # a 100 µm ring (16 px when µm/px is unknown)
    kw: dict[str, Any] = {**common, "name": LESIONS_LAYER if lesions else f"{stem} points",
                          "size": size, "symbol": "ring", "face_color": "transparent",
                          "border_color": "yellow", "border_width": 0.15,
                          "features": {"probability": prob},
                          "metadata": {META: {"path": str(path),
                                              **({"mpp": mpp} if mpp else {}),
                                              **({"lesions": dict(pts["properties"] or {})}
                                                 if lesions else {})}}}
    if has_p:
        kw["text"] = {"string": "{probability:.2f}", "color": "yellow", "size": 10,
                      "anchor": "upper_left"}
    return pts["coords"], kw, "points"


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------
def mask_layer_data(path: Path) -> tuple | None:
    """A Labels layer tuple when ``path`` is a single-channel mask image (PNG/BMP/TIFF
    with at most 16 integer values), else ``None`` (it is a picture or a slide)."""
    from ..io.annotations import mask_problem
    from .layers import META

    low = path.name.lower()
    if low.endswith((".png", ".bmp")):
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("1", "L", "P", "I", "I;16"):
                return None
            if im.mode == "P":
                return None  # a palette image is a picture unless its palette is grey
            arr = np.asarray(im)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        levels = [arr]
    elif low.endswith((".tif", ".tiff")):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            if tf.is_ome or tf.pages[0].samplesperpixel != 1:
                return None
            ser = tf.series[0]
            if ser.dtype.kind not in "biu" or len(ser.shape) != 2:
                return None
            n_levels = len(getattr(ser, "levels", [ser]))
        import dask.array as da
        import zarr

        store = tifffile.imread(path, aszarr=True)
        grp = zarr.open(store, mode="r")
        levels = ([da.from_zarr(grp[str(i)]) for i in range(n_levels)]
                  if n_levels > 1 else [da.from_zarr(grp)])
        thumb = np.asarray(levels[-1][:: max(1, levels[-1].shape[0] // 1024),
                                      :: max(1, levels[-1].shape[1] // 1024)])
        if mask_problem(thumb) is not None:
            return None
    else:
        return None
    if mask_problem(np.asarray(levels[-1])) is not None:
        return None
    kw: dict[str, Any] = {"name": path.name.split(".")[0], "opacity": 0.5,
                          "multiscale": len(levels) > 1,
                          "metadata": {META: {"path": str(path), "mask": True,
                                              "shape": list(levels[0].shape[:2])}}}
    return (levels if len(levels) > 1 else levels[0]), kw, "labels"
