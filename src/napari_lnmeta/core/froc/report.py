"""The evaluation report: summary over slides, CSV tables, ROC/FROC figures, writing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError, OutputExistsError
from ...io import jsonio
from .config import REPORT_FILES, REPORT_FORMAT, FrocConfig
from .scoring import SlideResult, froc_score, slide_roc


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """Everything :func:`write_report` writes."""

    slides: list[SlideResult]
    config: FrocConfig
    skipped: list[dict[str, str]] = field(default_factory=list)
    froc: dict[str, Any] | None = None
    roc: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)

    def slide_rows(self, *, with_summary: bool = True) -> list[dict[str, Any]]:
        """One row per slide (evaluated, then skipped), then ``mean`` and ``sd`` rows."""
        rows = [r.summary_row() for r in self.slides]
        if with_summary and rows:
            num = ["score", "detections", "tumours", "itc", "hits", "missed", "duplicates",
                   "itc_detections", "fp", "sensitivity", "max_probability"]
            mean = {"slide": "mean", "status": "", "label": ""}
            sd = {"slide": "sd", "status": "", "label": ""}
            for k in num:
                v = np.array([r[k] for r in rows if r[k] is not None], np.float64)
                mean[k] = float(v.mean()) if len(v) else None
                sd[k] = float(v.std(ddof=1)) if len(v) > 1 else None
            extra = [mean, sd]
        else:
            extra = []
        skipped = [{"slide": s["slide"], "status": "skipped", "reason": s["reason"],
                    "prediction": s.get("prediction", ""), "truth": s.get("truth", "")}
                   for s in self.skipped]
        return rows + skipped + extra

    def detection_rows(self) -> list[dict[str, Any]]:
        return [d for r in self.slides for d in r.detection_rows()]

    def to_json(self) -> dict[str, Any]:
        slides = []
        for r in self.slides:
            row = r.summary_row()
            row["score_source"] = r.score_source
            if r.regions is not None:
                row["regions"] = [{"label": i + 1, "major_axis_um": float(a), "itc": bool(t)}
                                  for i, (a, t) in enumerate(zip(r.regions.major_axis_um,
                                                                 r.regions.itc, strict=True))]
            row["points"] = r.detection_rows()
            slides.append(row)
        return {"format": REPORT_FORMAT, "version": 1, "inputs": self.inputs,
                "config": self.config.to_json(),
                "rules": {"dilation_um": self.config.dilation_um,
                          "dilation_radius_um": self.config.dilation_um / 2,
                          "itc_major_axis_um": self.config.itc_um + self.config.dilation_um,
                          "text": "regions dilated by dilation_um/2 on every side, holes "
                                  "filled, 8-connected; ITC regions (dilated major axis < "
                                  "itc_um + dilation_um) are neither hits nor misses and "
                                  "detections in them are ignored; one hit per region, "
                                  "duplicates ignored; detections outside all regions are FPs"},
                "evaluated": len(self.slides), "skipped": self.skipped,
                "slide_level": self.roc, "froc": self.froc, "notes": self.notes,
                "slides": slides}


def summarise(results: Sequence[SlideResult], config: FrocConfig | None = None, *,
              skipped: Sequence[dict[str, str]] = (), notes: Sequence[str] = (),
              inputs: dict[str, str] | None = None) -> EvaluationReport:
    """FROC and slide-level ROC of matched slides; what cannot be computed becomes a note."""
    cfg = config or FrocConfig()
    rep = EvaluationReport(slides=list(results), config=cfg, skipped=list(skipped),
                           notes=list(notes), inputs=dict(inputs or {}))
    if not rep.slides:
        rep.notes.append("no slide could be evaluated (see 'skipped')")
        return rep
    try:
        rep.froc = froc_score(rep.slides, cfg.fp_rates)
    except InputError as e:
        rep.notes.append(f"FROC not computed: {e}")
    try:
        rep.roc = slide_roc(rep.slides, threshold=cfg.slide_threshold, n_boot=cfg.n_boot,
                            seed=cfg.seed)
    except InputError as e:
        rep.notes.append(f"slide-level AUC not computed: {e}")
    return rep


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _csv_text(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue()


SLIDE_COLUMNS = ("slide", "status", "label", "score", "detections", "tumours", "itc", "hits",
                 "missed", "duplicates", "itc_detections", "fp", "sensitivity",
                 "max_probability", "prediction", "truth", "reason")
DETECTION_COLUMNS = ("slide", "index", "row", "col", "probability", "outcome", "region",
                     "itc_region")


def froc_figure_png(froc: dict[str, Any], *, dpi: int = 110, title: str = "FROC") -> bytes:
    """The FROC curve (log FP axis) with the six operating points, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fps = np.asarray(froc["curve"]["fps"], np.float64)
    sens = np.asarray(froc["curve"]["sensitivity"], np.float64)
    lo = min(froc["fp_rates"]) / 2
    x = np.maximum(fps, lo)
    ax.step(x, sens, where="post", color="C0", lw=1.5, label="FROC")
    ax.plot(froc["fp_rates"], froc["sensitivity"], "o", color="C3",
            label=f"FROC score {froc['score']:.3f}")
    ax.set_xscale("log")
    ax.set_xlim(lo, max(16.0, float(x.max()) * 1.2))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("sensitivity (lesions)")
    ax.set_title(f"{title} ({froc['n_tumours']} lesions, {froc['n_slides']} slides)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def roc_figure_png(results: Sequence[SlideResult], *, dpi: int = 110) -> bytes:
    """The slide-level ROC curve as PNG bytes (via :func:`~napari_lnmeta.core.metrics.plot_roc`)."""
    import tempfile

    from ..metrics import plot_roc

    y = [int(r.is_tumour) for r in results]
    s = [r.score for r in results]
    with tempfile.TemporaryDirectory() as d:
        p = plot_roc({"slides": (y, s)}, Path(d) / "roc.png", title="Slide-level ROC", dpi=dpi)
        return p.read_bytes()


def write_report(report: EvaluationReport, out_dir: str | Path, *, overwrite: bool = False,
                 inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """Write ``report.json``, ``slides.csv``, ``detections.csv``, ``roc.png`` and
    ``froc.png`` (the plots when defined), each atomically.

    Every output is checked before anything is written: an existing one is refused
    (:class:`~napari_lnmeta.errors.OutputExistsError`) unless ``overwrite``.
    """
    from ...io.atomic import output_lock

    with output_lock(out_dir):  # one writer per output
        return _write_report_locked(report, out_dir, overwrite=overwrite, inputs=inputs)


def _write_report_locked(report: EvaluationReport, out_dir: str | Path, *, overwrite: bool = False,
                         inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    from ...io.atomic import check_inputs, write_bytes_atomic, write_text_atomic

    out = Path(out_dir)
    check_inputs(out, inputs, whole=False)
    for name in REPORT_FILES:
        check_inputs(out / name, inputs)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    for name in REPORT_FILES:
        if (out / name).exists() and not overwrite:
            raise OutputExistsError(out / name)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if report.roc is not None:
        paths["roc"] = write_bytes_atomic(out / "roc.png", roc_figure_png(report.slides),
                                          overwrite=True)
    if report.froc is not None:
        paths["froc"] = write_bytes_atomic(out / "froc.png", froc_figure_png(report.froc),
                                           overwrite=True)
    paths["slides"] = write_text_atomic(out / "slides.csv",
                                        _csv_text(report.slide_rows(), SLIDE_COLUMNS),
                                        overwrite=True)
    paths["detections"] = write_text_atomic(out / "detections.csv",
                                            _csv_text(report.detection_rows(), DETECTION_COLUMNS),
                                            overwrite=True)
    if overwrite:  # never leave a plot of an earlier run beside a new report
        for key in ("roc", "froc"):
            if key not in paths:
                (out / f"{key}.png").unlink(missing_ok=True)
    d = report.to_json()
    d["files"] = sorted(p.name for p in paths.values()) + ["report.json"]
    paths["report"] = write_text_atomic(out / "report.json", jsonio.dumps(d, indent=1),
                                        overwrite=True)
    return paths
