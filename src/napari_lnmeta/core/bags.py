"""Bags of patch features for MIL (seed 002, Figure 2a; seed 003).

Seed 002 represents a slide by ``M`` bags of ``N`` patches drawn at random from the
slide's annotated tumour regions, and gives every bag the slide's label (and its clinical
data). Seed 003 draws the patches from all the tissue instead, after dropping empty and
artefact patches by the Shannon entropy of the grey patch. Here both are a choice of
*instances* of a feature cache (:func:`select_instances`: all of them, those inside
regions, those above an entropy) followed by the same bag sampling
(:func:`sample_bags`).

A bag never holds the same patch twice unless sampling with replacement is asked for
(``BagSpec.replace``); a slide with fewer patches than ``N`` is an error that says so and
what to do, never a silently smaller or padded bag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from .features import FeatureCache
    from .tiling import PatchGrid


@dataclass
class BagSpec:
    """How bags are drawn from a slide.

    Parameters
    ----------
    size
        ``N``: patches per bag.
    per_slide
        ``M``: bags per slide.
    replace
        Draw a bag's patches with replacement (only then may a slide have fewer than
        ``N`` patches; its bags then repeat patches).
    seed
        Seed of the random draws.
    """

    size: int = 16
    per_slide: int = 10
    replace: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise InputError(f"bag size N must be >= 1, got {self.size}")
        if int(self.per_slide) < 1:
            raise InputError(f"bags per slide M must be >= 1, got {self.per_slide}")
        self.size, self.per_slide = int(self.size), int(self.per_slide)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MILSlide:
    """One slide's instances and labels, as the MIL trainer sees it.

    Attributes
    ----------
    name
        Slide name (unique in a cohort).
    features
        ``(n, D)`` float32 instance features.
    label
        Class index of the slide (``-1``: unknown, inference only).
    clinical
        ``(clinical_dim,)`` encoded clinical vector, or ``None``.
    coords
        ``(n, 2)`` level-0 ``(row, col)`` of the patches (for heatmaps), optional.
    instance_labels
        ``(n,)`` 0/1 per patch when known (benchmarks: is this patch tumour?), optional.
    """

    name: str
    features: np.ndarray
    label: int = -1
    clinical: np.ndarray | None = None
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise InputError(f"{self.name}: features must be (n, D), got {self.features.shape}")
        self.label = int(self.label)

    def __len__(self) -> int:
        return len(self.features)


def check_enough(n: int, spec: BagSpec, slide: str = "slide") -> None:
    """Raise the 'fewer patches than N' error (see module docstring) when it applies."""
    if n == 0:
        raise InputError(f"{slide}: no patches to build bags from (no tissue/region patch "
                         "passed the filters)")
    if n < spec.size and not spec.replace:
        raise InputError(f"{slide}: only {n} patches, fewer than the {spec.size} patches per "
                         f"bag (N); lower the bag size (--bag-size {n} or less), relax the "
                         "tissue/region/entropy filters, or sample with replacement "
                         "(--replace / BagSpec(replace=True))")


def sample_bags(n: int, spec: BagSpec, rng: np.random.Generator | None = None, *,
                slide: str = "slide", m: int | None = None) -> np.ndarray:
    """``(M, N)`` instance indices into ``n`` patches: each row is one random bag.

    Without replacement every bag holds ``N`` distinct patches (bags may share patches);
    with ``replace=True`` patches are drawn independently.
    """
    check_enough(n, spec, slide)
    rng = rng if rng is not None else np.random.default_rng(spec.seed)
    m = spec.per_slide if m is None else int(m)
    if spec.replace:
        return rng.integers(0, n, size=(m, spec.size), dtype=np.int64)
    if n == spec.size:
        return np.stack([rng.permutation(n) for _ in range(m)]).astype(np.int64)
    # argpartition of random keys: N distinct indices per row, vectorised
    keys = rng.random((m, n))
    return np.argpartition(keys, spec.size - 1, axis=1)[:, :spec.size].astype(np.int64)


def make_bags(slides: Sequence[MILSlide], spec: BagSpec, rng: np.random.Generator | None = None,
              *, m: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bags over a cohort: ``(slide index (B,), instance indices (B, N))`` with ``B = sum M``."""
    rng = rng if rng is not None else np.random.default_rng(spec.seed)
    which, idx = [], []
    for k, s in enumerate(slides):
        b = sample_bags(len(s), spec, rng, slide=s.name, m=m)
        which.append(np.full(len(b), k, dtype=np.int64))
        idx.append(b)
    if not idx:
        return np.zeros(0, np.int64), np.zeros((0, spec.size), np.int64)
    return np.concatenate(which), np.concatenate(idx)


def gather(slides: Sequence[MILSlide], which: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``(B, N, D)`` features of bags from :func:`make_bags`."""
    return np.stack([slides[int(w)].features[i] for w, i in zip(which, idx, strict=True)])


# --------------------------------------------------------------------------------------
# Which patches may enter a bag
# --------------------------------------------------------------------------------------
def region_fraction(grid: PatchGrid, regions: Any, *, region_scale: float = 1.0) -> np.ndarray:
    """Fraction of each patch of ``grid`` inside annotated regions.

    ``regions`` is an annotation file (CAMELYON JSON, ASAP XML, GeoJSON, ROI CSV: read by
    :func:`napari_lnmeta.io.annotations.read_polygons`, scaled by ``region_scale``) or a
    list of :class:`~napari_lnmeta.io.annotations.Polygon` in level-0 pixels. Negative
    classes (``normal``, exclusions) are cut out of the regions.
    """
    from ..io.annotations import NEGATIVE_NAMES, Polygon, polygons_to_mask, read_polygons
    from .tissue import box_fractions, integral_image

    polys = read_polygons(regions, scale=region_scale) if isinstance(regions, (str, Path)) \
        else list(regions)
    if not polys or not all(isinstance(p, Polygon) for p in polys):
        raise InputError(f"{regions}: no region polygons")
    # a raster at about a quarter of the stride is precise enough for patch fractions
    ds = max(grid.stride0 / 4, max(grid.slide_shape) / 8192, 1.0)
    lm = polygons_to_mask(polys, grid.slide_shape, ds, source=str(regions))
    keep = [v for v, n in lm.names.items() if n.lower() not in NEGATIVE_NAMES]
    inside = np.isin(lm.labels, keep)
    return box_fractions(integral_image(inside), grid.coords, grid.size0, downsample=ds,
                         origin=lm.frame.origin)


def select_instances(source: FeatureCache | PatchGrid, *, regions: Any = None,
                     region_scale: float = 1.0, min_region: float = 0.5,
                     entropy_min: float | None = None) -> np.ndarray:
    """Indices of the patches that may enter bags.

    Seed 002: ``regions`` (annotated tumour regions; patches with at least ``min_region``
    inside). Seed 003: all tissue patches (``regions=None``), optionally above an
    ``entropy_min`` (bits) when the grid stored patch entropies.
    """
    from .tiling import PatchGrid

    grid = source if isinstance(source, PatchGrid) else source.grid
    keep = np.ones(len(grid), dtype=bool)
    if regions is not None:
        keep &= region_fraction(grid, regions, region_scale=region_scale) >= min_region - 1e-9
    if entropy_min is not None:
        if grid.entropy is None:
            raise InputError(f"{grid.slide}: the features were extracted without patch "
                             "entropies; extract them with --entropy-min to filter by entropy")
        keep &= np.asarray(grid.entropy) >= entropy_min
    return np.flatnonzero(keep)




# --------------------------------------------------------------------------------------
# MIL benchmarks from instance-labelled patches
# --------------------------------------------------------------------------------------
def labelled_instance_bags(features: np.ndarray, labels: np.ndarray, *, n_bags: int,
                           bag_size: int = 16, positive_fraction: float = 0.5,
                           positives: tuple[int, int] = (1, 3),
                           rng: np.random.Generator | None = None,
                           prefix: str = "bag") -> list[MILSlide]:
    """Bags of real patches with known instance labels (a MIL benchmark).

    A positive bag holds between ``positives[0]`` and ``positives[1]`` positive
    (tumour) patches, the rest negative; a negative bag only negative patches. Bag label
    = "holds at least one positive instance", the standard MIL assumption. Each bag is
    returned as a one-bag "slide" whose ``instance_labels`` say which patches are
    positive, so the same trainer and metrics apply.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    labels = np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    lo, hi = int(positives[0]), int(positives[1])
    if not 1 <= lo <= hi <= bag_size:
        raise InputError(f"positives per bag must satisfy 1 <= {lo} <= {hi} <= {bag_size}")
    if len(pos) < hi or len(neg) < bag_size:
        raise InputError(f"need at least {hi} positive and {bag_size} negative patches, "
                         f"have {len(pos)} and {len(neg)}")
    out = []
    for b in range(int(n_bags)):
        is_pos = rng.random() < positive_fraction
        k = int(rng.integers(lo, hi + 1)) if is_pos else 0
        idx = np.r_[rng.choice(pos, k, replace=False),
                    rng.choice(neg, bag_size - k, replace=False)].astype(np.int64)
        idx = idx[rng.permutation(bag_size)]
        out.append(MILSlide(name=f"{prefix}{b:05d}", features=features[idx], label=int(is_pos),
                            instance_labels=labels[idx].astype(np.int64)))
    return out


__all__ = ["BagSpec", "MILSlide", "check_enough", "gather", "labelled_instance_bags", "make_bags",
           "region_fraction", "sample_bags", "select_instances"]
