"""Layer data for whole-slide predictions: heatmap, binary map, 3-tier map, lesion points.

Every layer is placed with :func:`~napari_lnmeta._napari.layers.frame_kwargs` of the
heatmap's frame (grids) or the slide's µm/px (points in level-0 pixels), so it lies
exactly over the slide layer. Colours are the seed-000 ones from
:mod:`napari_lnmeta.core.heatmap`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .layers import META, frame_kwargs

if TYPE_CHECKING:
    from ..core.lesions import Lesions
    from ..core.predict import Prediction
    from ..io.omezarr import SlideFrame

HEATMAP_LAYER = "Tumour probability"
BINARY_LAYER = "Tumour (p > 0.5)"
TIERS_LAYER = "Tumour tiers (>0.9 red, 0.7-0.9 green, 0.5-0.7 blue)"
LESIONS_LAYER = "Lesion candidates"


def heatmap_colormap():
    """The heatmap colour map (transparent at 0, red at 1)."""
    from napari.utils.colormaps import Colormap

    from ..core.heatmap import HEATMAP_COLORMAP

    return Colormap(colors=[c for _, c in HEATMAP_COLORMAP],
                    controls=[p for p, _ in HEATMAP_COLORMAP], name="lnmeta tumour probability")


def label_colormap(colors: dict[int, tuple[int, int, int, int]]):
    """A direct label colour map: exactly these RGBA (0-255) colours, 0 transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    d: dict[Any, tuple[float, ...]] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for k, c in colors.items():
        d[int(k)] = tuple(v / 255.0 for v in c)
    return DirectLabelColormap(color_dict=d)


def heatmap_layer_data(prob: np.ndarray, frame: SlideFrame, *, name: str = HEATMAP_LAYER,
                       opacity: float = 0.7) -> tuple[Any, dict, str]:
    """An Image layer tuple of a probability grid (hovering shows the probability)."""
    kw = frame_kwargs(frame)
    kw.update(name=name, colormap=heatmap_colormap(), contrast_limits=(0.0, 1.0),
              opacity=float(opacity), blending="translucent", interpolation2d="nearest")
    return np.asarray(prob, dtype=np.float32), kw, "image"


def labels_layer_data(labels: np.ndarray, frame: SlideFrame, colors, *, name: str,
                      opacity: float = 0.5) -> tuple[Any, dict, str]:
    kw = frame_kwargs(frame)
    kw.update(name=name, colormap=label_colormap(colors), opacity=float(opacity))
    return np.asarray(labels), kw, "labels"


def lesions_layer_data(lesions: Lesions, *, name: str = LESIONS_LAYER,
                       size_um: float | None = None) -> tuple[Any, dict, str]:
    """A Points layer of lesion candidates in level-0 pixels, with their probabilities."""
    mpp = lesions.slide_mpp
    scale = (mpp, mpp) if mpp else (1.0, 1.0)
    size = (size_um / mpp if (size_um and mpp) else max(lesions.radius_px / 2, 8.0))
    kw: dict[str, Any] = {
        "name": name, "scale": scale, "size": size, "symbol": "ring",
        "face_color": "transparent", "border_color": "yellow", "border_width": 0.15,
        "features": {"probability": np.asarray(lesions.probability, dtype=np.float32)},
        "text": {"string": "{probability:.2f}", "color": "yellow", "size": 10,
                 "anchor": "upper_left"},
        "metadata": {META: {"lesions": {"threshold": lesions.threshold,
                                        "radius_um": lesions.radius_um}}},
    }
    if mpp:
        kw["units"] = ("µm", "µm")
    return np.asarray(lesions.coords, dtype=np.float64).reshape(-1, 2), kw, "points"


def prediction_layer_data(pred: Prediction, *, opacity: float = 0.7) -> list[tuple[Any, dict, str]]:
    """Heatmap, binary map, 3-tier map and lesion points of a prediction."""
    from ..core.heatmap import BINARY_COLORS, TIER_COLORS

    fr = pred.frame
    prob = np.where(pred.result.scored, pred.probability, 0.0)
    out = [heatmap_layer_data(prob, fr, opacity=opacity),
           labels_layer_data(pred.binary, fr, BINARY_COLORS, name=BINARY_LAYER),
           labels_layer_data(pred.tiers, fr, TIER_COLORS, name=TIERS_LAYER),
           lesions_layer_data(pred.lesions)]
    out[1][1]["visible"] = False  # the tier map shows the same cells in colour
    return out
