"""Lesion candidates from a probability heatmap by non-maximum suppression (seed 004).

Seed 004 repeats two steps until no value above a threshold is left: take the heatmap
maximum as a lesion, then set every value within a radius of it to zero. Taking the
cells above the threshold in decreasing order and skipping those already suppressed
gives exactly the same points in ``O(K r^2)``.

The connected-component alternative of the CAMELYON16 winner (Wang et al. 2016) is
:func:`component_cells`: threshold the heatmap, label its 8-connected components, and
report one lesion per component at its probability-weighted centroid with the
component's maximum (or mean) probability. :func:`find_lesions` picks either with
``method="nms"`` (default) or ``method="components"``.

Lesions are points in level-0 pixel coordinates of the slide (the centre of their
heatmap cell, pixel-centre convention: slide pixel ``k`` is centred at ``k``), with the
probability of that cell. They are written as QuPath-compatible GeoJSON (one ``Point``
annotation per lesion, classification ``Tumor``, the probability as a measurement).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..io.frame import SlideFrame

#: default suppression radius (µm); Camelyon16 calls metastases >= 200 µm "micro"
DEFAULT_RADIUS_UM = 200.0
#: QuPath class and colour of lesion points
LESION_CLASS = "Tumor"
LESION_COLOR = (200, 0, 0)
#: lesion detection methods of :func:`find_lesions`
LESION_METHODS = ("nms", "components")


@dataclass
class Lesions:
    """Lesion candidates on one slide.

    Attributes
    ----------
    coords
        ``(N, 2)`` float64 level-0 ``(row, col)`` of each lesion (centre of its cell).
    cells
        ``(N, 2)`` int64 heatmap ``(row, col)`` of each lesion.
    probability
        ``(N,)`` float32, in decreasing order.
    threshold
        Only cells with ``p > threshold`` start a lesion.
    radius_um
        Suppression radius in µm (``None`` when the slide's µm/px is unknown and the
        radius was taken in level-0 pixels).
    radius_px
        Suppression radius in level-0 pixels.
    """

    coords: np.ndarray
    cells: np.ndarray
    probability: np.ndarray
    threshold: float
    radius_um: float | None
    radius_px: float
    slide_mpp: float | None = None
    slide: str | None = None
    notes: list[str] = field(default_factory=list)
    #: ``"nms"`` or ``"components"`` (see :func:`find_lesions`)
    method: str = "nms"
    #: components only: ``(N,)`` mean probability and ``(N,)`` number of cells of each
    mean_probability: np.ndarray | None = None
    n_cells: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probability)

    def to_json(self) -> list[dict[str, Any]]:
        """Plain list of ``{"row", "col", "probability", "cell"}`` (level-0 pixels)."""
        out = [{"row": float(r), "col": float(c), "probability": float(p),
                "cell": [int(i), int(j)]}
               for (r, c), p, (i, j) in zip(self.coords, self.probability, self.cells,
                                            strict=True)]
        if self.mean_probability is not None and self.n_cells is not None:
            for d, m, n in zip(out, self.mean_probability, self.n_cells, strict=True):
                d["mean_probability"] = float(m)
                d["n_cells"] = int(n)
        return out


def nms_cells(prob: np.ndarray, *, threshold: float, radius_cells: float,
              scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-maximum suppression on a grid.

    Parameters
    ----------
    prob
        2-D probabilities.
    threshold
        Cells with ``p > threshold`` are candidates.
    radius_cells
        Cells whose centre is within this Euclidean distance (in cells) of a kept
        maximum are suppressed.
    scored
        Optional mask of cells that may be candidates.

    Returns
    -------
    (cells, values)
        ``(N, 2)`` int64 cells and their values, highest first.
    """
    p = np.asarray(prob, dtype=np.float32)
    cand = p > threshold
    if scored is not None:
        cand &= np.asarray(scored, dtype=bool)
    rr, cc = np.nonzero(cand)
    if rr.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    vals = p[rr, cc]
    # stable order: by value, ties broken by raster position (deterministic)
    order = np.lexsort((cc, rr, -vals))
    r = max(0.0, float(radius_cells))
    ri = int(math.floor(r))
    dy, dx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    disk = (dy ** 2 + dx ** 2) <= r * r + 1e-9
    dy, dx = dy[disk], dx[disk]
    suppressed = np.zeros(p.shape, dtype=bool)
    kept: list[int] = []
    h, w = p.shape
    for k in order:
        y, x = rr[k], cc[k]
        if suppressed[y, x]:
            continue
        kept.append(k)
        yy, xx = y + dy, x + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        suppressed[yy[ok], xx[ok]] = True
    kept_a = np.asarray(kept, dtype=np.int64)
    cells = np.stack([rr[kept_a], cc[kept_a]], axis=1).astype(np.int64)
    return cells, vals[kept_a].astype(np.float32)


def component_cells(prob: np.ndarray, *, threshold: float,
                    scored: np.ndarray | None = None, value: str = "max",
                    connectivity: int = 2) -> dict[str, np.ndarray]:
    """Lesions as connected components of ``prob > threshold`` (CAMELYON16 winner).

    Parameters
    ----------
    prob
        2-D probabilities.
    threshold
        Cells with ``p > threshold`` (and ``scored``) form the bitmask.
    scored
        Optional mask of cells that may belong to a lesion.
    value
        The lesion's probability: ``"max"`` (default) or ``"mean"`` of its cells.
    connectivity
        2 (default): 8-connected components; 1: 4-connected.

    Returns
    -------
    dict
        ``centroid`` ``(N, 2)`` float64 probability-weighted centroid in cells,
        ``peak`` ``(N, 2)`` int64 cell of the maximum, ``probability`` ``(N,)`` float32
        (by ``value``), ``max`` and ``mean`` ``(N,)`` float32, ``n_cells`` ``(N,)`` int64;
        ordered by decreasing probability (ties by raster position of the peak).
    """
    from scipy import ndimage as ndi

    if value not in ("max", "mean"):
        raise ValueError(f"value must be 'max' or 'mean', got {value!r}")
    p = np.asarray(prob, dtype=np.float32)
    fg = p > threshold
    if scored is not None:
        fg &= np.asarray(scored, dtype=bool)
    structure = ndi.generate_binary_structure(2, 2 if connectivity == 2 else 1)
    lab, n = ndi.label(fg, structure=structure)
    if n == 0:
        z = np.zeros(0, np.float32)
        return {"centroid": np.zeros((0, 2)), "peak": np.zeros((0, 2), np.int64),
                "probability": z, "max": z, "mean": z, "n_cells": np.zeros(0, np.int64)}
    idx = np.arange(1, n + 1)
    pw = np.where(fg, p, 0.0).astype(np.float64)
    mx = np.asarray(ndi.maximum(p, lab, idx), dtype=np.float32)
    mean = np.asarray(ndi.mean(p, lab, idx), dtype=np.float32)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    cen = np.asarray(ndi.center_of_mass(pw, lab, idx), dtype=np.float64).reshape(-1, 2)
    peak = np.asarray(ndi.maximum_position(p, lab, idx), dtype=np.int64).reshape(-1, 2)
    val = mx if value == "max" else mean
    order = np.lexsort((peak[:, 1], peak[:, 0], -val))
    return {"centroid": cen[order], "peak": peak[order], "probability": val[order],
            "max": mx[order], "mean": mean[order], "n_cells": counts[order]}


def cell_centers(cells: np.ndarray, frame: SlideFrame) -> np.ndarray:
    """Level-0 ``(row, col)`` (pixel-centre convention) of heatmap cell centres."""
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    d = frame.downsample
    return np.asarray(frame.origin, dtype=np.float64) + cells * d + (d - 1) / 2


def find_lesions(prob: np.ndarray, frame: SlideFrame, *, threshold: float = 0.5,
                 radius_um: float = DEFAULT_RADIUS_UM,
                 scored: np.ndarray | None = None, method: str = "nms",
                 value: str = "max") -> Lesions:
    """Lesion candidates by non-maximum suppression (seed 004) or connected components.

    Parameters
    ----------
    prob
        Probability heatmap.
    frame
        Its frame on the slide (gives cell size and position).
    threshold
        Only ``p > threshold`` starts a lesion.
    radius_um
        Suppression radius in µm. When the slide's µm/px is unknown the radius is taken
        in level-0 pixels (and noted).
    scored
        Analysed cells (others never become lesions).
    method
        ``"nms"`` (seed 004, default) or ``"components"`` (CAMELYON16 winner: one
        lesion per 8-connected component of ``p > threshold``, at its
        probability-weighted centroid; ``radius_um`` is then unused).
    value
        Components only: the lesion probability is the component's ``"max"`` or
        ``"mean"``.
    """
    if method not in LESION_METHODS:
        raise ValueError(f"lesion method must be one of {LESION_METHODS}, got {method!r}")
    notes = []
    if frame.slide_mpp is not None:
        radius_px = radius_um / frame.slide_mpp
        r_um: float | None = float(radius_um)
    else:
        radius_px = float(radius_um)
        r_um = None
        notes.append("slide µm/px unknown: lesion radius taken in level-0 pixels")
    if method == "components":
        comp = component_cells(prob, threshold=threshold, scored=scored, value=value)
        return Lesions(coords=cell_centers(comp["centroid"], frame), cells=comp["peak"],
                       probability=comp["probability"], threshold=float(threshold),
                       radius_um=None, radius_px=0.0, slide_mpp=frame.slide_mpp,
                       slide=frame.slide, notes=[], method="components",
                       mean_probability=comp["mean"], n_cells=comp["n_cells"])
    cells, vals = nms_cells(prob, threshold=threshold, radius_cells=radius_px / frame.downsample,
                            scored=scored)
    return Lesions(coords=cell_centers(cells, frame), cells=cells, probability=vals,
                   threshold=float(threshold), radius_um=r_um, radius_px=float(radius_px),
                   slide_mpp=frame.slide_mpp, slide=frame.slide, notes=notes)


def lesions_geojson(lesions: Lesions) -> dict[str, Any]:
    """QuPath-style GeoJSON ``FeatureCollection`` of lesion points.

    Coordinates are ``[x, y]`` = ``[col, row]`` in level-0 pixels (pixel-centre
    convention, as everywhere in this package).
    """
    feats = []
    for n, ((r, c), p) in enumerate(zip(lesions.coords, lesions.probability, strict=True), 1):
        feats.append({
            "type": "Feature",
            "id": f"lesion-{n}",
            "geometry": {"type": "Point", "coordinates": [float(c), float(r)]},
            "properties": {
                "objectType": "annotation",
                "name": f"lesion {n} (p={float(p):.3f})",
                "classification": {"name": LESION_CLASS, "color": list(LESION_COLOR)},
                "isLocked": False,
                "measurements": _measurements(lesions, n - 1, p),
            },
        })
    return {"type": "FeatureCollection", "features": feats,
            "properties": {"slide": lesions.slide, "method": lesions.method,
                           "threshold": lesions.threshold,
                           "radius_um": lesions.radius_um, "radius_px": lesions.radius_px,
                           "coordinates": "level-0 pixels, [x, y] = [col, row]"}}


def _measurements(lesions: Lesions, k: int, p: float) -> dict[str, float]:
    m = {"probability": float(p)}
    if lesions.mean_probability is not None and lesions.n_cells is not None:
        m["mean_probability"] = float(lesions.mean_probability[k])
        m["n_cells"] = float(lesions.n_cells[k])
    return m


def write_lesions_geojson(path: str | Path, lesions: Lesions, *, overwrite: bool = False) -> Path:
    """Write :func:`lesions_geojson` atomically."""
    from ..io.atomic import write_json_atomic

    return write_json_atomic(path, lesions_geojson(lesions), overwrite=overwrite)


def read_lesions_geojson(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Points written by :func:`write_lesions_geojson`: ``(N, 2)`` (row, col) and probabilities."""
    from ..errors import InputError

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a GeoJSON file ({e})") from e
    rows, probs = [], []
    for f in d.get("features", []):
        g = f.get("geometry") or {}
        if g.get("type") != "Point":
            continue
        x, y = g["coordinates"][:2]
        rows.append((float(y), float(x)))
        m = (f.get("properties") or {}).get("measurements") or {}
        probs.append(float(m.get("probability", np.nan)) if isinstance(m, dict) else np.nan)
    return (np.asarray(rows, dtype=np.float64).reshape(-1, 2),
            np.asarray(probs, dtype=np.float32))
