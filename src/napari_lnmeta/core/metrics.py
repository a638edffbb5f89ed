"""Evaluation metrics (numpy / scipy only; no torch, no Qt).

Used by training, evaluation, FROC and the separability analysis alike, so they live in
``core`` below :mod:`napari_lnmeta.train`.

Patch- and slide-level numbers of the seeds: ACC, SEN (recall of the positive class),
SPE, PPV, NPV, F1, weighted F1 (seed 000's "F1"), ROC AUC with a bootstrap 95 %
confidence interval, DeLong's test between two models scored on the same cases
(seed 002), confusion matrices, per-slide tables with mean ± SD across slides and
across models (seed 000, Tables 5–6) and ROC plots as PNG.

Conventions: ``y_true`` holds class indices (binary: 0 = negative, 1 = positive);
``y_score`` is the probability (or any score) of the positive class; undefined ratios
(a zero denominator) are ``nan``, never an exception.

The DeLong implementation follows the structural-component form of DeLong, DeLong &
Clarke-Pearson (1988, Biometrics 44:837–845) computed with midranks as in Sun & Xu
(2014, IEEE Signal Processing Letters 21:1389–1393).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

BINARY_KEYS = ("ACC", "SEN", "SPE", "PPV", "NPV", "F1", "F1_weighted", "AUC")


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def _as_labels(y: Any, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(f"{name} must hold integer class labels")
        y = y.astype(np.int64)
    return y


def _binary(y_true: Any) -> np.ndarray:
    y = _as_labels(y_true)
    bad = set(np.unique(y).tolist()) - {0, 1}
    if bad:
        raise InputError(f"binary metrics need labels 0/1, got also {sorted(bad)}")
    return y


def _scores(y_score: Any, n: int, name: str = "y_score") -> np.ndarray:
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.shape != (n,):
        raise InputError(f"{name} has shape {s.shape}, expected ({n},)")
    if not np.all(np.isfinite(s)):
        raise InputError(f"{name} contains NaN or infinite values")
    return s


# --------------------------------------------------------------------------------------
# Confusion matrix and threshold metrics
# --------------------------------------------------------------------------------------
def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """``C[i, j]`` = number of cases of true class ``i`` predicted as ``j`` (as sklearn)."""
    yt, yp = _as_labels(y_true), _as_labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise InputError(f"y_true and y_pred differ in length ({len(yt)} vs {len(yp)})")
    if n_classes is None:
        n_classes = int(max(yt.max(initial=-1), yp.max(initial=-1))) + 1
    if len(yt) and (min(yt.min(), yp.min()) < 0 or max(yt.max(), yp.max()) >= n_classes):
        raise InputError(f"labels must be in 0..{n_classes - 1}")
    return np.bincount(yt * n_classes + yp, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes).astype(np.int64)


def per_class_report(cm: np.ndarray, classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of every class from a confusion matrix."""
    cm = np.asarray(cm)
    out = []
    for k in range(cm.shape[0]):
        tp = cm[k, k]
        prec = _div(tp, cm[:, k].sum())
        rec = _div(tp, cm[k, :].sum())
        f1 = _div(2 * tp, cm[:, k].sum() + cm[k, :].sum())
        out.append({"class": classes[k] if classes else str(k), "precision": prec,
                    "recall": rec, "f1": f1, "support": int(cm[k, :].sum())})
    return out


def weighted_f1(cm: np.ndarray) -> float:
    """Support-weighted mean of the per-class F1 (sklearn ``average="weighted"``)."""
    rep = per_class_report(cm)
    sup = np.array([r["support"] for r in rep], dtype=np.float64)
    f1 = np.array([0.0 if math.isnan(r["f1"]) else r["f1"] for r in rep])
    return _div(float((f1 * sup).sum()), float(sup.sum()))


def binary_metrics(y_true: Any, y_score: Any = None, *, y_pred: Any = None,
                   threshold: float = 0.5) -> dict[str, float]:
    """ACC, SEN, SPE, PPV, NPV, F1, weighted F1, AUC and the four counts.

    Parameters
    ----------
    y_true
        0/1 labels.
    y_score
        Positive-class scores (an ``(N, 2)`` probability array is accepted); the
        prediction is ``y_score >= threshold``. Without scores give ``y_pred``; AUC is
        then ``nan``.
    """
    y = _binary(y_true)
    if y_pred is None:
        if y_score is None:
            raise InputError("give y_score or y_pred")
        s = _scores(y_score, len(y))
        pred = (s >= threshold).astype(np.int64)
    else:
        pred = _binary(y_pred)
        s = None if y_score is None else _scores(y_score, len(y))
    cm = confusion_matrix(y, pred, 2)
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    out = {"ACC": _div(tp + tn, len(y)), "SEN": _div(tp, tp + fn), "SPE": _div(tn, tn + fp),
           "PPV": _div(tp, tp + fp), "NPV": _div(tn, tn + fn), "F1": _div(2 * tp, 2 * tp + fp + fn),
           "F1_weighted": weighted_f1(cm),
           "AUC": roc_auc(y, s) if s is not None else float("nan"),
           "TP": tp, "FP": fp, "TN": tn, "FN": fn, "n": int(len(y))}
    return out


def multiclass_metrics(y_true: Any, proba: Any = None, *, y_pred: Any = None,
                       classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1, macro and weighted F1, OvR AUCs.

    ``proba`` is ``(N, C)``; the prediction is its argmax. Binary problems get the
    :func:`binary_metrics` keys as well (class 1 positive).
    """
    yt = _as_labels(y_true)
    p = None
    if proba is not None:
        p = np.asarray(proba, dtype=np.float64)
        if p.ndim != 2 or len(p) != len(yt):
            raise InputError(f"proba must be (N, C) with N={len(yt)}, got {p.shape}")
    if y_pred is None:
        if p is None:
            raise InputError("give proba or y_pred")
        y_pred = p.argmax(axis=1)
    n_classes = len(classes) if classes else (p.shape[1] if p is not None else None)
    cm = confusion_matrix(yt, y_pred, n_classes)
    rep = per_class_report(cm, classes)
    f1s = [r["f1"] for r in rep if r["support"] > 0]
    out: dict[str, Any] = {"ACC": _div(np.trace(cm), cm.sum()), "per_class": rep,
                           "F1_macro": float(np.nanmean(f1s)) if f1s else float("nan"),
                           "F1_weighted": weighted_f1(cm), "confusion": cm.tolist(),
                           "n": int(len(yt))}
    if p is not None:
        aucs = {}
        for k in range(p.shape[1]):
            yk = (yt == k).astype(np.int64)
            name = classes[k] if classes else str(k)
            aucs[name] = roc_auc(yk, p[:, k]) if 0 < yk.sum() < len(yk) else float("nan")
        out["AUC_ovr"] = aucs
    if cm.shape[0] == 2:
        out.update(binary_metrics(yt, None if p is None else p[:, 1], y_pred=y_pred))
    return out


# --------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------
def midrank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], n]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks_sorted[:] = np.repeat(avg, ends - starts)
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def roc_auc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count 1/2); ``nan`` with one class."""
    y = _binary(y_true)
    s = _scores(y_score, len(y))
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return float("nan")
    r = midrank(s)
    return float((r[y == 1].sum() - m * (m + 1) / 2) / (m * n))


def roc_curve(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, starting at (0, 0).

    Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    y = _binary(y_true)
    s = _scores(y_score, len(y))
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1 - tps)
    P, N = tps[-1] if len(tps) else 0, fps[-1] if len(fps) else 0
    tpr = np.r_[0.0, tps / P] if P else np.r_[0.0, np.full(len(tps), np.nan)]
    fpr = np.r_[0.0, fps / N] if N else np.r_[0.0, np.full(len(fps), np.nan)]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thr


def auc_bootstrap_ci(y_true: Any, y_score: Any, *, n_boot: int = 2000, alpha: float = 0.05,
                     seed: int | None = 0, stratified: bool = True) -> tuple[float, float, float]:
    """ROC AUC with a percentile bootstrap ``1 - alpha`` confidence interval.

    Cases are resampled with replacement; ``stratified`` resamples positives and
    negatives separately (so every replicate has both classes and the class balance of
    the test set). Returns ``(auc, low, high)``.
    """
    y = _binary(y_true)
    s = _scores(y_score, len(y))
    auc = roc_auc(y, s)
    if math.isnan(auc):
        return auc, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        if stratified:
            idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        else:
            idx = rng.integers(0, len(y), len(y))
        stats[b] = roc_auc(y[idx], s[idx])
    stats = stats[~np.isnan(stats)]
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return auc, float(lo), float(hi)


def bootstrap_ci(y_true: Any, y_score: Any, metric: str, *, threshold: float = 0.5,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int | None = 0) -> tuple[float, float, float]:
    """Percentile bootstrap CI of any :func:`binary_metrics` key (stratified resampling)."""
    y = _binary(y_true)
    s = _scores(y_score, len(y))
    value = binary_metrics(y, s, threshold=threshold)[metric]
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    stats = []
    for _ in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)) if len(pos) else pos,
                    rng.choice(neg, len(neg)) if len(neg) else neg]
        stats.append(binary_metrics(y[idx], s[idx], threshold=threshold)[metric])
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[~np.isnan(stats)]
    if not len(stats):
        return value, float("nan"), float("nan")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (for SEN, SPE, ACC...)."""
    from scipy.stats import norm

    if n == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(1 - alpha / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------
def delong_components(y_true: Any, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and structural components of ``k`` score vectors on the same cases.

    Parameters
    ----------
    scores
        ``(k, N)`` scores (or ``(N,)`` for one model).

    Returns
    -------
    (aucs, V10, V01)
        ``(k,)`` AUCs; ``(k, m)`` placements of the ``m`` positives
        (``V10[r, i]`` = fraction of negatives ranked below positive ``i``, ties 1/2);
        ``(k, n)`` placements of the ``n`` negatives (fraction of positives above).
    """
    y = _binary(y_true)
    sc = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if sc.shape[1] != len(y):
        raise InputError(f"scores have {sc.shape[1]} cases, labels {len(y)}")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        raise InputError(f"DeLong needs at least 2 positive and 2 negative cases "
                         f"(got {m} and {n})")
    k = sc.shape[0]
    v10 = np.empty((k, m))
    v01 = np.empty((k, n))
    aucs = np.empty(k)
    for r in range(k):
        x, z = sc[r, pos], sc[r, neg]
        tx, ty, tz = midrank(x), midrank(z), midrank(sc[r])
        tzx, tzy = tz[pos], tz[neg]
        aucs[r] = (tzx.sum() - m * (m + 1) / 2) / (m * n)
        v10[r] = (tzx - tx) / n          # negatives below each positive
        v01[r] = 1.0 - (tzy - ty) / m    # positives above each negative
    return aucs, v10, v01


def delong_cov(y_true: Any, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix ``S = S10 / m + S01 / n``."""
    aucs, v10, v01 = delong_components(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return aucs, s10 / m + s01 / n


def delong_ci(y_true: Any, y_score: Any, alpha: float = 0.05) -> tuple[float, float, float]:
    """AUC with DeLong's asymptotic ``1 - alpha`` interval (clipped to [0, 1])."""
    from scipy.stats import norm

    aucs, cov = delong_cov(y_true, np.asarray(y_score)[None])
    se = math.sqrt(max(cov[0, 0], 0.0))
    z = float(norm.ppf(1 - alpha / 2))
    a = float(aucs[0])
    return a, max(0.0, a - z * se), min(1.0, a + z * se)


@dataclass
class DeLongResult:
    """Paired comparison of two AUCs on the same cases."""

    auc1: float
    auc2: float
    diff: float          # auc1 - auc2
    se: float            # standard error of the difference
    z: float
    p: float             # two-sided
    ci_low: float        # 95 % (1 - alpha) interval of the difference
    ci_high: float
    var1: float
    var2: float
    cov: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def delong_test(y_true: Any, score1: Any, score2: Any, *, alpha: float = 0.05) -> DeLongResult:
    """DeLong's test of ``AUC1 == AUC2`` for two models scored on the same cases.

    ``z = (AUC1 - AUC2) / sqrt(V1 + V2 - 2 C)`` with the DeLong (1988) covariance; the
    p-value is two-sided from the standard normal. Identical scores give ``z = 0``,
    ``p = 1``.
    """
    from scipy.stats import norm

    y = _binary(y_true)
    s1, s2 = _scores(score1, len(y), "score1"), _scores(score2, len(y), "score2")
    aucs, cov = delong_cov(y, np.vstack([s1, s2]))
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(aucs[0] - aucs[1])
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        z, p = 0.0 if diff == 0 else math.copysign(math.inf, diff), 1.0 if diff == 0 else 0.0
    else:
        z = diff / se
        p = float(2 * norm.sf(abs(z)))
    q = float(norm.ppf(1 - alpha / 2))
    return DeLongResult(float(aucs[0]), float(aucs[1]), diff, se, float(z), p,
                        diff - q * se, diff + q * se, float(cov[0, 0]), float(cov[1, 1]),
                        float(cov[0, 1]))


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------
def evaluate_binary(y_true: Any, y_score: Any, *, threshold: float = 0.5, n_boot: int = 2000,
                    alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Everything the reports print for one binary model on one test set.

    Point metrics, AUC with a bootstrap CI and DeLong CI, Wilson CIs for ACC / SEN /
    SPE, and the confusion matrix.
    """
    y = _binary(y_true)
    s = _scores(y_score, len(y))
    out: dict[str, Any] = binary_metrics(y, s, threshold=threshold)
    if 0 < y.sum() < len(y):
        auc, lo, hi = auc_bootstrap_ci(y, s, n_boot=n_boot, alpha=alpha, seed=seed)
        out["AUC_CI"] = [lo, hi]
        if min(int(y.sum()), int(len(y) - y.sum())) >= 2:
            out["AUC_DeLong_CI"] = list(delong_ci(y, s, alpha)[1:])
    tp, fp, tn, fn = out["TP"], out["FP"], out["TN"], out["FN"]
    out["ACC_CI"] = list(wilson_ci(tp + tn, len(y), alpha))
    out["SEN_CI"] = list(wilson_ci(tp, tp + fn, alpha))
    out["SPE_CI"] = list(wilson_ci(tn, tn + fp, alpha))
    out["confusion"] = [[tn, fp], [fn, tp]]
    out["threshold"] = threshold
    return out


def summary_table(records: Iterable[Mapping[str, Any]], *, by: str,
                  metrics: Sequence[str] = ("ACC", "SEN", "SPE", "F1_weighted", "AUC")) -> list[dict[str, Any]]:
    """Mean ± SD of metrics per group (seed 000, Tables 5–6).

    ``records`` are rows such as ``{"model": "A", "slide": "s1", "ACC": 0.9, ...}``;
    ``by="model"`` averages each model over slides (Table 5), ``by="slide"`` each slide
    over models (Table 6). SD is the sample standard deviation (``ddof=1``; ``nan`` for
    a single value); ``nan`` metrics are ignored.
    """
    rows = list(records)
    if not rows:
        raise InputError("no rows to summarise")
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        if by not in r:
            raise InputError(f"row without a {by!r} column: {dict(r)}")
        groups.setdefault(r[by], []).append(r)
    out = []
    for key, grp in groups.items():
        row: dict[str, Any] = {by: key, "n": len(grp)}
        for m in metrics:
            vals = np.array([float(g.get(m, np.nan)) for g in grp], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else float("nan")
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        out.append(row)
    return out


def format_table(rows: Sequence[Mapping[str, Any]], *, by: str,
                 metrics: Sequence[str] = ("ACC", "SEN", "SPE", "F1_weighted", "AUC"),
                 digits: int = 3) -> str:
    """A Markdown table of :func:`summary_table` rows, cells as ``mean ± SD``."""
    head = f"| {by} | n | " + " | ".join(metrics) + " |"
    sep = "|" + "---|" * (len(metrics) + 2)
    lines = [head, sep]
    for r in rows:
        cells = []
        for m in metrics:
            mean, sd = r.get(f"{m}_mean", float("nan")), r.get(f"{m}_sd", float("nan"))
            cell = "–" if math.isnan(mean) else f"{mean:.{digits}f}"
            if not math.isnan(mean) and not math.isnan(sd):
                cell += f" ± {sd:.{digits}f}"
            cells.append(cell)
        lines.append(f"| {r[by]} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_roc(curves: Mapping[str, tuple[Any, Any]], path: str | Path, *,
             title: str = "ROC", ci: bool = True, overwrite: bool = True, dpi: int = 120) -> Path:
    """Write ROC curves (``{name: (y_true, y_score)}``) as a PNG (matplotlib Agg, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io.atomic import atomic_path

    fig = Figure(figsize=(4.5, 4.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    for name, (yt, ys) in curves.items():
        fpr, tpr, _ = roc_curve(yt, ys)
        if ci:
            auc, lo, hi = auc_bootstrap_ci(yt, ys, n_boot=500)
            label = f"{name}: AUC {auc:.3f} [{lo:.3f}, {hi:.3f}]"
        else:
            label = f"{name}: AUC {roc_auc(yt, ys):.3f}"
        ax.plot(fpr, tpr, lw=1.8, label=label)
    ax.set_xlabel("1 − specificity (FPR)")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path | None = None, *,
                keys: Sequence[str] = ("train_loss", "val_loss"), dpi: int = 100,
                size: tuple[float, float] = (4.0, 2.6)) -> bytes:
    """Loss (or any metric) against epoch as PNG bytes (also written when ``path``)."""
    import io as _io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k in keys:
        xs = [h.get("epoch_float", h.get("epoch")) for h in history if h.get(k) is not None]
        ys = [h[k] for h in history if h.get(k) is not None]
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    if path is not None:
        from ..io.atomic import write_bytes_atomic

        write_bytes_atomic(path, data, overwrite=True)
    return data


# --------------------------------------------------------------------------------------
# Clustering metrics (numpy)
# --------------------------------------------------------------------------------------
def _labels(y: Any, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {y.shape}")
    return np.unique(y, return_inverse=True)[1].astype(np.int64)


def contingency(a: Any, b: Any) -> np.ndarray:
    """``C[i, j]`` = samples in class ``i`` of ``a`` and class ``j`` of ``b``."""
    ia, ib = _labels(a, "a"), _labels(b, "b")
    if len(ia) != len(ib):
        raise InputError(f"label vectors differ in length ({len(ia)} vs {len(ib)})")
    na, nb = (ia.max() + 1 if len(ia) else 0), (ib.max() + 1 if len(ib) else 0)
    return np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb)


def hungarian_accuracy(y_true: Any, clusters: Any) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    c = contingency(y_true, clusters)
    if c.sum() == 0:
        return float("nan")
    r, k = linear_sum_assignment(-c)
    return float(c[r, k].sum() / c.sum())


def adjusted_rand_index(a: Any, b: Any) -> float:
    """Adjusted Rand index of two labellings (Hubert & Arabie 1985), as scikit-learn."""
    c = contingency(a, b).astype(np.float64)
    n = c.sum()
    if n < 2:
        return 1.0

    def comb2(x):
        return x * (x - 1) / 2.0

    index = comb2(c).sum()
    sa, sb = comb2(c.sum(axis=1)).sum(), comb2(c.sum(axis=0)).sum()
    expected = sa * sb / comb2(n)
    maximum = (sa + sb) / 2.0
    if maximum == expected:  # both labellings trivial (one class, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))


def silhouette_score(x: np.ndarray, labels: Any, *, chunk: int = 2048) -> float:
    """Mean silhouette ``(b - a) / max(a, b)`` with Euclidean distances (as scikit-learn).

    ``a``: mean distance to the other members of the own cluster; ``b``: lowest mean
    distance to another cluster; samples alone in their cluster score 0. Distances are
    computed in row chunks, so memory is ``chunk × N``.
    """
    x = np.asarray(x, dtype=np.float64)
    lab = _labels(labels, "labels")
    n = len(lab)
    if x.ndim != 2 or len(x) != n:
        raise InputError(f"x must be (N, D) with N={n}, got {x.shape}")
    k = int(lab.max()) + 1 if n else 0
    if not 2 <= k <= n - 1:
        raise InputError(f"silhouette needs 2 <= clusters <= samples - 1 (got {k} clusters, "
                         f"{n} samples)")
    sizes = np.bincount(lab, minlength=k).astype(np.float64)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), lab] = 1.0
    sq = (x * x).sum(axis=1)
    s = np.empty(n)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        d2 = sq[i0:i1, None] + sq[None, :] - 2.0 * x[i0:i1] @ x.T
        d = np.sqrt(np.maximum(d2, 0.0))
        d[np.arange(i1 - i0), np.arange(i0, i1)] = 0.0
        sums = d @ onehot                          # (chunk, k) distance sums per cluster
        own = lab[i0:i1]
        own_n = sizes[own] - 1
        a = np.where(own_n > 0, sums[np.arange(i1 - i0), own] / np.maximum(own_n, 1), 0.0)
        mean_other = sums / sizes[None, :]
        mean_other[np.arange(i1 - i0), own] = np.inf
        b = mean_other.min(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            si = (b - a) / np.maximum(a, b)
        s[i0:i1] = np.where((own_n > 0) & np.isfinite(si), si, 0.0)
    return float(s.mean())


__all__ = ["BINARY_KEYS", "DeLongResult", "auc_bootstrap_ci", "binary_metrics", "bootstrap_ci",
           "confusion_matrix", "delong_ci", "delong_components", "delong_cov", "delong_test",
           "evaluate_binary", "format_table", "midrank", "multiclass_metrics", "per_class_report",
           "plot_curves", "plot_roc", "roc_auc", "roc_curve", "summary_table", "weighted_f1",
           "wilson_ci", "adjusted_rand_index", "contingency", "hungarian_accuracy",
           "silhouette_score"]
