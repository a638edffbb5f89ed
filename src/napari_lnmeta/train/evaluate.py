"""Patch-level evaluation of a model file on a held-out patch set, with a written report."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.metrics import (
    evaluate_binary,
    format_table,
    multiclass_metrics,
    plot_roc,
    summary_table,
)
from ..errors import InputError
from ..io import jsonio
from ..models.io import ModelMeta, load_model, resolve_device
from ..progress import Job, Progress
from .datasets import PatchSet
from .loop import predict_patches_job


@dataclass
class EvalResult:
    """Predictions and metrics of one model on one patch set."""

    probs: np.ndarray            # (N, C)
    labels: np.ndarray           # (N,)
    classes: list[str]
    metrics: dict[str, Any]
    per_slide: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""

    @property
    def score(self) -> np.ndarray:
        """Probability of the last (tumour) class."""
        return self.probs[:, -1]


def check_compatible(meta: ModelMeta, ps: PatchSet, model_name: str = "model") -> None:
    """InputError when the patches do not fit the model (size, resolution, classes)."""
    if meta.patch_size != ps.patch_size:
        raise InputError(f"{model_name}: trained on {meta.patch_size} px patches, the patch set "
                         f"has {ps.patch_size} px")
    if meta.mpp and ps.read_mpp and abs(meta.mpp - ps.read_mpp) / meta.mpp > 0.05:
        raise InputError(f"{model_name}: trained at {meta.mpp:.3g} µm/px, the patches are at "
                         f"{ps.read_mpp:.3g} µm/px (remake them with --mpp {meta.mpp:g})")
    if len(meta.classes) != len(ps.classes):
        raise InputError(f"{model_name}: classes {meta.classes} do not match the patch set's "
                         f"{ps.classes}")


def evaluate_job(model_path: str | Path, ps: PatchSet, *, device: str = "auto",
                 batch_size: int = 256, threshold: float = 0.5, n_boot: int = 2000,
                 seed: int = 0, workers: int = 2) -> Job[EvalResult]:
    """Predict every patch and compute the metrics (overall and per slide)."""
    if len(ps) == 0:
        raise InputError("the evaluation patch set is empty")
    dev = resolve_device(device)
    model, meta = load_model(model_path, device=dev)
    check_compatible(meta, ps, Path(model_path).name)
    yield Progress(0, 1, "predicting")
    probs = yield from predict_patches_job(model, ps, meta, device=dev, batch_size=batch_size,
                                   workers=workers)
    y = ps.labels
    binary = len(meta.classes) == 2
    if binary:
        metrics = evaluate_binary(y, probs[:, 1], threshold=threshold, n_boot=n_boot, seed=seed)
    else:
        metrics = multiclass_metrics(y, probs, classes=meta.classes)
    rows = []
    for si, e in enumerate(ps.slides):
        sel = ps.slide_index == si
        if not sel.any():
            continue
        if binary:
            m = evaluate_binary(y[sel], probs[sel, 1], threshold=threshold, n_boot=200, seed=seed)
        else:
            m = multiclass_metrics(y[sel], probs[sel], classes=meta.classes)
        rows.append({"model": Path(model_path).name, "slide": e.name,
                     **{k: v for k, v in m.items() if isinstance(v, (int, float))}})
    yield Progress(1, 1, "metrics")
    return EvalResult(probs=probs, labels=y, classes=list(meta.classes), metrics=metrics,
                      per_slide=rows, model=str(model_path))


def write_patch_report(result: EvalResult, out_dir: str | Path, ps: PatchSet, *,
                 overwrite: bool = False) -> dict[str, Path]:
    """metrics.json, predictions.csv, per_slide.csv, summary.md and roc.png in ``out_dir``."""
    from ..io.atomic import check_output, write_text_atomic

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        check_output(out, overwrite=False)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    paths["metrics"] = write_text_atomic(out / "metrics.json", jsonio.dumps(
        {"model": result.model, "classes": result.classes, "n": int(len(result.labels)),
         "counts": np.bincount(result.labels, minlength=len(result.classes)).tolist(),
         "metrics": result.metrics, "per_slide": result.per_slide}, indent=2, default=float),
        overwrite=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "row", "col", "label"] + [f"p_{c}" for c in result.classes])
    names = ps.slide_names()
    for k in range(len(result.labels)):
        w.writerow([names[ps.slide_index[k]], int(ps.coords[k, 0]), int(ps.coords[k, 1]),
                    int(result.labels[k])] + [f"{v:.5f}" for v in result.probs[k]])
    paths["predictions"] = write_text_atomic(out / "predictions.csv", buf.getvalue(), overwrite=True)
    if result.per_slide:
        buf = io.StringIO()
        keys = list(result.per_slide[0])
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(result.per_slide)
        paths["per_slide"] = write_text_atomic(out / "per_slide.csv", buf.getvalue(), overwrite=True)
        metrics = [m for m in ("ACC", "SEN", "SPE", "F1_weighted", "AUC") if m in keys]
        md = ["# Evaluation", "", f"model: `{Path(result.model).name}`", "",
              "## Per model (mean ± SD across slides)", "",
              format_table(summary_table(result.per_slide, by="model", metrics=metrics),
                           by="model", metrics=metrics), "",
              "## Per slide", "",
              format_table(summary_table(result.per_slide, by="slide", metrics=metrics),
                           by="slide", metrics=metrics), ""]
        paths["summary"] = write_text_atomic(out / "summary.md", "\n".join(md), overwrite=True)
    if len(result.classes) == 2 and 0 < result.labels.sum() < len(result.labels):
        paths["roc"] = plot_roc({Path(result.model).stem: (result.labels, result.probs[:, 1])},
                                out / "roc.png", title="ROC (patch level)")
    return paths


__all__ = ["EvalResult", "check_compatible", "evaluate_job", "write_patch_report"]
