"""CAMELYON16 evaluation: slide-level ROC AUC and lesion-level FROC (seed 004).

The rules are those of the challenge's evaluation code (``Evaluation_FROC.py``), so
that scores are comparable with the published ones:

* **Ground-truth regions.** The tumour mask (or the polygons, rasterised at
  :attr:`FrocConfig.eval_mpp`, 7.776 µm/px = CAMELYON16 level 5 by default) is dilated
  by 75 µm "the equivalent of 5 tumour cells": as in the reference code, every pixel
  closer than ``dilation_um / 2`` to tumour joins it (so a region's diameter grows by
  ``dilation_um``), holes are filled, and 8-connected components are labelled. Each
  component is one tumour region.
* **Isolated tumour cells (ITC).** A region whose major axis (of the equivalent
  ellipse, ``skimage.measure.regionprops``) is shorter than ``itc_um + dilation_um``
  (200 + 75 = 275 µm, the reference code's threshold on the dilated region) is an ITC
  region: it is neither a hit nor a miss, and a detection inside it is ignored (not a
  false positive).
* **Matching.** A detection (a point with a probability) inside a tumour region is a
  true positive for that region; the region's score is the highest probability among
  its detections and the others are *duplicates*, ignored (not false positives). A
  detection outside every region is a false positive. On a slide without tumour every
  detection is a false positive.
* **FROC.** Thresholds as the reference code builds them: the false-positive
  probabilities plus one float32 entry per region label (its score; 0 for a missed or
  ITC region), distinct, sorted, the lowest dropped. At threshold ``t`` sensitivity =
  regions whose float32 score is ``>= float32(t)`` / all non-ITC regions of all slides,
  and average FPs per slide = false positives with ``p >= t`` / number of slides; the
  curve starts at (0, 0) and keeps every point (repeated FP values included). The
  sensitivities at 1/4, 1/2, 1, 2, 4 and 8 FPs per slide are read on that whole curve
  by ``numpy.interp`` (as the reference code; beyond the last point the curve's final
  sensitivity), and the **FROC score** is their mean. A mask covers the slide: its
  regions do not grow past its edge (polygons are rasterised over their own window).
* **Slide-level ROC.** A slide is positive when its ground truth has any tumour (ITC
  included, as in the challenge's ``reference.csv``); its score is the prediction's
  slide score (``summary.json``: heatmap maximum by default) or, without one, the
  highest detection probability. AUC with a stratified bootstrap 95 % CI
  (:func:`napari_lnmeta.core.metrics.auc_bootstrap_ci`).

Ground truth for a slide comes from a mask (OME-Zarr written by lnmeta, PNG/TIFF covering
the slide, a :class:`~napari_lnmeta.io.annotations.LabelMask` or ``(array, SlideFrame)``)
or from polygons (CAMELYON16 ASAP XML, NCRF JSON, QuPath GeoJSON; tumour classes by name,
see :func:`napari_lnmeta.core.evaluation.tumour_values`). A file with no tumour (an empty
FeatureCollection, ``{"positive": []}``, an all-zero mask) is an explicit *negative*
slide. A slide with no ground-truth file is never assumed negative: it is skipped unless
listed in ``negatives``.

Everything here is Qt-free; :func:`evaluate_folders_job` is the progress generator that
``lnmeta evaluate-slides`` and the *Evaluate* widget run.

The package holds one subject per module: :mod:`.config` (constants, :class:`FrocConfig`),
:mod:`.truth` (ground-truth regions), :mod:`.scoring` (matching, FROC, ROC),
:mod:`.report` (summary, tables, figures, writing) and :mod:`.folders` (pairing
prediction and truth folders, the progress generators). Import from the package.
"""

from .config import (
    CAMELYON_LEVEL5_MPP,
    DILATION_UM,
    DUPLICATE,
    FP,
    FP_RATES,
    HIT,
    ITC,
    ITC_UM,
    REPORT_FILES,
    REPORT_FORMAT,
    FrocConfig,
)
from .folders import (
    SlidePrediction,
    evaluate_folders_job,
    evaluate_slide_job,
    find_predictions,
    find_truth,
    read_negatives,
    slide_key,
)
from .report import (
    DETECTION_COLUMNS,
    SLIDE_COLUMNS,
    EvaluationReport,
    froc_figure_png,
    roc_figure_png,
    summarise,
    write_report,
)
from .scoring import (
    SlideResult,
    froc_curve,
    froc_score,
    match_detections,
    slide_roc,
)
from .truth import (
    Regions,
    check_detections_on_slide,
    check_same_frame,
    evaluation_regions,
    load_truth,
)

__all__ = [
    "CAMELYON_LEVEL5_MPP",
    "DETECTION_COLUMNS",
    "DILATION_UM",
    "DUPLICATE",
    "FP",
    "FP_RATES",
    "HIT",
    "ITC",
    "ITC_UM",
    "REPORT_FILES",
    "REPORT_FORMAT",
    "SLIDE_COLUMNS",
    "EvaluationReport",
    "FrocConfig",
    "Regions",
    "SlidePrediction",
    "SlideResult",
    "check_detections_on_slide",
    "check_same_frame",
    "evaluate_folders_job",
    "evaluate_slide_job",
    "evaluation_regions",
    "find_predictions",
    "find_truth",
    "froc_curve",
    "froc_figure_png",
    "froc_score",
    "load_truth",
    "match_detections",
    "read_negatives",
    "roc_figure_png",
    "slide_key",
    "slide_roc",
    "summarise",
    "write_report",
]
