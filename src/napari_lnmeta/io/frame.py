"""Where a result grid sits on its slide: :class:`SlideFrame` and the transforms from it.

Every result (mask, heatmap, feature grid, registered image) carries a frame:

``downsample``
    level-0 slide pixels per result pixel (a heatmap at stride 256 has 256);
``origin``
    ``(row, col)`` in level-0 slide pixels of the top-left corner of result pixel (0, 0);
``slide_mpp``
    µm per level-0 slide pixel (``None`` when unknown);
``slide``, ``slide_shape``
    name and ``(height, width)`` of the slide it was computed on.

Result pixel ``(i, j)`` covers level-0 pixels ``[origin + i*downsample,
origin + (i+1)*downsample)``. :func:`layer_transform` gives napari's ``scale`` and
``translate`` so the result lies exactly over the slide; :func:`frame_for` a frame
covering a whole slide at a downsample. The results store
(:mod:`napari_lnmeta.io.omezarr`) keeps the frame in ``.zattrs["lnmeta"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class SlideFrame:
    """Where a result grid sits on its slide (see the module docstring)."""

    downsample: float = 1.0
    origin: tuple[float, float] = (0.0, 0.0)
    slide_mpp: float | None = None
    slide: str | None = None
    slide_shape: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"downsample": float(self.downsample), "origin": [float(v) for v in self.origin],
                "slide_mpp": self.slide_mpp, "slide": self.slide,
                "slide_shape": list(self.slide_shape) if self.slide_shape else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlideFrame:
        return cls(downsample=float(d.get("downsample", 1.0)),
                   origin=tuple(d.get("origin", (0.0, 0.0))),
                   slide_mpp=d.get("slide_mpp"), slide=d.get("slide"),
                   slide_shape=tuple(d["slide_shape"]) if d.get("slide_shape") else None)

    @property
    def mpp(self) -> float | None:
        """µm per result pixel."""
        return None if self.slide_mpp is None else self.slide_mpp * self.downsample


def layer_transform(frame: SlideFrame) -> dict[str, tuple[float, float]]:
    """napari ``scale`` and ``translate`` that put a result grid exactly on its slide.

    The slide layer has ``scale = mpp`` and no translate, so slide pixel *k* is centred
    at ``k * mpp``. Result pixel *i* covers slide pixels ``[o + i*d, o + (i+1)*d)``,
    whose centre is at ``o + i*d + (d - 1)/2``.
    """
    unit = frame.slide_mpp if frame.slide_mpp is not None else 1.0
    d = frame.downsample
    return {"scale": (d * unit, d * unit),
            "translate": tuple((o + (d - 1) / 2) * unit for o in frame.origin)}


def frame_for(slide_shape: tuple[int, int], downsample: float, *, slide_mpp: float | None = None,
              slide: str | None = None) -> tuple[SlideFrame, tuple[int, int]]:
    """A frame at ``downsample`` covering a slide, and its raster shape."""
    h = max(1, math.ceil(slide_shape[0] / downsample))
    w = max(1, math.ceil(slide_shape[1] / downsample))
    return (SlideFrame(downsample=float(downsample), origin=(0.0, 0.0), slide_mpp=slide_mpp,
                       slide=slide, slide_shape=tuple(slide_shape)), (h, w))


__all__ = ["SlideFrame", "frame_for", "layer_transform"]
