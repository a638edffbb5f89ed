"""napari writers: Labels/Image layers to multiscale OME-Zarr, Shapes to QuPath GeoJSON."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.omezarr import SlideFrame, write_ome_zarr
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


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    arr = _level0(data, meta.get("multiscale", False))
    if not np.issubdtype(np.asarray(arr[:1, :1]).dtype, np.integer):
        arr = arr.astype(np.int32)
    out = write_ome_zarr(path, arr, frame=_frame_from_meta(meta), kind="labels",
                         name=meta.get("name"), overwrite=True)
    return [str(out)]


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    arr = _level0(data, meta.get("multiscale", False))
    attrs = {}
    if meta.get("contrast_limits") is not None:
        attrs["contrast_limits"] = [float(v) for v in meta["contrast_limits"]]
    out = write_ome_zarr(path, arr, frame=_frame_from_meta(meta), kind="image",
                         name=meta.get("name"), overwrite=True, attrs=attrs)
    return [str(out)]
