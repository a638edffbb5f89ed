"""Constants and parameters of the CAMELYON16 evaluation (:class:`FrocConfig`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ...errors import InputError

#: the challenge's dilation of the annotations (µm): regions grow by this in diameter
DILATION_UM = 75.0
#: isolated tumour cells: regions smaller than this (µm, before dilation)
ITC_UM = 200.0
#: average false positives per slide at which FROC sensitivity is read
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: CAMELYON16 evaluation masks are level 5 of a 0.243 µm/px scan
CAMELYON_LEVEL5_MPP = 0.243 * 32
#: outcome of a detection
HIT, DUPLICATE, ITC, FP = "TP", "duplicate", "ITC", "FP"
REPORT_FORMAT = "lnmeta-camelyon16-evaluation"
#: files written by :func:`write_report`
REPORT_FILES = ("report.json", "slides.csv", "detections.csv", "roc.png", "froc.png")


@dataclass
class FrocConfig:
    """Parameters of the CAMELYON16 evaluation (defaults: the challenge's).

    Attributes
    ----------
    dilation_um
        Growth of each annotated region's diameter (µm): pixels closer than
        ``dilation_um / 2`` to tumour join it.
    itc_um
        Regions whose major axis is below ``itc_um + dilation_um`` after dilation are ITC.
    fp_rates
        Average FPs per slide at which the sensitivity is read.
    eval_mpp
        µm/px at which polygons are rasterised; finer masks are reduced to about this
        (``None``: polygons at level-5-equivalent, masks as they are).
    truth_scale
        Slide pixels per polygon-file pixel (``1/32`` for level-0 CAMELYON polygons on
        a level-5 slide).
    mpp
        Level-0 µm/px of the slides when the predictions do not say (flat files).
    mask_downsample
        Level-0 pixels per mask pixel of PNG/TIFF masks when the slide size is unknown.
    lesions
        Where detections come from in a prediction folder: ``"file"`` (its
        ``lesions.geojson``), ``"nms"`` or ``"components"`` (recomputed from its heatmap).
    lesion_threshold, lesion_radius_um
        Parameters of a recomputation.
    score
        Slide score key of ``summary.json`` (``"max"`` or ``"top_k_mean"``).
    slide_threshold
        Slide score above which a slide is called positive (ACC/SEN/SPE in the report).
    n_boot, seed
        Bootstrap replicates and seed of the AUC confidence interval.
    """

    dilation_um: float = DILATION_UM
    itc_um: float = ITC_UM
    fp_rates: tuple[float, ...] = FP_RATES
    eval_mpp: float | None = CAMELYON_LEVEL5_MPP
    truth_scale: float = 1.0
    mpp: float | None = None
    mask_downsample: float | None = None
    lesions: str = "file"
    lesion_threshold: float = 0.5
    lesion_radius_um: float = 200.0
    score: str = "max"
    slide_threshold: float = 0.5
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self):
        if self.lesions not in ("file", "nms", "components"):
            raise InputError(f"lesions must be 'file', 'nms' or 'components', got "
                             f"{self.lesions!r}")
        if self.dilation_um < 0 or self.itc_um < 0:
            raise InputError("dilation and ITC size must be >= 0 µm")
        self.fp_rates = tuple(float(r) for r in self.fp_rates)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fp_rates"] = list(self.fp_rates)
        return d
