"""Evaluating folders: pairing prediction folders/files with ground-truth files by slide
name, reading detections and slide scores, and the evaluation progress generators.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError, LnmetaError
from ...io.annotations import TUMOUR_NAMES
from ...progress import Job, Progress
from .config import FrocConfig
from .report import EvaluationReport, summarise
from .scoring import SlideResult, match_detections
from .truth import _MASK_SUFFIXES, _POLYGON_SUFFIXES, check_detections_on_slide, load_truth

_TRUTH_STRIP = ("_evaluation_mask", "_tumor_mask", "_tumour_mask", "_mask", "_annotations",
                "_annotation", "_truth", "_gt")
_PRED_STRIP = ("_lesions", "_detections", "_predictions")


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def slide_key(name: str | Path, strip: Iterable[str] = ()) -> str:
    """Lower-case slide name without folders, format suffixes and ``strip`` endings."""
    n = Path(str(name)).name.lower()
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr", ".lnmeta"):
        if n.endswith(suf):
            n = n[: -len(suf)]
            break
    else:
        n = re.sub(r"\.[a-z0-9]{1,8}$", "", n)
    for s in strip:
        if n.endswith(s) and len(n) > len(s):
            n = n[: -len(s)]
            break
    return n


@dataclass
class SlidePrediction:
    """Detections and slide score of one slide, as read from a prediction folder or file."""

    slide: str
    name: str
    coords: np.ndarray
    probability: np.ndarray
    score: float | None
    score_source: str
    source: str
    slide_mpp: float | None = None
    slide_shape: tuple[int, int] | None = None


def _read_point_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Detections of a CSV: CAMELYON16 submission ``p, x, y`` (no header) or columns
    ``probability``/``confidence`` + ``x``/``y`` or ``row``/``col``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text CSV (byte {e.start} is not UTF-8)") from e
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not rows:
        return np.zeros((0, 2)), np.zeros(0)
    head = [c.strip().lower() for c in rows[0]]

    def num(v: str) -> float:
        try:
            f = float(v)
        except ValueError as e:
            raise InputError(f"{path}: {v!r} is not a number") from e
        if not math.isfinite(f):
            raise InputError(f"{path}: {v.strip()!r} is not a finite number")
        return f

    if all(_is_number(c) for c in head):
        data = [[num(c) for c in r[:3]] for r in rows]
        if any(len(r) < 3 for r in data):
            raise InputError(f"{path}: expected 'probability, x, y' on every line")
        a = np.asarray(data, np.float64).reshape(-1, 3)
        return a[:, [2, 1]], a[:, 0]

    def col(*names: str) -> int | None:
        for nm in names:
            for i, h in enumerate(head):
                if h == nm or h.startswith(nm + " "):
                    return i
        return None

    ip = col("probability", "confidence", "p", "score")
    ix, iy = col("x", "col", "column"), col("y", "row")
    if ip is None or ix is None or iy is None:
        raise InputError(f"{path}: expected columns probability (or confidence), x (or col) and "
                         f"y (or row); got {', '.join(rows[0])}")
    if any(len(r) <= max(ip, ix, iy) for r in rows[1:]):
        raise InputError(f"{path}: a line has fewer columns than the header")
    a = np.asarray([[num(r[ip]), num(r[iy]), num(r[ix])] for r in rows[1:]],
                   np.float64).reshape(-1, 3)
    return a[:, 1:3], a[:, 0]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_scores(path: Path) -> dict[str, float]:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    out: dict[str, float] = {}
    for r in rows:
        if len(r) < 2 or not _is_number(r[1].strip()):
            continue
        out[slide_key(r[0].strip())] = float(r[1])
    return out


def _recompute_lesions(folder: Path, cfg: FrocConfig) -> tuple[np.ndarray, np.ndarray]:
    from ...io.omezarr import read_ome_zarr
    from ..heatmap import from_storage
    from ..lesions import find_lesions

    res = read_ome_zarr(folder / "probability.ome.zarr")
    prob = from_storage(np.asarray(res.pyramid[0]))
    scored = None
    if (folder / "analysed.ome.zarr").exists():
        scored = np.asarray(read_ome_zarr(folder / "analysed.ome.zarr").pyramid[0]) > 0
    les = find_lesions(prob, res.frame, threshold=cfg.lesion_threshold,
                       radius_um=cfg.lesion_radius_um, scored=scored, method=cfg.lesions)
    return les.coords, les.probability.astype(np.float64)


def find_predictions(pred_dir: str | Path, config: FrocConfig | None = None
                     ) -> tuple[dict[str, SlidePrediction], list[dict[str, str]]]:
    """Predictions under ``pred_dir``, keyed by :func:`slide_key`, and what was skipped.

    * prediction folders (``summary.json`` of ``lnmeta predict`` / ``lnmeta batch``, at
      any depth up to 3): lesions from ``lesions.geojson`` (or recomputed from
      ``probability.ome.zarr`` with ``config.lesions``), slide score from the summary;
    * flat files ``<slide>.geojson`` (lesion points with a ``probability`` measurement)
      or ``<slide>.csv`` (CAMELYON16 submission ``p, x, y`` in level-0 pixels); slide
      scores from ``scores.csv`` (``slide, score``) when present, else the highest
      detection probability.
    """
    from ..lesions import read_lesions_geojson

    cfg = config or FrocConfig()
    root = Path(pred_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such prediction folder")
    preds: dict[str, SlidePrediction] = {}
    skipped: list[dict[str, str]] = []

    def add(p: SlidePrediction):
        if p.slide in preds:
            skipped.append({"slide": p.name, "reason": f"a second prediction for this slide "
                            f"({p.source}); the first ({preds[p.slide].source}) is used",
                            "prediction": p.source, "truth": ""})
            return
        preds[p.slide] = p

    summaries = sorted(s for depth in ("*", "*/*", "*/*/*")
                       for s in root.glob(f"{depth}/summary.json"))
    summaries = ([root / "summary.json"] if (root / "summary.json").is_file() else []) + summaries
    for sp in summaries:
        folder = sp.parent
        try:
            s = json.loads(sp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            skipped.append({"slide": folder.name, "reason": f"unreadable summary.json ({e})",
                            "prediction": str(folder), "truth": ""})
            continue
        if not isinstance(s, dict) or s.get("format") != "lnmeta-prediction":
            continue
        sl = s.get("slide") or {}
        name = slide_key(sl.get("path") or sl.get("name") or folder.name)
        if not s.get("complete"):
            skipped.append({"slide": name, "reason": "prediction folder is incomplete",
                            "prediction": str(folder), "truth": ""})
            continue
        try:
            if cfg.lesions == "file":
                coords, probs = read_lesions_geojson(folder / "lesions.geojson")
            else:
                coords, probs = _recompute_lesions(folder, cfg)
        except (LnmetaError, OSError) as e:
            skipped.append({"slide": name, "reason": f"cannot read its lesions ({e})",
                            "prediction": str(folder), "truth": ""})
            continue
        score = (s.get("score") or {}).get(cfg.score)
        shape = sl.get("shape")
        add(SlidePrediction(slide=name, name=name, coords=coords,
                            probability=np.asarray(probs, np.float64),
                            score=None if score is None else float(score),
                            score_source=f"summary.json score.{cfg.score}" if score is not None
                            else "", source=str(folder), slide_mpp=sl.get("mpp"),
                            slide_shape=tuple(shape) if shape else None))
    scores_csv = root / "scores.csv"
    scores = _read_scores(scores_csv) if scores_csv.is_file() else {}
    for f in sorted(root.iterdir()):
        low = f.name.lower()
        if not f.is_file() or f.name == "scores.csv" or not low.endswith((".geojson", ".csv")):
            continue
        name = slide_key(f, _PRED_STRIP)
        try:
            if low.endswith(".geojson"):
                coords, probs = read_lesions_geojson(f)
            else:
                coords, probs = _read_point_csv(f)
        except (LnmetaError, OSError) as e:
            skipped.append({"slide": name, "reason": f"cannot read its detections ({e})",
                            "prediction": str(f), "truth": ""})
            continue
        sc = scores.get(name)
        add(SlidePrediction(slide=name, name=name, coords=coords,
                            probability=np.asarray(probs, np.float64), score=sc,
                            score_source="scores.csv" if sc is not None else "",
                            source=str(f)))
    return preds, skipped


def find_truth(truth_dir: str | Path) -> tuple[dict[str, Path], list[str]]:
    """Ground-truth files under ``truth_dir`` keyed by :func:`slide_key` (mask suffixes such
    as ``_mask``, ``_tumor_mask``, ``_evaluation_mask`` removed), and notes."""
    root = Path(truth_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such ground-truth folder")
    out: dict[str, Path] = {}
    notes: list[str] = []
    rank = {s: i for i, s in enumerate(_POLYGON_SUFFIXES + (".zarr",) + _MASK_SUFFIXES)}
    cands = []
    for f in sorted(root.iterdir()):
        low = f.name.lower()
        suf = next((s for s in rank if low.endswith(s)), None)
        if suf is None or f.name.startswith("."):
            continue
        cands.append((rank[suf], f))
    for _, f in sorted(cands, key=lambda t: (t[0], t[1].name)):
        key = slide_key(f, _TRUTH_STRIP)
        if key in out:
            notes.append(f"{key}: several ground-truth files; {out[key].name} used, "
                         f"{f.name} ignored")
            continue
        out[key] = f
    return out, notes


def read_negatives(spec: str | Path | Iterable[str] | None) -> set[str]:
    """Slide keys listed as tumour-free: a file (one slide per line, first CSV field; a
    CAMELYON ``reference.csv`` keeps only its ``Normal`` rows), or comma-separated names."""
    if spec is None:
        return set()
    if not isinstance(spec, (str, Path)):
        return {slide_key(s) for s in spec if str(s).strip()}
    p = Path(str(spec))
    if p.is_file():
        out = set()
        for r in csv.reader(io.StringIO(p.read_text(encoding="utf-8-sig"))):
            if not r or not r[0].strip() or r[0].strip().startswith("#"):
                continue
            if len(r) > 1 and r[1].strip().lower() in TUMOUR_NAMES:
                continue
            out.add(slide_key(r[0].strip()))
        return out
    return {slide_key(s.strip()) for s in str(spec).split(",") if s.strip()}


def evaluate_folders_job(pred_dir: str | Path, truth_dir: str | Path,
                         config: FrocConfig | None = None, *,
                         negatives: str | Path | Iterable[str] | None = None
                         ) -> Job[EvaluationReport]:
    """Evaluate every slide that has both a prediction and a ground truth (or is listed
    as negative); the others are reported in ``skipped`` with the reason.

    Yields :class:`~napari_lnmeta.progress.Progress` per slide; returns an
    :class:`EvaluationReport`. Raises :class:`InputError` only for missing folders.
    """
    cfg = config or FrocConfig()
    yield Progress(0, 1, "reading predictions")
    preds, skipped = find_predictions(pred_dir, cfg)
    truths, notes = find_truth(truth_dir)
    neg = read_negatives(negatives)
    if not preds:
        notes.append(f"{pred_dir}: no predictions found (expected lnmeta prediction folders "
                     "with summary.json, or <slide>.geojson / <slide>.csv detection files)")
    keys = sorted(set(preds) | set(truths) | neg)
    results: list[SlideResult] = []
    for i, key in enumerate(keys):
        yield Progress(i, len(keys), f"evaluating {key}")
        p, t = preds.get(key), truths.get(key)
        if p is None:
            why = ("ground truth but no prediction" if t is not None
                   else "listed as negative but no prediction")
            skipped.append({"slide": key, "reason": why, "prediction": "",
                            "truth": str(t) if t else ""})
            continue
        if t is None and key not in neg:
            skipped.append({"slide": key, "reason": "prediction but no ground truth (list the "
                            "slide in --negatives if it is tumour-free)",
                            "prediction": p.source, "truth": ""})
            continue
        try:
            check_detections_on_slide(p.coords, p.slide_shape, source=p.source)
            regions = None if t is None else load_truth(
                t, slide_mpp=p.slide_mpp, slide_shape=p.slide_shape, config=cfg)
            if regions is not None and key in neg:
                raise InputError("listed as negative, but its ground truth has tumour")
            r = match_detections(p.coords, p.probability, regions, slide=key, score=p.score,
                                 score_source=p.score_source)
        except LnmetaError as e:
            skipped.append({"slide": key, "reason": str(e), "prediction": p.source,
                            "truth": str(t) if t else ""})
            continue
        r.prediction, r.truth = p.source, str(t) if t else "negatives list"
        r.slide_mpp = p.slide_mpp if p.slide_mpp is not None else cfg.mpp
        results.append(r)
    yield Progress(len(keys), len(keys), "FROC and ROC")
    return summarise(results, cfg, skipped=skipped, notes=notes,
                     inputs={"predictions": str(pred_dir), "truth": str(truth_dir),
                             "negatives": "" if negatives is None else str(negatives)})


def evaluate_slide_job(coords: np.ndarray, probability: np.ndarray, truth: Any, *,
                       slide: str = "slide", slide_mpp: float | None = None,
                       slide_shape: tuple[int, int] | None = None, score: float | None = None,
                       config: FrocConfig | None = None) -> Job[EvaluationReport]:
    """One slide's detections against its ground truth (``None``: a tumour-free slide).

    The *Evaluate* widget's job for the layers of the current slide; FROC is computed
    over this one slide, the slide-level AUC is not defined (a note says so).
    """
    cfg = config or FrocConfig()
    yield Progress(0, 2, "ground-truth regions")
    check_detections_on_slide(coords, slide_shape, source=slide)
    regions = None if truth is None else load_truth(truth, slide_mpp=slide_mpp,
                                                    slide_shape=slide_shape, config=cfg)
    yield Progress(1, 2, "matching detections")
    r = match_detections(coords, probability, regions, slide=slide, score=score,
                         score_source="" if score is None else "given")
    r.slide_mpp = slide_mpp if slide_mpp is not None else cfg.mpp
    r.truth = "tumour-free" if truth is None else (
        str(truth) if isinstance(truth, (str, Path)) else "layer")
    yield Progress(2, 2, "done")
    return summarise([r], cfg, inputs={"predictions": slide, "truth": r.truth})
