"""A MIL training cohort from a slide table: features, labels, splits and clinical data.

The table is a CSV with a ``slide`` (slide file) or ``features`` (feature cache) column,
a ``label`` column (class name or index) and optional ``split`` (train/val/test),
``regions`` (annotation file: bags only from its regions) and clinical columns; paths
are relative to the CSV's folder. :func:`mil_cohort_job` turns it into the
:class:`MILCohort` that :func:`napari_lnmeta.train.mil.train_mil_job` trains on:

* features: a listed cache is opened, a slide has its features extracted (or reused)
  in ``cache_dir`` with one extractor for the whole table; all must come from the same
  backbone and inputs;
* classes: given, else ``N0,N+`` or ``N0,N+(1-2),N+(>=3)`` when the labels are those,
  else ``0..K`` for integer labels, else the sorted label names;
* the grid settings new slides must be cut with (stored in the model:
  :func:`features_meta`);
* clinical data: an encoder fitted on the training slides only (the table's ``split``
  column, else a stratified split with the given fractions and seed), applied to all.

Used by ``lnmeta train-mil`` and usable from widgets and notebooks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..progress import Job, relay

if TYPE_CHECKING:
    from ..core.bags import MILSlide
    from ..core.features import FeatureCache, FeatureConfig
    from ..models.clinical import ClinicalEncoder
    from ..models.extractor import BackboneInfo


@dataclass
class MILCohort:
    """What :func:`~napari_lnmeta.train.mil.train_mil_job` needs besides its config."""

    slides: list[MILSlide]
    classes: list[str]
    backbone: BackboneInfo
    features_meta: dict[str, Any]
    splits: list[str] | None = None
    clinical: ClinicalEncoder | None = None
    table: Path | None = None
    names: list[str] = field(default_factory=list)


def mil_classes(labels: Sequence[str], given: str | Sequence[str] | None = None) -> list[str]:
    """Class names in label order: ``given`` (comma-separated or a list), else inferred."""
    from ..models.mil import CLASSES_2, CLASSES_3

    if given:
        items = given.split(",") if isinstance(given, str) else given
        classes = [c.strip() for c in items if c.strip()]
    elif set(labels) <= set(CLASSES_2):
        classes = list(CLASSES_2)
    elif set(labels) <= set(CLASSES_3):
        classes = list(CLASSES_3)
    elif all(v.isdigit() for v in labels):
        classes = [str(i) for i in range(max(int(v) for v in labels) + 1)]
    else:
        classes = sorted(set(labels))
    if len(classes) < 2:
        raise InputError(f"need at least two classes, got {classes}")
    return classes


def label_indices(labels: Sequence[str], classes: Sequence[str], *,
                  source: str = "table") -> list[int]:
    """Each label as its class index (a class name, or an index below ``len(classes)``)."""
    y = []
    for v in labels:
        if v in classes:
            y.append(list(classes).index(v))
        elif v.isdigit() and int(v) < len(classes):
            y.append(int(v))
        else:
            raise InputError(f"{source}: label {v!r} is not one of {', '.join(classes)}")
    return y


def features_meta(cache: FeatureCache) -> dict[str, Any]:
    """The grid settings new slides must be cut with to match ``cache`` (kept in the model)."""
    meta = dict(cache.attrs.get("config") or {})
    g = cache.attrs["grid"]
    if not meta:  # a cache made by extract_features_job on a custom grid
        meta = {"stride": g["stride"], "min_tissue": g["params"].get("min_tissue") or 0.5,
                "entropy_min": g["params"].get("entropy_min")}
        meta.update({"level": g["level"]} if g["level"] is not None else {"patch_mpp": g["mpp"]})
    if "mpp" in meta and "patch_mpp" not in meta:  # a store written before the key was patch_mpp
        meta["patch_mpp"] = meta.pop("mpp")
    for k in ("backbone", "init", "seed", "batch_size", "device", "amp", "patch_size"):
        meta.pop(k, None)
    return meta


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def mil_cohort_job(table: str | Path, feature_config: FeatureConfig, *,
                   cache_dir: str | Path, classes: str | Sequence[str] | None = None,
                   mpp: float | None = None, clinical: str | Path | None = None,
                   numeric: Sequence[str] = (), categorical: Sequence[str] = (),
                   region_scale: float = 1.0, test_fraction: float = 0.2,
                   val_fraction: float = 0.25, seed: int = 0) -> Job[MILCohort]:
    """Read a slide table into a :class:`MILCohort` (see the module docstring).

    Yields the progress of feature extraction for slides without a cache. ``clinical``:
    a clinical CSV joined on the slide name (default: the table's own columns);
    ``numeric`` / ``categorical``: the clinical columns to encode (none: no clinical data).
    """
    from ..core.bags import MILSlide, select_instances
    from ..core.features import FeatureCache, slide_features_job
    from ..io.slide import open_slide
    from ..models.clinical import ClinicalEncoder, clinical_row, read_csv_rows
    from ..models.extractor import load_extractor

    table = Path(table)
    base = table.parent
    rows = read_csv_rows(table)
    low = {h.lower(): h for h in rows[0]}
    if "label" not in low:
        raise InputError(f"{table}: needs a 'label' column")
    if "slide" not in low and "features" not in low:
        raise InputError(f"{table}: needs a 'slide' or a 'features' column")
    cfg = feature_config
    labels = [r[low["label"]] for r in rows]
    class_names = mil_classes(labels, classes)
    ext = None
    caches, names, instances = [], [], []
    for i, r in enumerate(rows, start=2):
        feat = r.get(low.get("features", ""), "")
        if feat:
            cache = FeatureCache(_resolve(base, feat))
        else:
            if ext is None:
                ext = load_extractor(cfg.backbone, init=cfg.init, seed=cfg.seed,
                                     patch_size=cfg.patch_size)
            slide = open_slide(_resolve(base, r[low["slide"]]), mpp=mpp)
            cache = yield from relay(slide_features_job(slide, cfg, cache_dir=Path(cache_dir),
                                                        extractor=ext))
        reg = r.get(low.get("regions", ""), "")
        idx = select_instances(cache, regions=_resolve(base, reg) if reg else None,
                               region_scale=region_scale)
        if len(idx) == 0:
            raise InputError(f"{table}: line {i}: no patches in the slide's regions")
        caches.append(cache)
        instances.append(idx)
        names.append(Path(r.get(low.get("slide", ""), "") or cache.slide_name).name)
    kinds = {c.backbone.features_key(): c.backbone for c in caches}
    if len(kinds) > 1:
        raise InputError(f"{table}: the features come from different backbones or "
                         "inputs (" + "; ".join(sorted(b.describe() for b in kinds.values()))
                         + "); extract them all with one backbone")
    fmeta = features_meta(caches[0])
    y = label_indices(labels, class_names, source=str(table))
    splits = [r[low["split"]].strip().lower() for r in rows] if "split" in low else None
    encoder, clin_rows = None, None
    src = str(clinical) if clinical else str(table)
    if numeric or categorical:
        clin_rows = [clinical_row(clinical, n) for n in names] if clinical else rows
        # fit on the training cohort only (no test-set statistics in the encoder)
        if splits is None:
            from .mil import split_slides

            splits = split_slides(y, test_fraction=test_fraction, val_fraction=val_fraction,
                                  seed=seed)
        tr = [k for k, s in enumerate(splits) if s == "train"]
        encoder = ClinicalEncoder.fit([clin_rows[k] for k in tr], numeric=list(numeric),
                                      categorical=list(categorical),
                                      names=[names[k] for k in tr], source=src)
    slides = []
    for k, (cache, idx) in enumerate(zip(caches, instances, strict=True)):
        clin = None if encoder is None else encoder.transform(clin_rows[k], name=names[k],
                                                              source=src)
        slides.append(MILSlide(name=names[k], features=cache.load(idx), label=y[k],
                               clinical=clin, coords=cache.coords[idx]))
    return MILCohort(slides=slides, classes=class_names, backbone=caches[0].backbone,
                     features_meta=fmeta, splits=splits, clinical=encoder, table=table,
                     names=names)


__all__ = ["MILCohort", "features_meta", "label_indices", "mil_classes", "mil_cohort_job"]
