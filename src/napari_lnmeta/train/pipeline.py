"""From slides + labels to a trained (or evaluated) model in one progress generator.

What the "Train patch classifier" widget runs (and what a notebook can call): the
widget turns its layers into label sources and passes one :class:`TrainingRequest`;
everything here is Qt-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..progress import Job, Progress, relay
from .datasets import PatchConfig, PatchSet, build_patchset_job
from .evaluate import EvalResult, evaluate_job
from .loop import TrainConfig, TrainResult, train_job


@dataclass
class TrainingRequest:
    """One training run from labelled slides.

    Attributes
    ----------
    items
        ``(slide, labels)`` pairs: a slide path or open slide, and any label source of
        :func:`~napari_lnmeta.io.annotations.load_labels` (a ``LabelMask`` from a
        napari Labels layer, a polygon file...).
    patches, train
        Patch and training configuration.
    out_dir
        Run folder (checkpoints, log).
    val_items
        Held-out ``(slide, labels)`` pairs (validation during training); their patches
        are not balanced.
    in_memory
        Read all patches into memory before training (fast for small sets).
    """

    items: list[tuple[Any, Any]]
    patches: PatchConfig
    train: TrainConfig
    out_dir: Path
    val_items: list[tuple[Any, Any]] = field(default_factory=list)
    in_memory: bool = True
    overwrite: bool = True


def _drive(job, lo: int, hi: int, total: int, prefix: str):
    """Re-scale a sub-job's progress into ``[lo, hi]`` of ``total``; return its value."""
    return (yield from relay(job, lambda p: Progress(lo + int(p.fraction * (hi - lo)), total,
                                                     f"{prefix}{p.message}", p.partial)))


def train_from_labels_job(req: TrainingRequest) -> Job[TrainResult]:
    """Build the patch sets, then train (progress: 10 % patches, 90 % training)."""
    if not req.items:
        raise InputError("choose at least one slide with its labels")
    total = 1000
    ps: PatchSet = yield from _drive(build_patchset_job(req.items, req.patches), 0, 80, total,
                                     "training patches: ")
    val = None
    if req.val_items:
        vcfg = dataclasses.replace(req.patches, balance=False)
        val = yield from _drive(build_patchset_job(req.val_items, vcfg, check_classes=False),
                                80, 100, total, "held-out patches: ")
    if req.in_memory:
        yield from _drive(ps.load_pixels_job(), 100, 110, total, "")
        if val is not None:
            yield from _drive(val.load_pixels_job(), 110, 120, total, "")
    result = yield from _drive(train_job(req.train, ps, val, out_dir=req.out_dir,
                                         overwrite=req.overwrite,
                                         patch_config=req.patches.to_json()),
                               120, total, total, "")
    return result


def evaluate_on_labels_job(model_path: str | Path, items: list[tuple[Any, Any]],
                           patches: PatchConfig, *, device: str = "auto") -> Job[EvalResult]:
    """Patch-level evaluation of a model on held-out labelled slides (no balancing)."""
    cfg = dataclasses.replace(patches, balance=False)
    ps = yield from _drive(build_patchset_job(items, cfg, check_classes=False), 0, 50, 100,
                           "held-out patches: ")
    yield from _drive(ps.load_pixels_job(), 50, 60, 100, "")
    result = yield from _drive(evaluate_job(model_path, ps, device=device), 60, 100, 100, "")
    return result


__all__ = ["TrainingRequest", "evaluate_on_labels_job", "train_from_labels_job"]
