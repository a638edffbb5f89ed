"""napari writers: Labels/Image layers to multiscale OME-Zarr, Shapes and Points to QuPath
GeoJSON.

Labels keep their colours: the layer's colour of every label value present is stored in
the NGFF ``image-label`` metadata, which the reader turns back into the same colours.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.frame import SlideFrame
from ..io.omezarr import write_ome_zarr
from .layers import META


def _frame_from_meta(meta: dict[str, Any]) -> SlideFrame:
    ln = (meta.get("metadata") or {}).get(META, {})
    if "frame" in ln:
        return SlideFrame.from_json(ln["frame"])
    if "mpp" in ln:  # a slide layer itself
        return SlideFrame(downsample=1.0, slide_mpp=ln["mpp"], slide=ln.get("path"),
                          slide_shape=tuple(ln["shape"]) if ln.get("shape") else None)
    # A layer made by hand: its scale is µm per pixel if it overlays a slide in µm.
    scale = meta.get("scale")
    s = float(scale[-1]) if scale is not None else 1.0
    return SlideFrame(downsample=1.0, slide_mpp=s if s != 1.0 else None)


def _level0(data, multiscale: bool):
    return data[0] if multiscale or isinstance(data, list) else data


def _label_values(data: Any, multiscale: bool, limit: int = 1024) -> np.ndarray:
    """The non-zero label values present (from the finest level that is small enough)."""
    levels = list(data) if (multiscale or isinstance(data, list)) else [data]
    lv = next((a for a in levels if np.prod(a.shape[-2:]) <= 64e6), levels[-1])
    vals = np.unique(np.asarray(lv))
    return vals[vals != 0][:limit]


def label_colors(colormap: Any, values: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """RGBA (0-255) of each label value under a napari label colour map."""
    if colormap is None or not len(values):
        return {}
    rgba = np.asarray(colormap.map(np.asarray(values)), dtype=np.float64).reshape(-1, 4)
    return {int(v): tuple(int(round(c * 255)) for c in col)
            for v, col in zip(values, rgba, strict=True)}


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    multiscale = meta.get("multiscale", False)
    arr = _level0(data, multiscale)
    if not np.issubdtype(np.asarray(arr[:1, :1]).dtype, np.integer):
        arr = arr.astype(np.int32)
    colors = label_colors(meta.get("colormap"), _label_values(data, multiscale))
    attrs = {"opacity": float(meta["opacity"])} if meta.get("opacity") is not None else {}
    out = write_ome_zarr(path, arr, frame=_frame_from_meta(meta), kind="labels",
                         name=meta.get("name"), overwrite=True, colors=colors, attrs=attrs)
    return [str(out)]


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    arr = _level0(data, meta.get("multiscale", False))
    attrs: dict[str, Any] = {}
    ln = (meta.get("metadata") or {}).get(META, {})
    frame_attrs = ln.get("result_attrs") or {}
    for key in ("probability", "mil"):  # keep what makes a heatmap reopen styled
        if key in frame_attrs:
            attrs[key] = frame_attrs[key]
    if meta.get("opacity") is not None:
        attrs["opacity"] = float(meta["opacity"])
    if meta.get("contrast_limits") is not None:
        attrs["contrast_limits"] = [float(v) for v in meta["contrast_limits"]]
    out = write_ome_zarr(path, arr, frame=_frame_from_meta(meta), kind="image",
                         name=meta.get("name"), overwrite=True, attrs=attrs)
    return [str(out)]


def _ellipse_ring(corners: np.ndarray, n: int = 64) -> np.ndarray:
    centre = corners.mean(axis=0)
    r = np.abs(corners - centre).max(axis=0)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + r[0] * np.sin(t), centre[1] + r[1] * np.cos(t)], axis=1)


def write_shapes(path: str, data: Any, meta: dict) -> list[str]:
    """Shapes → QuPath GeoJSON in level-0 pixels of the slide the layer overlays.

    Layer coordinates become world coordinates (``data * scale + translate``); world is
    µm when the slide's µm/px is known from the layer's lnmeta metadata, else pixels.
    Polygons, rectangles and ellipses are written; lines and paths are not regions and
    are skipped.
    """
    from ..io.annotations import Polygon, write_geojson

    scale = np.asarray(meta.get("scale", (1.0, 1.0)), dtype=float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), dtype=float)[-2:]
    frame = _frame_from_meta({"metadata": meta.get("metadata")})
    ln = (meta.get("metadata") or {}).get(META, {})
    mpp = frame.slide_mpp if ("frame" in ln or "mpp" in ln) else None
    types = meta.get("shape_type") or ["polygon"] * len(data)
    polys = []
    for i, (verts, kind) in enumerate(zip(data, types, strict=False)):
        v = np.asarray(verts, dtype=float)[:, -2:]
        if kind in ("line", "path"):
            continue
        if kind == "ellipse":
            v = _ellipse_ring(v)
        world = v * scale + translate
        level0 = world / mpp if mpp else world
        name = meta.get("name") or "shape"
        label = "tumour"
        feats = meta.get("features")
        if feats is not None and "label" in getattr(feats, "columns", []):
            label = str(feats["label"].iloc[i])
        polys.append(Polygon(level0, label=label, name=f"{name}-{i}"))
    out = write_geojson(path, polys, overwrite=True)
    return [str(out)]


def write_points(path: str, data: Any, meta: dict) -> list[str]:
    """Points → QuPath GeoJSON point annotations in level-0 pixels of the slide.

    As for Shapes, world coordinates are divided by the slide's µm/px when the layer
    carries it (lnmeta metadata or a lesion layer placed in µm). A ``probability``
    feature (lesion candidates) is written as a QuPath measurement and read back.
    """
    from ..io.annotations import write_points_geojson

    pts = np.asarray(data, dtype=float)
    pts = pts.reshape(-1, pts.shape[-1] if pts.ndim == 2 else 2)
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), dtype=float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), dtype=float)[-2:]
    world = pts[:, -2:] * scale + translate
    ln = (meta.get("metadata") or {}).get(META, {})
    mpp = ln.get("mpp") or (SlideFrame.from_json(ln["frame"]).slide_mpp if "frame" in ln
                            else None)
    units = meta.get("units")
    if mpp is None and units is not None and "lesions" in ln and str(units[-1]) in (
            "µm", "micrometer", "micron"):
        mpp = float(scale[-1])  # lesion points: level-0 pixels scaled by µm/px
    level0 = world / mpp if mpp else world
    feats = meta.get("features")
    prob = None
    if feats is not None and "probability" in getattr(feats, "columns", []):
        prob = np.asarray(feats["probability"], dtype=float)
    out = write_points_geojson(path, level0, probability=prob, overwrite=True,
                               properties={"layer": meta.get("name")})
    return [str(out)]
