"""Layer names and napari helpers of the registration widgets (no widget state, no Qt).

The "Register IHC" and "Transfer mask" widgets (:mod:`napari_lnmeta._qt.register_widget`,
:mod:`napari_lnmeta._qt.transfer_widget`) share these: which RGB layers can be
registered, the slide behind a layer, frames placed on a layer, world → level-0
coordinates and the part of a slide in view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .layers import layer_kind, view_box

if TYPE_CHECKING:
    import napari

    from ..io.slide import Slide

REGISTERED_LAYER = "IHC registered"
CHECK_LAYER = "Registration check"
NUDGE_FIXED = "Nudge: H&E points"
NUDGE_MOVING = "Nudge: IHC points"
PREVIEW_LAYER = "Tumour mask (preview)"
MASK_LAYER = "Tumour mask"
META = "lnmeta"
#: longest side (px) of checkerboard / difference views and of the live mask preview
VIEW_SIZE = 1024


# --------------------------------------------------------------------------------------
# Layer helpers (no widget state)
# --------------------------------------------------------------------------------------
def rgb_image_layers(viewer: napari.Viewer) -> list[str]:
    """Names of RGB image layers that can be registered (slides, photos, samples)."""
    return [lyr.name for lyr in viewer.layers
            if layer_kind(lyr) == "image" and getattr(lyr, "rgb", False)
            and lyr.name != CHECK_LAYER and "registration" not in lyr.metadata.get(META, {})]


def layer_slide(layer: napari.layers.Image) -> Slide:
    """The slide behind a layer: re-opened from its file, or the layer's own pixels."""
    from ..io.slide import array_slide
    from .layers import slide_from_layer

    meta = layer.metadata.get(META, {})
    if meta.get("path"):
        return slide_from_layer(layer)
    if "registration" in meta:
        raise InputError(f"layer {layer.name!r} is a registration result, not a slide")
    data = layer.data[0] if layer.multiscale else layer.data
    if not getattr(layer, "rgb", False):
        raise InputError(f"layer {layer.name!r} is not an RGB image")
    if max(data.shape[:2]) > 20000:
        raise InputError(f"layer {layer.name!r} is a large in-memory image; open the slide "
                         "file with napari-lnmeta so it is read lazily")
    return array_slide(np.asarray(data), mpp=meta.get("mpp"), name=layer.name)


def place_on_layer(kw: dict[str, Any], layer, mpp: float | None) -> dict[str, Any]:
    """Frame kwargs (slide pixels or µm) moved into the world frame of ``layer``.

    A slide opened by napari-lnmeta has ``scale = µm/px`` and no translate, which is what
    :func:`~._napari.layers.frame_kwargs` assumes; a plain image layer may have its own
    scale and translate, so pixel-unit frames are mapped through them.
    """
    if mpp is None:
        s = np.asarray(layer.scale[-2:], dtype=float)
        t = np.asarray(layer.translate[-2:], dtype=float)
        kw["scale"] = tuple(np.asarray(kw["scale"], dtype=float) * s)
        kw["translate"] = tuple(np.asarray(kw["translate"], dtype=float) * s + t)
    return kw


def world_to_level0(layer, world: np.ndarray) -> np.ndarray:
    """World ``(N, 2)`` (µm or layer units) → level-0 ``(row, col)`` of the layer's slide."""
    s = np.asarray(layer.scale[-2:], dtype=float)
    t = np.asarray(layer.translate[-2:], dtype=float)
    return (np.asarray(world, dtype=float).reshape(-1, 2)[:, -2:] - t) / s


def visible_region(viewer: napari.Viewer, layer, shape: tuple[int, int],
                   max_size: int = VIEW_SIZE) -> tuple[tuple[float, float], tuple[int, int], float]:
    """``(origin, shape, downsample)`` of a grid covering what the canvas shows of ``layer``."""
    lo0, lo1, hi0, hi1 = view_box(viewer, layer)
    lo, hi = (lo0, lo1), (hi0, hi1)
    y0, x0 = max(0.0, np.floor(lo[0])), max(0.0, np.floor(lo[1]))
    y1, x1 = min(float(shape[0]), np.ceil(hi[0])), min(float(shape[1]), np.ceil(hi[1]))
    if y1 <= y0 or x1 <= x0:
        raise InputError("the H&E is not in view: pan or zoom onto it first")
    ds = max(1.0, max(y1 - y0, x1 - x0) / max_size)
    out = (max(1, int(np.ceil((y1 - y0) / ds))), max(1, int(np.ceil((x1 - x0) / ds))))
    return (y0, x0), out, ds
