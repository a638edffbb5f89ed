"""Layer builders: turn slides and results into napari layer data tuples, and reuse layers.

Everything here is placed in micrometres when the slide's µm/px is known (pixel units
otherwise), so slides, masks and heatmaps overlay exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..io.frame import SlideFrame, layer_transform

if TYPE_CHECKING:
    import napari

    from ..io.slide import Slide

#: metadata key under which every lnmeta layer keeps its provenance
META = "lnmeta"


def slide_layer_data(slide: Slide, *, name: str | None = None) -> tuple[Any, dict, str]:
    """A multiscale RGB image layer tuple for a slide (lazy: nothing is read)."""
    mpp = slide.mpp
    scale = (mpp, mpp) if mpp is not None else (1.0, 1.0)
    meta = {META: {"path": str(slide.path), "mpp": mpp, "mpp_source": slide.mpp_source,
                   "shape": list(slide.shape), "format": slide.format}}
    kwargs = {"name": name or slide.name, "rgb": True, "multiscale": True,
              "contrast_limits": (0, 255), "scale": scale, "metadata": meta}
    if mpp is not None:
        kwargs["units"] = ("µm", "µm")
    return slide.pyramid(), kwargs, "image"


def frame_kwargs(frame: SlideFrame) -> dict[str, Any]:
    """``scale``/``translate``/``units``/metadata for a result grid on its slide."""
    kw: dict[str, Any] = dict(layer_transform(frame))
    if frame.slide_mpp is not None:
        kw["units"] = ("µm", "µm")
    kw["metadata"] = {META: {"frame": frame.to_json()}}
    return kw


def frame_from_layer(layer: napari.layers.Layer) -> SlideFrame:
    """The slide frame of a layer made by lnmeta, or one derived from its scale."""
    meta = layer.metadata.get(META, {})
    if "frame" in meta:
        return SlideFrame.from_json(meta["frame"])
    mpp = meta.get("mpp")
    shape = tuple(meta["shape"]) if "shape" in meta else None
    name = meta.get("path")
    return SlideFrame(downsample=1.0, slide_mpp=mpp, slide=name, slide_shape=shape)


def slide_from_layer(layer: napari.layers.Layer, *, mpp: float | None = None) -> Slide:
    """Re-open the slide behind an image layer opened by our reader."""
    from ..errors import InputError
    from ..io.slide import open_slide

    meta = layer.metadata.get(META, {})
    path = meta.get("path")
    if not path:
        raise InputError(f"layer {layer.name!r} was not opened from a slide file by napari-lnmeta")
    import warnings

    from ..io.slide import MppWarning

    # the reader told the user about a missing µm/px when the file was opened: once per file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return open_slide(path, mpp=mpp if mpp is not None else meta.get("mpp"))


def add_or_update(viewer: napari.Viewer, data: Any, kwargs: dict[str, Any],
                  layer_type: str) -> napari.layers.Layer:
    """Add a layer, or replace the data of an existing layer with the same name and type."""
    name = kwargs.get("name")
    if name is not None and name in viewer.layers:
        layer = viewer.layers[name]
        if layer_kind(layer) == layer_type:
            layer.data = data
            for key in ("scale", "translate"):
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            if "metadata" in kwargs:
                layer.metadata.update(kwargs["metadata"])
            for key in ("features", "text"):  # points: per-point values follow the new data
                if key in kwargs and hasattr(layer, key):
                    setattr(layer, key, kwargs[key])
            layer.refresh()
            return layer
        viewer.layers.remove(name)
    return getattr(viewer, f"add_{layer_type}")(data, **kwargs)


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def layer_kind(layer) -> str:
    """``"image"``, ``"labels"``, ``"points"``, ``"shapes"``... from the layer's public class.

    Dock widgets receive napari's public-only viewer proxy, where ``layer._type_string`` raises a
    "Private attribute access" warning; the class name gives the same string publicly.
    """
    import napari.layers

    for kind in ("image", "labels", "points", "shapes", "surface", "tracks", "vectors"):
        cls = getattr(napari.layers, kind.capitalize(), None)
        if cls is not None and isinstance(layer, cls):
            return kind
    return type(layer).__name__.lower()


def canvas_size(viewer) -> tuple[int, int]:
    """``(height, width)`` of the canvas in screen pixels (public API; ``(600, 800)`` unknown)."""
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9
    size = getattr(canvas, "size", None)
    if size is not None and len(size) >= 2 and min(size[-2:]) > 0:
        return int(size[-2]), int(size[-1])
    return 600, 800


def view_box(viewer, layer) -> tuple[float, float, float, float]:
    """The part of ``layer`` the canvas shows: ``(row0, col0, row1, col1)`` in the layer's
    data pixels (level 0 for a slide layer), not clipped to the layer. Public API only
    (:func:`viewer_camera`, :func:`canvas_size`), so it works through napari's proxy."""
    import numpy as np

    cam = viewer_camera(viewer)
    centre = np.asarray(cam.center[-2:], dtype=np.float64)
    half = np.asarray(canvas_size(viewer), dtype=np.float64) / max(float(cam.zoom), 1e-9) / 2
    scale = np.asarray(layer.scale[-2:], dtype=np.float64)
    translate = np.asarray(layer.translate[-2:], dtype=np.float64)
    lo, hi = (centre - half - translate) / scale, (centre + half - translate) / scale
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def is_slide_layer(layer) -> bool:
    """An image layer of a slide file opened by napari-lnmeta (not a result drawn over it)."""
    meta = layer.metadata.get(META, {})
    return layer_kind(layer) == "image" and bool(meta.get("path")) and "frame" not in meta


def slide_layer_names(viewer) -> list[str]:
    """Names of the viewer's slide layers (:func:`is_slide_layer`), in layer order."""
    return [ly.name for ly in viewer.layers if is_slide_layer(ly)]
