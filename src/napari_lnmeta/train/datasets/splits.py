"""Splitting patch sets by slide or by region of a slide, and mixing sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import InputError
from .patchset import PatchSet


# --------------------------------------------------------------------------------------
# Splits and mixing
# --------------------------------------------------------------------------------------
def split_by_slide(ps: PatchSet, *, test: Sequence[str] | None = None, test_fraction: float = 0.3,
                   seed: int = 0) -> tuple[PatchSet, PatchSet]:
    """Train / test split by whole slides (names or paths in ``test``, else a fraction)."""
    names = ps.slide_names()
    if test is None:
        if len(names) < 2:
            raise InputError("a split by slide needs at least 2 slides; use split_by_region "
                             "(--holdout-region) for a single slide")
        rng = np.random.default_rng(seed)
        k = min(len(names) - 1, max(1, int(round(test_fraction * len(names)))))
        test_idx = set(rng.choice(len(names), k, replace=False).tolist())
    else:
        wanted = {Path(t).name for t in test}
        test_idx = {i for i, e in enumerate(ps.slides) if e.name in wanted or e.path in set(test)}
        unknown = wanted - {ps.slides[i].name for i in test_idx}
        if unknown:
            raise InputError(f"test slides not in the patch set: {sorted(unknown)}")
    is_test = np.isin(ps.slide_index, list(test_idx))
    return ps.subset(~is_test), ps.subset(is_test)


def split_by_region(ps: PatchSet, box: Sequence[float], *, slide: str | None = None,
                    margin: float = 0.0) -> tuple[PatchSet, PatchSet]:
    """Train / test split by a level-0 rectangle ``(row0, col0, row1, col1)``.

    Test patches lie entirely inside the box; training patches entirely outside it
    grown by ``margin`` level-0 pixels; patches across the border are dropped from
    both, so no pixel is in both sets. ``slide`` restricts the box to one slide (other
    slides go to training).
    """
    outside, inside = region_masks(ps, box, slide=slide, margin=margin)
    return ps.subset(outside), ps.subset(inside)


def region_masks(ps: PatchSet, box: Sequence[float], *, slide: str | None = None,
                 margin: float = 0.0, what: str = "patch set") -> tuple[np.ndarray, np.ndarray]:
    """``(outside, inside)`` masks of :func:`split_by_region`'s rule over ``ps``'s patches."""
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (y1 > y0 and x1 > x0):
        raise InputError(f"hold-out region must be (row0, col0, row1, col1) with row1 > row0 "
                         f"and col1 > col0, got {tuple(box)}")
    size0 = np.array([e.patch_size * e.downsample for e in ps.slides])[ps.slide_index] \
        if len(ps) else np.zeros(0)
    r, c = ps.coords[:, 0].astype(np.float64), ps.coords[:, 1].astype(np.float64)
    inside = (r >= y0) & (c >= x0) & (r + size0 <= y1) & (c + size0 <= x1)
    m = float(margin)
    outside = (r + size0 <= y0 - m) | (r >= y1 + m) | (c + size0 <= x0 - m) | (c >= x1 + m)
    if slide is not None:
        on = np.array([e.name == Path(slide).name or e.path == str(slide) for e in ps.slides])
        if not on.any():
            raise InputError(f"slide {slide} is not in the {what}")
        on_p = on[ps.slide_index]
        inside &= on_p
        outside |= ~on_p
    return outside, inside


def mix(sets: dict[str, PatchSet], proportions: dict[str, float], *, total: int | None = None,
        seed: int = 0, stratify: bool = True) -> PatchSet:
    """Mix sources in given proportions (seed 000's "Interhospital": 50 % local, 50 % CAMELYON16).

    Samples without replacement; ``total`` defaults to the largest size every source
    can supply. With ``stratify`` each source keeps its own class balance.
    """
    if set(sets) != set(proportions):
        raise InputError(f"proportions {sorted(proportions)} do not match sources {sorted(sets)}")
    w = np.array([float(proportions[k]) for k in sets])
    if np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"proportions must be non-negative and not all zero: {proportions}")
    w = w / w.sum()
    sizes = np.array([len(s) for s in sets.values()])
    cap = int(np.floor(np.min(np.where(w > 0, sizes / np.where(w > 0, w, 1), np.inf))))
    total = cap if total is None else int(total)
    if total > cap:
        raise InputError(f"cannot draw {total} patches in proportions {proportions} "
                         f"(the sources supply at most {cap})")
    rng = np.random.default_rng(seed)
    parts = []
    for (name, ps), wi in zip(sets.items(), w, strict=True):
        k = int(round(total * wi))
        if k == 0:
            continue
        if stratify:
            counts = ps.counts().astype(np.float64)
            per = np.floor(counts / counts.sum() * k).astype(int)
            per[np.argmax(counts)] += k - per.sum()
            idx = np.concatenate([rng.choice(np.flatnonzero(ps.labels == c), per[c], replace=False)
                                  for c in range(len(ps.classes)) if per[c] > 0])
        else:
            idx = rng.choice(len(ps), k, replace=False)
        sub = ps.subset(np.sort(idx))
        for e in sub.slides:
            e.source = name
        parts.append(sub)
    return PatchSet.concat(parts)
