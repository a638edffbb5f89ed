"""Building patch sets from slides and label masks: how patches are cut and labelled
(:class:`PatchConfig`), class values of a label mask, the progress generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError, SlideError
from ...io.annotations import NEGATIVE_NAMES, TUMOUR_NAMES, LabelMask, load_labels
from ...progress import Job, Progress, relay, run
from .patchset import PatchSet, SlideEntry

if TYPE_CHECKING:
    from ...io.slide import Slide

FIBROSIS_NAMES = frozenset({"fibrosis", "fib", "tumour fibrosis", "tumor fibrosis",
                            "tumour-associated fibrosis", "desmoplasia"})


@dataclass
class PatchConfig:
    """How patches are cut and labelled (one object from CLI / widget to the core).

    Attributes
    ----------
    patch_size
        Patch side in pixels at the read resolution (seed 000: 90).
    patch_mpp, level
        Read resolution of the patches: µm/px (resampled from the nearest finer level) or a pyramid
        level; with neither, level 0.
    stride
        Grid step in read pixels (default: ``patch_size``, non-overlapping).
    classes
        Class names, negative class first (default ``["normal", "tumour"]``).
    positive_min
        A patch is of a positive class when that class covers *more* than this share.
    negative_max
        A patch is negative when all positive classes together cover at most this.
    min_tissue
        Minimum tissue fraction (Otsu tissue mask) of every kept patch.
    fibrosis_as_tumour
        Count fibrosis labels as tumour (seed 000 "Tumor + FIB").
    negatives
        ``"tissue"``: any tissue patch without tumour is negative (masks transferred
        from IHC, CAMELYON); ``"annotated"``: only patches inside regions labelled as
        normal (sparse drawn annotations).
    balance, neg_ratio
        Subsample negatives to ``neg_ratio`` x the number of positives.
    max_per_class
        Cap on patches per class per slide (after balancing), for quick runs.
    class_map
        Extra label-name -> class-name mapping (case-insensitive).
    require_mpp
        Refuse slides without a known µm/px (the model must know its resolution).
    seed
        Random seed of the subsampling.
    """

    patch_size: int = 90
    patch_mpp: float | None = None
    level: int | None = None
    stride: int | None = None
    classes: list[str] = field(default_factory=lambda: ["normal", "tumour"])
    positive_min: float = 0.2
    negative_max: float = 0.0
    min_tissue: float = 0.5
    tissue_method: str = "otsu"
    fibrosis_as_tumour: bool = False
    negatives: str = "tissue"
    balance: bool = True
    neg_ratio: float = 1.0
    max_per_class: int | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    require_mpp: bool = True
    seed: int = 0

    def __post_init__(self):
        if int(self.patch_size) < 8:
            raise InputError(f"patch size must be at least 8 px, got {self.patch_size}")
        if not 0 <= self.negative_max < self.positive_min < 1 + 1e-9:
            raise InputError(f"need 0 <= negative_max ({self.negative_max}) < positive_min "
                             f"({self.positive_min}) <= 1")
        if len(self.classes) < 2:
            raise InputError(f"need at least 2 classes, got {self.classes}")
        if self.negatives not in ("tissue", "annotated"):
            raise InputError(f"negatives must be 'tissue' or 'annotated', got {self.negatives!r}")
        self.patch_size = int(self.patch_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Building patch sets
# --------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def class_values(labels: LabelMask, config: PatchConfig) -> tuple[dict[int, list[int]], list[int]]:
    """Which raster values count for each positive class, and which are negative.

    Returns ``({class index: [values]}, [negative values])``.
    """
    cls_norm = {_norm(c): i for i, c in enumerate(config.classes)}
    extra = {_norm(k): _norm(v) for k, v in config.class_map.items()}
    binary_tumour = len(config.classes) == 2
    pos: dict[int, list[int]] = {i: [] for i in range(1, len(config.classes))}
    neg: list[int] = []
    for value, name in labels.names.items():
        n = extra.get(_norm(name), _norm(name))
        if n in cls_norm:
            k = cls_norm[n]
            (neg.append(value) if k == 0 else pos[k].append(value))
        elif n in FIBROSIS_NAMES:
            if config.fibrosis_as_tumour:
                tum = next((i for c, i in cls_norm.items() if c in TUMOUR_NAMES), 1)
                pos[tum].append(value)
            else:
                neg.append(value)
        elif n in TUMOUR_NAMES and (binary_tumour or any(c in TUMOUR_NAMES for c in cls_norm)):
            tum = next((i for c, i in cls_norm.items() if c in TUMOUR_NAMES), 1)
            pos[tum].append(value)
        elif n in NEGATIVE_NAMES:
            neg.append(value)
        elif binary_tumour and n.startswith("class "):
            pos[1].append(value)  # an unnamed label in a binary task: tumour
        else:
            raise InputError(f"{labels.source or 'labels'}: label {value} ({name!r}) is not one "
                             f"of the classes {config.classes}; map it with class_map / "
                             "--class-map NAME=CLASS")
    return pos, neg


def fractions_of(labels: LabelMask, values: Sequence[int], coords: np.ndarray,
                 size0: float) -> np.ndarray:
    """Fraction of each square patch (top-left ``coords``, side ``size0`` level-0 px)
    covered by the label ``values`` of ``labels``."""
    from ...core.tissue import box_fractions, integral_image

    if not values:
        return np.zeros(len(coords), dtype=np.float64)
    m = np.isin(labels.labels, list(values))
    return box_fractions(integral_image(m), coords, size0, downsample=labels.frame.downsample,
                         origin=labels.frame.origin)


def patches_from_slide_job(slide: Slide | str | Path, labels: Any, config: PatchConfig, *,
                           source: str = "default", label_scale: float = 1.0,
                           mpp: float | None = None, tissue=None,
                           rng: np.random.Generator | None = None) -> Job[PatchSet]:
    """Cut the labelled patches of one slide (a progress generator returning a PatchSet).

    Parameters
    ----------
    slide
        An open slide or its path.
    labels
        Any source :func:`~napari_lnmeta.io.annotations.load_labels` accepts (a file,
        a :class:`LabelMask`, polygons, an array covering the slide).
    config
        Patch size, resolution and labelling rule.
    source
        Dataset source name (for :func:`mix`).
    label_scale
        Slide pixels per label-file pixel (polygon files made for another resolution).
    mpp
        Level-0 µm/px override for a slide file that does not state it.
    tissue
        A precomputed :class:`~napari_lnmeta.core.tissue.TissueMask` (else detected).

    Raises
    ------
    InputError
        Empty labels, labels outside the tissue, a label raster that does not fit the
        slide, a class without patches, a slide without µm/px.
    """
    from ...core.tiling import make_grid
    from ...core.tissue import tissue_mask
    from ...io.slide import open_slide

    sl = open_slide(slide, mpp=mpp) if isinstance(slide, (str, Path)) else slide
    if config.require_mpp and sl.mpp is None:
        raise SlideError(sl.path, "the physical pixel size (µm/px) is unknown; pass --mpp "
                         "(or mpp=...) so the model knows the resolution it is trained at")
    rng = rng or np.random.default_rng(config.seed)
    yield Progress(0, 4, f"{sl.name}: labels")
    lm = load_labels(labels, slide_shape=sl.shape, slide_mpp=sl.mpp, slide=sl.name,
                     scale=label_scale)
    lm.check_fits(sl.shape, sl.name)
    pos_values, neg_values = class_values(lm, config)
    present = set(lm.present())
    all_pos = [v for vs in pos_values.values() for v in vs]
    if not present:
        raise InputError(f"{lm.source or 'labels'}: the label layer is empty (no labelled pixels)")
    if not (present & set(all_pos)) and config.negatives == "tissue":
        raise InputError(f"{lm.source or 'labels'}: no pixel is labelled as "
                         f"{', '.join(config.classes[1:])} (values present: {sorted(present)})")
    yield Progress(1, 4, f"{sl.name}: tissue")
    if tissue is None:
        # coarse enough to be quick, fine enough that a patch spans >= ~8 mask pixels
        read_mpp = config.patch_mpp or (sl.level_mpp(config.level or 0) if sl.mpp else None)
        target = 10.0 if read_mpp is None else min(32.0, max(8.0, read_mpp * config.patch_size / 8))
        tissue = tissue_mask(sl, target_mpp=target, method=config.tissue_method)
    tm = tissue
    yield Progress(2, 4, f"{sl.name}: grid")
    grid = make_grid(sl, patch_size=config.patch_size, stride=config.stride, mpp=config.patch_mpp,
                     level=config.level, tissue=tm, min_tissue=config.min_tissue)
    if len(grid) == 0:
        raise InputError(f"{sl.name}: no patch of {config.patch_size} px has "
                         f">= {config.min_tissue:.0%} tissue")
    size0 = grid.size0
    fr = np.stack([fractions_of(lm, pos_values[k], grid.coords, size0)
                   for k in range(1, len(config.classes))], axis=1)
    total = fr.sum(axis=1)
    best = fr.argmax(axis=1) + 1
    best_frac = fr.max(axis=1)
    label = np.full(len(grid), -1, dtype=np.int64)
    label[best_frac > config.positive_min] = best[best_frac > config.positive_min]
    if config.negatives == "tissue":
        negmask = total <= config.negative_max + 1e-9
    else:
        nf = fractions_of(lm, neg_values, grid.coords, size0)
        negmask = (total <= config.negative_max + 1e-9) & (nf >= config.min_tissue)
    label[negmask & (label < 0)] = 0
    yield Progress(3, 4, f"{sl.name}: labelling")
    if all_pos and (present & set(all_pos)) and not np.any(total > 0):
        raise InputError(f"{lm.source or 'labels'}: the labels do not overlap the tissue of "
                         f"{sl.name} (no tissue patch contains a labelled pixel; check the label "
                         "scale / that they belong to this slide)")
    keep = np.flatnonzero(label >= 0)
    pos_n = int((label > 0).sum())
    neg_idx = np.flatnonzero(label == 0)
    if config.balance and pos_n and len(neg_idx) > config.neg_ratio * pos_n:
        n_keep = max(1, int(round(config.neg_ratio * pos_n)))
        chosen = rng.choice(neg_idx, n_keep, replace=False)
        keep = np.sort(np.r_[np.flatnonzero(label > 0), chosen])
    if config.max_per_class:
        parts = []
        for c in range(len(config.classes)):
            ci = keep[label[keep] == c]
            if len(ci) > config.max_per_class:
                ci = np.sort(rng.choice(ci, config.max_per_class, replace=False))
            parts.append(ci)
        keep = np.sort(np.concatenate(parts))
    entry = SlideEntry(path=str(sl.path), name=sl.name, patch_size=config.patch_size,
                       level=grid.level, mpp=grid.mpp if grid.level is None else None,
                       downsample=float(grid.downsample), slide_mpp=sl.mpp,
                       mpp_override=sl._mpp_override, source=source)
    ps = PatchSet([entry], np.zeros(len(keep), np.int32), grid.coords[keep], label[keep],
                  total[keep].astype(np.float32), config.classes,
                  meta={"config": config.to_json(), "read_mpp": grid.mpp,
                        "candidates": {"positive": pos_n, "negative": int(len(neg_idx)),
                                       "excluded": int((label < 0).sum()),
                                       "grid": int(len(grid))}})
    yield Progress(4, 4, f"{sl.name}: {len(ps)} patches")
    return ps


def build_patchset_job(items: Sequence[tuple[Any, Any]], config: PatchConfig, *,
                       sources: Sequence[str] | None = None,
                       label_scales: Sequence[float] | None = None,
                       mpps: Sequence[float | None] | None = None,
                       check_classes: bool = True) -> Job[PatchSet]:
    """Patch sets of several ``(slide, labels)`` pairs, joined.

    With ``check_classes`` a class that ends up without any patch is an error (naming
    the class and the slides).
    """
    if not items:
        raise InputError("no slides given")
    rng = np.random.default_rng(config.seed)
    sets = []
    n = len(items)
    for i, (slide, labels) in enumerate(items):
        job = patches_from_slide_job(
            slide, labels, config, source=(sources[i] if sources else "default"),
            label_scale=(label_scales[i] if label_scales else 1.0),
            mpp=(mpps[i] if mpps else None), rng=rng)
        sets.append((yield from relay(job, lambda p, i=i: Progress(i * 4 + p.done, n * 4,
                                                                   p.message))))
    ps = PatchSet.concat(sets)
    if check_classes:
        check_class_counts(ps, what=", ".join(Path(str(s)).name for s, _ in items))
    return ps


def build_patchset(items, config: PatchConfig, **kw) -> PatchSet:
    """:func:`build_patchset_job`, run to completion."""
    return run(build_patchset_job(items, config, **kw))


def check_class_counts(ps: PatchSet, what: str = "the patch set") -> None:
    """InputError naming every class that has no patch."""
    counts = ps.counts()
    empty = [c for c, n in zip(ps.classes, counts, strict=True) if n == 0]
    if empty:
        raise InputError(f"{what}: no patches of class {', '.join(repr(c) for c in empty)} "
                         f"(counts: {dict(zip(ps.classes, counts.tolist(), strict=True))}); "
                         "label more of it, lower the positive threshold or the patch size")
