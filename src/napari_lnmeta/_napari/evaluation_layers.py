"""Layers → core inputs for evaluation: detections and ground truth drawn or loaded in
napari, converted to level-0 points, polygons and masks on their
:class:`~napari_lnmeta.io.frame.SlideFrame` for :func:`napari_lnmeta.core.froc.evaluate_slide_job`.

No Qt here: the "Evaluate" widget (:mod:`napari_lnmeta._qt.evaluate_widget`) picks the
layers and calls these.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .layers import META, layer_kind


def level0_points(layer, unit: float | None) -> np.ndarray:
    """Points of a layer in level-0 pixels of the slide: world / slide µm/px."""
    data = np.asarray(layer.data, dtype=np.float64).reshape(-1, layer.ndim)[:, -2:]
    world = data * np.asarray(layer.scale[-2:]) + np.asarray(layer.translate[-2:])
    return world / (unit or 1.0)


def detection_probabilities(layer, n: int) -> np.ndarray:
    """The ``probability`` feature of a Points layer, or 1 for every point without one."""
    feats = getattr(layer, "features", None)
    if feats is not None and "probability" in getattr(feats, "columns", []):
        return np.asarray(feats["probability"], dtype=np.float64)
    return np.ones(n)


def check_units(layer, reference) -> None:
    """Refuse a layer in pixels evaluated against one in µm (or the reverse): they do not
    share a frame, and the FROC of such a pair is meaningless."""
    def unit(ly):
        return "µm" if str(ly.units[-1]) in ("micrometer", "µm") else "pixels"

    if unit(layer) != unit(reference):
        raise InputError(
            f"layer {layer.name!r} is in {unit(layer)} but {reference.name!r} is in "
            f"{unit(reference)}: they do not share a frame; give it the slide's µm/px with "
            "Plugins > LN Metastasis > Pixel size first")


def truth_from_layer(layer, mpp: float | None) -> Any:
    """Ground truth of a layer: level-0 tumour polygons of a Shapes layer, or
    ``(mask, frame)`` of a Labels layer (non-zero = tumour; of a multiscale one, the first
    level at most 8192 px a side)."""
    from ..io.annotations import Polygon
    from ..io.frame import SlideFrame

    unit = mpp or 1.0
    if layer_kind(layer) == "shapes":
        polys = []
        for verts, kind in zip(layer.data, layer.shape_type, strict=True):
            if kind in ("line", "path"):
                continue
            v = np.asarray(verts, dtype=np.float64)[:, -2:]
            world = v * np.asarray(layer.scale[-2:]) + np.asarray(layer.translate[-2:])
            polys.append(Polygon(world / unit, label="tumour"))
        if not polys:
            raise InputError(f"layer {layer.name!r} has no polygon")
        return polys
    data = layer.data
    if getattr(layer, "multiscale", False):
        levels = list(data)
        k = next((i for i, lv in enumerate(levels) if max(lv.shape[-2:]) <= 8192),
                 len(levels) - 1)
        f = levels[0].shape[-1] / levels[k].shape[-1]
        arr = np.asarray(levels[k])
    else:
        f, arr = 1.0, np.asarray(data)
    meta = layer.metadata.get(META, {})
    if "frame" in meta:
        fr = SlideFrame.from_json(meta["frame"])
        fr = SlideFrame(fr.downsample * f, fr.origin, fr.slide_mpp or mpp, fr.slide,
                        fr.slide_shape)
    else:
        d = float(layer.scale[-1]) / unit * f
        origin = tuple(float(t) / unit - (d - 1) / 2 for t in layer.translate[-2:])
        fr = SlideFrame(downsample=d, origin=origin, slide_mpp=mpp)
    return (arr > 0, fr)


def slide_shape(layer) -> tuple[int, int] | None:
    """Level-0 ``(height, width)`` recorded on a slide layer, if any."""
    if layer is not None and layer.metadata.get(META, {}).get("shape"):
        return tuple(int(v) for v in layer.metadata[META]["shape"][:2])
    return None
