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
    from ..io.frame import SlideFrame

HEATMAP_LAYER = "Tumour probability"
BINARY_LAYER = "Tumour (p > 0.5)"
TIERS_LAYER = "Tumour tiers"
LESIONS_LAYER = "Lesion candidates"
#: lesion candidates whose probability is written beside their marker (the most probable)
LABEL_TOP = 10


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
    # saved with File > Save Layer, the heatmap reopens styled (see _napari.writer)
    kw["metadata"][META]["result_attrs"] = {"probability": {"dtype": "float32", "scale": 1}}
    return np.asarray(prob, dtype=np.float32), kw, "image"


def labels_layer_data(labels: np.ndarray, frame: SlideFrame, colors, *, name: str,
                      opacity: float = 0.5) -> tuple[Any, dict, str]:
    kw = frame_kwargs(frame)
    kw.update(name=name, colormap=label_colormap(colors), opacity=float(opacity))
    return np.asarray(labels), kw, "labels"


def lesion_labels(probability, top: int = LABEL_TOP) -> list[str]:
    """``"0.97"``-style labels for the ``top`` most probable lesions, ``""`` for the others.

    Ties at the cut are broken by order (the earlier candidate wins), so exactly
    ``min(top, n)`` labels are written.
    """
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    keep = np.zeros(len(p), dtype=bool)
    if top > 0 and len(p):
        keep[np.argsort(-p, kind="stable")[:top]] = True
    return [f"{v:.2f}" if k else "" for v, k in zip(p, keep, strict=True)]


def lesions_layer_data(lesions: Lesions, *, name: str = LESIONS_LAYER,
                       size_um: float | None = None,
                       label_top: int = LABEL_TOP) -> tuple[Any, dict, str]:
    """A Points layer of lesion candidates in level-0 pixels, with their probabilities.

    Every candidate is a ring; only the ``label_top`` most probable carry their
    probability as text, so a whole-slide view is not buried under labels (hovering any
    point still shows its probability).
    """
    mpp = lesions.slide_mpp
    scale = (mpp, mpp) if mpp else (1.0, 1.0)
    size = (size_um / mpp if (size_um and mpp) else max(lesions.radius_px / 2, 8.0))
    prob = np.asarray(lesions.probability, dtype=np.float32)
    kw: dict[str, Any] = {
        "name": name, "scale": scale, "size": size, "symbol": "ring",
        "face_color": "transparent", "border_color": "yellow", "border_width": 0.15,
        "features": {"probability": prob, "label": lesion_labels(prob, label_top)},
        "text": {"string": "{label}", "color": "yellow", "size": 10,
                 "anchor": "upper_left"},
        "metadata": {META: {"lesions": {"threshold": lesions.threshold,
                                        "radius_um": lesions.radius_um,
                                        "label_top": int(label_top)}}},
    }
    if mpp:
        kw["units"] = ("µm", "µm")
    return np.asarray(lesions.coords, dtype=np.float64).reshape(-1, 2), kw, "points"


def relabel_lesions(layer, top: int) -> None:
    """Show the probability of only the ``top`` most probable points of a lesion layer."""
    feats = layer.features
    if "probability" not in feats:
        return
    labels = lesion_labels(feats["probability"].to_numpy(), top)
    feats = feats.copy()
    feats["label"] = labels
    layer.features = feats
    layer.text = {"string": "{label}", "color": "yellow", "size": 10, "anchor": "upper_left"}
    layer.metadata.setdefault(META, {}).setdefault("lesions", {})["label_top"] = int(top)


def tier_legend_html() -> str:
    """The tier map's legend: a coloured square and the probability range of each tier."""
    from ..core.heatmap import TIER_COLORS, TIER_NAMES

    parts = []
    for k in sorted(TIER_COLORS, reverse=True):
        r, g, b, _ = TIER_COLORS[k]
        parts.append(f'<span style="color:#{r:02x}{g:02x}{b:02x}">&#9632;</span> {TIER_NAMES[k]}')
    return "Tiers: " + " &nbsp; ".join(parts)


def show_colorbar(layer) -> None:
    """Turn on the colour bar of a probability layer (napari's ``layer.colorbar`` overlay)."""
    bar = getattr(layer, "colorbar", None)
    if bar is not None:
        bar.visible = True


def prediction_layer_data(pred: Prediction, *, opacity: float = 0.7,
                          label_top: int = LABEL_TOP) -> list[tuple[Any, dict, str]]:
    """Heatmap, binary map, 3-tier map and lesion points of a prediction."""
    from ..core.heatmap import BINARY_COLORS, TIER_COLORS

    fr = pred.frame
    prob = np.where(pred.result.scored, pred.probability, 0.0)
    out = [heatmap_layer_data(prob, fr, opacity=opacity),
           labels_layer_data(pred.binary, fr, BINARY_COLORS, name=BINARY_LAYER),
           labels_layer_data(pred.tiers, fr, TIER_COLORS, name=TIERS_LAYER),
           lesions_layer_data(pred.lesions, label_top=label_top)]
    out[1][1]["visible"] = False  # the tier map shows the same cells in colour
    return out
