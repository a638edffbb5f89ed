"""Matching detections to tumour regions, the FROC curve and score, slide-level ROC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from .config import DUPLICATE, FP, FP_RATES, HIT, ITC
from .truth import Regions


# --------------------------------------------------------------------------------------
# Matching detections to regions
# --------------------------------------------------------------------------------------
@dataclass
class SlideResult:
    """The detections of one slide matched against its regions.

    Attributes
    ----------
    slide
        Slide key (lower-case name without suffixes).
    is_tumour
        The ground truth has tumour (ITC included).
    coords, probability
        ``(N, 2)`` level-0 ``(row, col)`` and ``(N,)`` probabilities of the detections.
    region
        ``(N,)`` region label hit by each detection (0: none).
    outcome
        ``(N,)`` ``"TP"``, ``"duplicate"``, ``"ITC"`` or ``"FP"``.
    region_score
        ``(K,)`` highest probability among each region's detections (0: missed).
    regions
        The regions (``None`` for a tumour-free slide).
    score
        Slide score used for the ROC.
    """

    slide: str
    is_tumour: bool
    coords: np.ndarray
    probability: np.ndarray
    region: np.ndarray
    outcome: np.ndarray
    region_score: np.ndarray
    regions: Regions | None
    score: float
    score_source: str = ""
    name: str = ""
    prediction: str = ""
    truth: str = ""
    slide_mpp: float | None = None

    @property
    def n_tumours(self) -> int:
        return 0 if self.regions is None else self.regions.n_tumours

    @property
    def n_itc(self) -> int:
        return 0 if self.regions is None else self.regions.n_itc

    def counts(self) -> dict[str, int]:
        o = self.outcome
        return {"detections": int(len(o)), "tumours": self.n_tumours, "itc": self.n_itc,
                "hits": int((o == HIT).sum()), "missed": self.n_tumours - int((o == HIT).sum()),
                "duplicates": int((o == DUPLICATE).sum()),
                "itc_detections": int((o == ITC).sum()), "fp": int((o == FP).sum())}

    def summary_row(self) -> dict[str, Any]:
        c = self.counts()
        sens = c["hits"] / c["tumours"] if c["tumours"] else None
        return {"slide": self.name or self.slide, "status": "evaluated",
                "label": "tumour" if self.is_tumour else "normal", "score": self.score,
                **c, "sensitivity": sens,
                "max_probability": float(self.probability.max()) if len(self.probability) else None,
                "prediction": self.prediction, "truth": self.truth, "reason": ""}

    def detection_rows(self) -> list[dict[str, Any]]:
        return [{"slide": self.name or self.slide, "index": i, "row": float(r), "col": float(c),
                 "probability": float(p), "outcome": str(o), "region": int(g),
                 "itc_region": bool(self.regions is not None and g > 0
                                    and self.regions.itc[g - 1])}
                for i, ((r, c), p, o, g) in enumerate(zip(self.coords, self.probability,
                                                          self.outcome, self.region, strict=True))]


def match_detections(coords: np.ndarray, probability: np.ndarray, regions: Regions | None, *,
                     slide: str = "slide", score: float | None = None,
                     score_source: str = "", is_tumour: bool | None = None) -> SlideResult:
    """Match detections to the regions of one slide (rules in the module docstring).

    Parameters
    ----------
    coords, probability
        Level-0 ``(row, col)`` and probability of each detection.
    regions
        :func:`evaluation_regions` / :func:`load_truth` output; ``None`` for a slide
        without tumour.
    score
        Slide score; default the highest detection probability (0 without detections).
    is_tumour
        Slide label for the ROC; default: the ground truth has a region.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    if len(c) != len(p):
        raise InputError(f"{slide}: {len(c)} detections but {len(p)} probabilities")
    if not np.all(np.isfinite(p)):
        raise InputError(f"{slide}: detections without a probability (NaN)")
    n = len(p)
    outcome = np.full(n, FP, dtype=object)
    region = np.zeros(n, np.int64)
    k = 0 if regions is None else regions.n_regions
    best = np.zeros(k, np.float64)
    if regions is not None and n:
        region = regions.region_at(c)
        winner = np.full(k, -1, np.int64)
        # highest probability first; ties by input order
        for i in np.argsort(-p, kind="stable"):
            g = region[i]
            if g == 0:
                continue
            if regions.itc[g - 1]:
                outcome[i] = ITC
            elif winner[g - 1] < 0:
                winner[g - 1] = i
                best[g - 1] = p[i]
                outcome[i] = HIT
            else:
                outcome[i] = DUPLICATE
    if score is None:
        score, score_source = (float(p.max()) if n else 0.0), "max detection probability"
    tumour = (regions is not None and regions.n_regions > 0) if is_tumour is None else is_tumour
    region_score = best[~regions.itc] if regions is not None else best
    return SlideResult(slide=slide, is_tumour=bool(tumour), coords=c, probability=p,
                       region=region, outcome=outcome.astype(str), region_score=region_score,
                       regions=regions, score=float(score), score_source=score_source,
                       name=slide)


# --------------------------------------------------------------------------------------
# FROC and slide-level ROC
# --------------------------------------------------------------------------------------
def froc_curve(results: Sequence[SlideResult]) -> dict[str, np.ndarray]:
    """Average FPs per slide and sensitivity at every threshold, starting at (0, 0).

    The thresholds are built as the challenge's code builds them: the false-positive
    probabilities plus one entry per region label (its score stored as float32 — the
    highest probability among its detections, 0 for a missed region or an ITC region),
    made distinct, sorted, and the lowest dropped. At a threshold ``t`` a false positive
    counts when ``p >= t`` (float64) and a region when ``float32(score) >=
    float32(t)``; a region and a false positive of equal probability therefore give
    two thresholds when the probability is not exact in float32 (0.6 and
    ``float32(0.6)`` = 0.600000024).

    Returns ``{"fps", "sensitivity", "thresholds"}``, thresholds decreasing (the first is
    ``inf``): the challenge's curve reversed, every point kept (repeated FP values
    included).
    """
    n_slides = len(results)
    if n_slides == 0:
        raise InputError("no slide to evaluate")
    n_tum = sum(r.n_tumours for r in results)
    if n_tum == 0:
        raise InputError("no tumour region (other than isolated tumour cells) in the ground "
                         "truth: FROC needs at least one")
    fp = np.concatenate([r.probability[r.outcome == FP] for r in results] + [np.zeros(0)])
    # one float32 entry per region label; ITC labels enter the threshold list as 0
    tp32 = np.concatenate([np.asarray(r.region_score, np.float32) for r in results]
                          + [np.zeros(r.n_itc, np.float32) for r in results]
                          + [np.zeros(0, np.float32)])
    thr = np.unique(np.concatenate([fp.astype(np.float64), tp32.astype(np.float64)]))[1:][::-1]
    fp_s, tp_s = np.sort(fp.astype(np.float64)), np.sort(tp32)
    n_fp = len(fp_s) - np.searchsorted(fp_s, thr, side="left")
    n_tp = len(tp_s) - np.searchsorted(tp_s, thr.astype(np.float32), side="left")
    return {"fps": np.r_[0.0, n_fp / n_slides], "sensitivity": np.r_[0.0, n_tp / n_tum],
            "thresholds": np.r_[np.inf, thr]}


def froc_score(results: Sequence[SlideResult],
               fp_rates: Sequence[float] = FP_RATES) -> dict[str, Any]:
    """Sensitivity at ``fp_rates`` average FPs per slide and their mean (the FROC score).

    Read as the challenge's code reads it: ``numpy.interp`` on the whole curve of
    :func:`froc_curve` (repeated FP values kept), so between two FP levels the line runs
    from the most sensitive point of the lower level to the *least* sensitive point of
    the next one; beyond the last point, the final sensitivity.
    """
    curve = froc_curve(results)
    fps, sens = curve["fps"], curve["sensitivity"]
    at = np.interp(np.asarray(fp_rates, dtype=np.float64), fps, sens)
    return {"score": float(at.mean()), "fp_rates": [float(v) for v in fp_rates],
            "sensitivity": [float(v) for v in at],
            "n_slides": len(results), "n_tumours": int(sum(r.n_tumours for r in results)),
            "n_itc": int(sum(r.n_itc for r in results)),
            "curve": {"fps": [float(v) for v in fps], "sensitivity": [float(v) for v in sens],
                      "thresholds": [None if math.isinf(v) else float(v)
                                     for v in curve["thresholds"]]}}


def slide_roc(results: Sequence[SlideResult], *, threshold: float = 0.5, n_boot: int = 2000,
              seed: int = 0) -> dict[str, Any]:
    """Slide-level ROC AUC (bootstrap 95 % CI) and ACC/SEN/SPE at ``threshold``."""
    from ..metrics import auc_bootstrap_ci, binary_metrics

    y = np.array([int(r.is_tumour) for r in results], np.int64)
    s = np.array([r.score for r in results], np.float64)
    if len(y) == 0:
        raise InputError("no slide to evaluate")
    if y.min() == y.max():
        which = "tumour" if y[0] else "normal"
        raise InputError(f"all {len(y)} evaluated slides are {which}: the slide-level AUC "
                         "needs both tumour and normal slides")
    auc, lo, hi = auc_bootstrap_ci(y, s, n_boot=n_boot, seed=seed)
    m = binary_metrics(y, s, threshold=threshold)
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
    return {"AUC": auc, "AUC_CI": [lo, hi], "n_boot": n_boot, "threshold": threshold,
            "n_tumour": int(y.sum()), "n_normal": int(len(y) - y.sum()),
            **{k: clean[k] for k in ("ACC", "SEN", "SPE", "PPV", "NPV", "TP", "FP", "TN", "FN")}}
