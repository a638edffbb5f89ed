"""Pixel size (µm/px) of napari layers: set it on any layer, or carry a slide's to the
masks and annotations drawn or opened over it.

Conventions (as everywhere in the plugin, see :mod:`napari_lnmeta.io.omezarr`):

* a **slide** layer (opened by our reader) has ``scale = (mpp, mpp)``; its metadata
  ``mpp`` is what the widgets pass to ``open_slide`` when they re-open it, so setting it
  here is the GUI's ``--mpp``;
* a **result** layer (a grid with a frame: heatmap, tissue mask...) is placed by
  ``layer_transform(frame)``; setting µm/px sets its slide's level-0 µm/px;
* a result layer computed on a slide while its µm/px was unknown is re-placed when
  that slide's µm/px is applied to the others;
* any **other** layer (a mask PNG, a Labels layer painted by hand, Shapes or Points in
  level-0 pixels) gets ``scale = (value, value)``: µm per pixel of its own data.

:func:`apply_slide_mpp` places layers that are still in pixels over a slide: an
Image/Labels layer whose shape has the slide's aspect ratio is taken to cover the whole
slide (a 1/32 mask gets 32× the slide's µm/px and a half-pixel shift, exactly as a result
grid with ``downsample = 32``), and Shapes/Points are taken to be in the slide's level-0
pixels (QuPath, CAMELYON16 polygons).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io.frame import SlideFrame, layer_transform
from .layers import META

if TYPE_CHECKING:
    import napari

UM = ("µm", "µm")
#: the largest mismatch between a mask's and its slide's aspect ratio still taken as the
#: same extent (mask sizes are rounded to whole pixels at each level)
ASPECT_TOLERANCE = 0.02


def _meta(layer) -> dict[str, Any]:
    return layer.metadata.get(META, {})


def is_slide_layer(layer) -> bool:
    m = _meta(layer)
    return (layer._type_string == "image" and bool(m.get("path")) and "frame" not in m
            and not m.get("mask"))


def in_micrometres(layer) -> bool:
    return str(layer.units[-1]) in ("micrometer", "µm")


def layer_mpp(layer) -> float | None:
    """The µm/px shown for a layer: level-0 for slides and results, else its own pixels."""
    m = _meta(layer)
    if "frame" in m:
        return SlideFrame.from_json(m["frame"]).slide_mpp
    if m.get("mpp"):
        return float(m["mpp"])
    return float(layer.scale[-1]) if in_micrometres(layer) else None


def _data_shape(layer) -> tuple[int, int]:
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    shape = tuple(int(s) for s in data.shape)
    if getattr(layer, "rgb", False):
        shape = shape[:-1]
    return shape[-2:]


def set_layer_mpp(layer, mpp: float) -> None:
    """Set a layer's pixel size in µm (module docstring), keep it in place, units µm."""
    if not (mpp and np.isfinite(mpp) and mpp > 0):
        raise InputError(f"layer {layer.name!r}: the pixel size must be a positive number of "
                         f"µm/px, got {mpp!r}")
    m = dict(_meta(layer))
    if "frame" in m:
        fr = SlideFrame.from_json(m["frame"])
        fr.slide_mpp = float(mpp)
        tr = layer_transform(fr)
        layer.scale, layer.translate = tr["scale"], tr["translate"]
        m["frame"] = fr.to_json()
    else:
        old = np.asarray(layer.scale[-2:], dtype=float)
        new = np.array([mpp, mpp], dtype=float)
        layer.translate = tuple(np.asarray(layer.translate[-2:], dtype=float) * new / old)
        layer.scale = tuple(new)
        m["mpp"] = float(mpp)
        if is_slide_layer(layer):
            m["mpp_source"] = "set in napari"
    layer.metadata[META] = m
    layer.units = UM


def _frame_of(layer, slide_layer) -> bool:
    """A result layer whose frame belongs to ``slide_layer`` and has no µm/px yet."""
    m = _meta(layer)
    if "frame" not in m:
        return False
    fr = SlideFrame.from_json(m["frame"])
    slide_path = _meta(slide_layer).get("path")
    names = {slide_layer.name} | ({Path(slide_path).name} if slide_path else set())
    return fr.slide_mpp is None and fr.slide in names


def apply_slide_mpp(viewer: napari.Viewer, slide_layer, targets=None) -> list[str]:
    """Place the layers still in pixels (or ``targets``) over ``slide_layer`` in µm.

    Returns the names of the layers placed. Raises :class:`InputError` when the slide's
    µm/px is unknown, or when an Image/Labels target does not have the slide's aspect
    ratio (it cannot cover the slide: set its µm/px by hand instead).
    """
    mpp = layer_mpp(slide_layer)
    if mpp is None:
        raise InputError(f"layer {slide_layer.name!r}: its µm/px is unknown; set it first")
    sh, sw = _data_shape(slide_layer)
    if targets is None:
        targets = [ly for ly in viewer.layers
                   if ly is not slide_layer and not in_micrometres(ly)
                   and not is_slide_layer(ly)
                   and ("frame" not in _meta(ly) or _frame_of(ly, slide_layer))]
    placed = []
    for ly in targets:
        kind = ly._type_string
        if _frame_of(ly, slide_layer):  # a result computed on this slide in pixels
            set_layer_mpp(ly, mpp)
        elif kind in ("shapes", "points"):
            ly.scale = (mpp, mpp)
            ly.translate = (0.0, 0.0)
            m = dict(_meta(ly))
            m["mpp"] = mpp
            ly.metadata[META] = m
            ly.units = UM
        elif kind in ("image", "labels"):
            h, w = _data_shape(ly)
            fy, fx = sh / h, sw / w
            if abs(fy - fx) > ASPECT_TOLERANCE * max(fy, fx):
                raise InputError(
                    f"layer {ly.name!r} ({h}×{w} px) does not have the aspect ratio of "
                    f"slide {slide_layer.name!r} ({sh}×{sw} px), so it cannot cover it; set "
                    "its µm/px by hand")
            d = (fy + fx) / 2
            fr = SlideFrame(downsample=d, slide_mpp=mpp, slide=slide_layer.name,
                            slide_shape=(sh, sw))
            tr = layer_transform(fr)
            ly.scale, ly.translate = tr["scale"], tr["translate"]
            m = dict(_meta(ly))
            m["frame"] = fr.to_json()
            ly.metadata[META] = m
            ly.units = UM
        else:
            continue
        placed.append(ly.name)
    return placed
