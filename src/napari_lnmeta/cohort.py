"""Cohorts: run one pipeline step over many slides as Dask tasks.

A cohort is a folder, a glob or a CSV (``slide`` column, optional ``ihc``, ``mpp`` and
clinical columns). Each slide becomes one task on a Dask distributed cluster — a
``LocalCluster`` sized to the machine by default, or any scheduler address — and writes
one result folder ``OUT/<slide id>/`` atomically (temporary name, then rename), ending
with ``result.json``. A folder that exists is a finished slide: a rerun skips it, so a
cohort run is resumable, and a task that runs twice (a killed worker's task is
rescheduled) still leaves exactly one folder. Failed slides are retried once and
reported with their error; one slide never stops the others. ``cohort_summary.csv``
lists every slide with its status.

Python::

    from napari_lnmeta.cohort import load_cohort, run_cohort_job
    from napari_lnmeta.progress import run
    report = run(run_cohort_job(load_cohort("slides/"), "tissue", "out/"))

Steps (``STEPS``): ``tissue``, ``predict``, ``register`` (register + transfer-mask; needs
an ``ihc`` column), ``extract-features``, ``mil``. A step is a plain function
``step(item, out_dir, params) -> dict`` that writes into ``out_dir``.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import time
import traceback
import uuid
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import jsonio
from .progress import Progress

RESULT_FILE = "result.json"
SUMMARY_FILE = "cohort_summary.csv"


def _is_slide_entry(f: Path) -> bool:
    """A file named like a slide (:data:`io.slide.SLIDE_SUFFIXES`) or a DICOM series folder."""
    from .io.slide import SLIDE_SUFFIXES, dicom_series_file

    if f.is_file():
        return f.name.lower().endswith(SLIDE_SUFFIXES)
    return f.is_dir() and dicom_series_file(f) is not None


# --------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------
@dataclass
class CohortItem:
    """One slide of a cohort; ``error`` is set for rows that cannot run at all."""

    id: str
    slide: str
    ihc: str | None = None
    clinical: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    error: str | None = None
    #: the slide's level-0 µm/px from the cohort CSV's ``mpp`` column (wins over the file's)
    mpp: float | None = None
    #: µm/px the step used and where it came from (set when the slide is opened)
    units: dict[str, Any] | None = None


_ID_RE = re.compile(r"[\w][\w.-]{0,199}")


def check_id(slide_id: str, where: str) -> str:
    """A cohort id names the slide's result folder: a plain name, nothing else.

    Letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` or ``-`` (no path
    separators, no ``..``, not absolute, no hidden names), at most 200 characters.
    """
    if not _ID_RE.fullmatch(slide_id) or slide_id.lower() in _RESERVED:
        raise InputError(f"{where}: id {slide_id!r} is not a plain folder name (letters, "
                         "digits, '_', '-', '.'; not starting with '.' or '-')")
    return slide_id


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}


def _slide_id(path: str) -> str:
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    else:
        name = Path(name).stem
    sid = re.sub(r"[^\w.-]", "_", name)
    sid = re.sub(r"^[.-]", "_", sid)[:200] or "slide"
    return sid if sid.lower() not in _RESERVED else f"{sid}_"


def load_cohort(source: str | Path) -> list[CohortItem]:
    """Read a cohort from a folder, a glob pattern or a CSV.

    CSV columns: ``slide`` (or ``path``; required), optional ``id``, ``ihc``, ``label``;
    every other column is kept as clinical data. Relative paths are taken relative to
    the CSV. Missing files and duplicate slides are kept as items with ``error`` set, so
    they are reported per slide instead of stopping the cohort.
    """
    src = str(source)
    items: list[CohortItem] = []
    explicit: dict[str, str] = {}  # ids given in the CSV, case-folded: each names a folder
    if src.lower().endswith(".csv"):
        csv_path = Path(src)
        if not csv_path.is_file():
            raise InputError(f"{csv_path}: no such cohort CSV")
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            key = "slide" if "slide" in cols else "path" if "path" in cols else None
            if key is None:
                raise InputError(f"{csv_path}: a cohort CSV needs a 'slide' (or 'path') column; "
                                 f"found {cols}")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                if not row.get(key):
                    continue
                slide = _resolve(row[key], csv_path.parent)
                ihc = _resolve(row["ihc"], csv_path.parent) if row.get("ihc") else None
                clinical = {k: v for k, v in row.items()
                            if k not in (key, "id", "ihc", "label")}
                if row.get("id"):
                    check_id(row["id"], f"{csv_path}: line {reader.line_num}")
                    key_id = row["id"].casefold()
                    if key_id in explicit:
                        raise InputError(
                            f"{csv_path}: line {reader.line_num}: id {row['id']!r} is used "
                            f"twice (ids are folder names: {explicit[key_id]!r} and "
                            f"{row['id']!r} would share one folder)")
                    explicit[key_id] = row["id"]
                items.append(CohortItem(id=row.get("id") or _slide_id(slide), slide=slide,
                                        ihc=ihc, clinical=clinical, label=row.get("label") or None))
    else:
        p = Path(src)
        if p.is_dir() and not (p / ".zattrs").exists() and not (p / "zarr.json").exists():
            paths = sorted(str(f) for f in p.iterdir() if _is_slide_entry(f))
        else:
            paths = sorted(glob.glob(src)) if any(c in src for c in "*?[") else [src]
        if not paths:
            raise InputError(f"{src}: no slides found")
        items = [CohortItem(id=_slide_id(s), slide=str(Path(s).resolve())) for s in paths]
    for it in items:  # the optional per-slide µm/px column is not clinical data
        _take_mpp(it, src)
    seen_slides: dict[str, str] = {}
    seen_ids: dict[str, int] = {}
    for it in items:
        real = os.path.realpath(it.slide)
        if real in seen_slides:
            it.error = f"duplicate of slide {seen_slides[real]!r} in the cohort; processed once"
            it.id = f"{it.id}__dup{seen_ids.get(it.id, 0) + 1}"
            continue
        seen_slides[real] = it.id
        key = it.id.casefold()  # folder names collide without case on some filesystems
        if key in seen_ids:  # same name, different folder
            seen_ids[key] += 1
            it.id = f"{it.id}_{seen_ids[key]}"
        else:
            seen_ids[key] = 0
        if not Path(it.slide).exists():
            it.error = f"{it.slide}: no such file or directory"
        elif it.ihc and not Path(it.ihc).exists():
            it.error = f"{it.ihc}: no such file or directory (IHC partner)"
    if not items:
        raise InputError(f"{src}: the cohort is empty")
    return items


def _take_mpp(item: CohortItem, source: str) -> None:
    """Move a CSV ``mpp`` value out of the clinical columns into ``item.mpp``."""
    import math

    raw = item.clinical.pop("mpp", "")
    if not raw:
        return
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        item.error = (f"{source}: slide {item.id}: mpp {raw!r} is not a positive number of "
                      "µm per pixel")
        return
    item.mpp = v


def parse_value(v: str) -> Any:
    """A step parameter's text as int, float or bool when it reads as one, else the text."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def parse_params(pairs: Any, *, what: str = "--param") -> dict[str, Any]:
    """``KEY=VALUE`` texts as step parameters (``-`` in keys read as ``_``).

    Raises :class:`~napari_lnmeta.errors.InputError` for a text without ``=``.
    """
    params: dict[str, Any] = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise InputError(f"{what} {kv!r}: expected KEY=VALUE")
        params[k.strip().replace("-", "_")] = parse_value(v.strip())
    return params


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


# --------------------------------------------------------------------------------------
# Steps: thin wrappers over the Qt-free core, one result folder each
# --------------------------------------------------------------------------------------
def _open(item: CohortItem, params: dict[str, Any]):
    """Open a cohort slide with its physical units; a missing µm/px is reported in the
    record and the cohort summary, not warned.

    µm/px: the cohort CSV's ``mpp`` for this slide, else the file's, else the cohort's
    ``mpp`` parameter (``lnmeta batch --mpp``: only for slides that lack it), else none.
    """
    import warnings

    from .io.slide import MppWarning, open_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(item.slide, mpp=item.mpp)
        source = "cohort CSV" if item.mpp is not None else slide.mpp_source
        if slide.mpp is None and params.get("mpp") is not None:
            slide.close()
            slide = open_slide(item.slide, mpp=params["mpp"])
            source = "--mpp (the file has none)"
    item.units = {"mpp": slide.mpp, "mpp_source": source if slide.mpp is not None else None}
    return slide


def step_tissue(item: CohortItem, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    from .core.tissue import tissue_mask

    slide = _open(item, params)
    tm = tissue_mask(slide, target_mpp=params.get("target_mpp", 10.0),
                     method=params.get("method", "otsu"))
    tm.save(out / "tissue.ome.zarr")
    return {"mpp": slide.mpp, "tissue_fraction": round(float(tm.area_fraction), 6),
            "tissue_area_mm2": None if tm.area_um2 is None else round(tm.area_um2 / 1e6, 4)}


def _config(cls, params: dict[str, Any], step: str, *, extra: tuple[str, ...] = ()):
    """``cls(**params)`` with the fields it knows; an unknown key is an error, not ignored."""
    import dataclasses

    # ``mpp`` is the slides' level-0 µm/px override (--mpp), not a step parameter; a read
    # resolution is ``patch_mpp``, as in the configs and ``lnmeta predict --patch-mpp``.
    params = {k: v for k, v in params.items() if k != "mpp"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names - set(extra))
    if unknown:
        known = sorted(names | set(extra))
        raise InputError(f"step {step!r}: unknown parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return cls(**{k: v for k, v in params.items() if k in names})


def step_predict(item: CohortItem, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Heatmap, maps, lesions and summary of the slide (``lnmeta predict``)."""
    from .core.inference import InferenceConfig
    from .core.predict import predict_to_folder_job
    from .progress import run as drive

    cfg = _config(InferenceConfig, params, "predict", extra=("truth", "truth_scale"))
    slide = _open(item, params)
    pred = drive(predict_to_folder_job(slide, out / "predict", cfg, overwrite=True,
                                   truth=params.get("truth"),
                                   truth_scale=params.get("truth_scale", 1.0)))
    s = pred.summary()
    return {"mpp": slide.mpp, "score_max": s["score"]["max"],
            "score_top_k_mean": s["score"]["top_k_mean"], "patches": s["counts"]["patches"],
            "lesions": s["counts"]["lesions"], "device": s["device"]}


def step_register(item: CohortItem, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Register the slide's IHC partner onto it and transfer the DAB tumour mask."""
    from .core.dab import DabParams, transfer_mask_job
    from .core.registration import RegistrationConfig, register_job
    from .io.slide import open_slide
    from .progress import run as drive

    if not item.ihc:
        raise InputError(f"{item.slide}: step 'register' needs an IHC partner "
                         f"(an 'ihc' column in the cohort CSV)")
    dab_keys = {"threshold", "min_area_um2", "close_um", "fibrosis_um"}
    rparams = {k: v for k, v in params.items() if k not in dab_keys | {"mask_mpp", "ihc_mpp"}}
    cfg = _config(RegistrationConfig, rparams, "register")
    dab = _config(DabParams, {k: v for k, v in params.items() if k in dab_keys}, "register")
    fixed = _open(item, params)
    moving = open_slide(item.ihc, mpp=params.get("ihc_mpp"))
    t = drive(register_job(fixed, moving, cfg))
    t.save(out / "transform.json", inputs=(item.slide, item.ihc))
    res = drive(transfer_mask_job(fixed, moving, t, out / "tumour_mask.ome.zarr", dab,
                              mask_mpp=params.get("mask_mpp", 2.0)))
    return {"ihc": item.ihc, "mode": cfg.mode, "dab_threshold": round(float(res.threshold), 5),
            "tumour_fraction": round(float(res.tumour_fraction), 6)}


def step_features(item: CohortItem, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Patch features of the slide as a zarr store (``lnmeta extract-features``)."""
    from .core.features import FeatureConfig, slide_features_job
    from .progress import run as drive

    cfg = _config(FeatureConfig, params, "extract-features", extra=("regions", "region_scale"))
    slide = _open(item, params)
    cache = drive(slide_features_job(slide, cfg, out=out / "features.zarr",
                                     regions=params.get("regions"),
                                     region_scale=params.get("region_scale", 1.0)))
    return {"patches": len(cache), "backbone": cfg.backbone}


def step_mil(item: CohortItem, out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Slide-level MIL prediction with attention (``lnmeta mil``); needs ``model``."""
    from .core.mil import MILInferenceConfig, predict_slide_job
    from .progress import run as drive

    model = params.get("model")
    if not model:
        raise InputError("step 'mil' needs a MIL model file: --param model=PATH")
    cfg = _config(MILInferenceConfig, {k: v for k, v in params.items() if k != "model"}, "mil")
    slide = _open(item, params)
    res = drive(predict_slide_job(slide, model, config=cfg, clinical=item.clinical or None,
                                  out_dir=out / "mil", overwrite=True,
                                  clinical_source="the cohort CSV"))
    probs = {c: round(float(p), 6) for c, p in zip(res.classes, res.probabilities, strict=True)}
    out_ = {"predicted": res.predicted, "probabilities": probs, "instances": len(res.instances)}
    if res.extra.get("notes"):  # e.g. a model file without feature statistics
        out_["notes"] = list(res.extra["notes"])
    return out_


STEPS: dict[str, Callable[[CohortItem, Path, dict[str, Any]], dict[str, Any]]] = {
    "tissue": step_tissue,
    "predict": step_predict,
    "register": step_register,
    "extract-features": step_features,
    "mil": step_mil,
}


def register_step(name: str):
    """Add a step: ``@register_step("name") def step(item, out_dir, params) -> dict``."""

    def deco(fn):
        STEPS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------
# Running one slide (inside a Dask task, or in-process)
# --------------------------------------------------------------------------------------
def run_item(item: CohortItem, step: str, out_root: str, params: dict[str, Any], *,
             overwrite: bool = False) -> dict[str, Any]:
    """Run ``step`` on one slide into ``out_root/<id>/``, atomically and idempotently.

    The slide's folder is built under a temporary name and renamed into place when
    complete. A finished folder (``result.json``) is returned as it is, or with
    ``overwrite`` replaced only once the new one is complete. Any other existing
    ``out_root/<id>`` is not ours: it is never touched, and the slide fails.

    Returns the slide's record (also stored as ``result.json``). Raises on failure so
    that Dask retries the task.
    """
    from .io.atomic import replace

    root = Path(out_root)
    final = root / check_id(item.id, "cohort")
    if (final / RESULT_FILE).is_file() and not overwrite:
        return json.loads((final / RESULT_FILE).read_text())
    _check_free(final)
    tmp = root / f".{item.id}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    params = dict(params)
    index = _worker_index()  # GPUs are counted (torch imported) only inside a worker
    device = worker_device(params.get("device", "auto"), index,
                           _gpu_count() if index is not None else 0)
    if device is not None:
        params["device"] = device
    try:
        import dask

        # Lazy slide arrays are computed with local threads inside the task: inside a
        # Dask worker the default would ship each compute back through the scheduler.
        with dask.config.set(scheduler="threads"):
            result = STEPS[step](item, tmp, params)
        record = {"id": item.id, "slide": item.slide, "step": step, "status": "done",
                  "seconds": round(time.perf_counter() - t0, 3), "result": result,
                  **_units_of(item),
                  "host": os.uname().nodename, "pid": os.getpid()}
        (tmp / RESULT_FILE).write_text(jsonio.dumps(record, indent=2))
        if overwrite and (final / RESULT_FILE).is_file():
            replace(tmp, final)  # the old folder goes only now
            return record
        try:
            os.rename(tmp, final)  # atomic; fails if another run already finished it
        except OSError:
            if (final / RESULT_FILE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return json.loads((final / RESULT_FILE).read_text())
            _check_free(final)
            raise
        return record
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


NO_MPP = "no µm/px: sizes and areas in pixels only (give --mpp or an mpp column)"


def _units_of(item: CohortItem) -> dict[str, Any]:
    """The record's ``mpp``, ``mpp_source`` and, without µm/px, a ``warning``."""
    if item.units is None:  # the step did not open the slide
        return {}
    out = {"mpp": item.units["mpp"], "mpp_source": item.units["mpp_source"]}
    if item.units["mpp"] is None:
        out["warning"] = NO_MPP
    return out


def _check_free(final: Path) -> None:
    """Refuse a slide folder that exists but is not a finished slide of ours."""
    if (final.exists() or final.is_symlink()) and not (final / RESULT_FILE).is_file():
        raise InputError(f"{final}: exists and is not a finished slide of this cohort "
                         "(never touched; move it away or choose another -o)")


def worker_device(requested: Any, worker_index: int | None, n_gpus: int) -> str | None:
    """The GPU a cluster worker uses when the step asks for ``device="auto"``.

    LocalCluster workers are numbered 0, 1, ...; with several GPUs, worker ``i`` takes
    ``cuda:{i mod n_gpus}`` so that one worker per GPU (the default sizing) spreads the
    cohort over all of them. ``None``: leave the step's device as it is (an explicit
    device, one GPU or none, or not inside a numbered worker).
    """
    if requested not in (None, "auto") or worker_index is None or n_gpus < 2:
        return None
    return f"cuda:{worker_index % n_gpus}"


def _worker_index() -> int | None:
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _error_text(exc: BaseException) -> str:
    from .errors import LnmetaError

    if isinstance(exc, LnmetaError):
        return str(exc)
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last


#: step parameters that may name files or folders (made absolute on the client)
PATH_PARAMS = ("model", "truth", "regions", "cache_dir", "init", "stain_target", "backbone")


def _absolute_paths(params: dict[str, Any]) -> dict[str, Any]:
    """Relative file parameters (``model=m.safetensors``) as absolute paths of this
    process's working folder, so that workers elsewhere find the same files. A value
    that names no file here (``init=imagenet``, ``backbone=resnet18``) is left as it is;
    ``cache_dir`` is a folder to create, always resolved."""
    for k, v in params.items():
        if not (isinstance(v, str) and v and k in PATH_PARAMS):
            continue
        p = Path(v).expanduser()
        if k == "cache_dir" or p.exists():
            params[k] = str(p if p.is_absolute() else p.resolve())
    return params


@dataclass
class CohortReport:
    out: Path
    records: list[dict[str, Any]]
    dashboard: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.records:
            c[r["status"]] = c.get(r["status"], 0) + 1
        return c

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]

    def without_mpp(self) -> list[dict[str, Any]]:
        """Slides that ran without a µm/px (flagged in the summary)."""
        return [r for r in self.records if r.get("warning") == NO_MPP]


def write_summary(out: Path, records: list[dict[str, Any]]) -> Path:
    """``cohort_summary.csv``: one row per slide, the step's scalar results as columns."""
    from .io.atomic import write_text_atomic

    keys: list[str] = []
    for r in records:
        for k, v in (r.get("result") or {}).items():
            if k not in keys and not isinstance(v, (dict, list)):
                keys.append(k)
    import io as _io

    buf = _io.StringIO()
    w = csv.writer(buf)
    keys = [k for k in keys if k != "mpp"]  # the slide's µm/px is its own column
    w.writerow(["id", "slide", "status", "seconds", "error", "mpp", "mpp_source", "warning",
                *keys])
    for r in records:
        res = r.get("result") or {}
        mpp = r.get("mpp", res.get("mpp"))
        w.writerow([r["id"], r["slide"], r["status"], r.get("seconds", ""),
                    r.get("error", ""), "" if mpp is None else mpp, r.get("mpp_source") or "",
                    r.get("warning", ""), *[res.get(k, "") for k in keys]])
    return write_text_atomic(out / SUMMARY_FILE, buf.getvalue(), overwrite=True)


def default_cluster_size() -> tuple[int, int]:
    """``(workers, threads per worker)``: one worker per GPU, else up to 4 per machine."""
    ncpu = os.cpu_count() or 1
    ngpu = _gpu_count()
    workers = ngpu if ngpu else max(1, min(4, ncpu // 2))
    return workers, max(1, ncpu // workers)


def run_cohort_job(items: list[CohortItem], step: str, out: str | Path, *,
              params: dict[str, Any] | None = None, scheduler: str | None = None,
              n_workers: int | None = None, threads_per_worker: int | None = None,
              retries: int = 1, client: Any = None,
              on_start: Callable[[Any], None] | None = None, overwrite: bool = False,
              ) -> Generator[Progress, None, CohortReport]:
    """Run ``step`` over ``items``; yields one :class:`Progress` per finished slide.

    Parameters
    ----------
    scheduler
        ``None``: start a ``LocalCluster`` (``n_workers`` x ``threads_per_worker``, sized
        to the machine by default); ``"tcp://host:8786"``: use that cluster;
        ``"sync"``: run in this process, no Dask (the single-process reference).
    retries
        How often a failed slide is retried (Dask task retries) before it is reported.
    client
        An existing ``distributed.Client`` to use instead.
    on_start
        Called with the client once the cluster is up (e.g. to print the dashboard).
    overwrite
        Run finished slides again; each old folder is replaced only when its new one is
        complete. Without it a finished slide is skipped (a rerun resumes the cohort).

    Raises
    ------
    InputError
        Before any work: an ``OUT/<id>`` that exists and is not a finished slide (a
        folder of the user's, e.g. ``-o`` pointed at the slides' folder), ``OUT`` or a
        slide folder that is or holds an input, or an ``OUT/cohort_summary.csv`` that
        this command did not write.
    OutputLockedError
        Another run writes into ``OUT``.
    """
    from .io.atomic import output_lock

    if step not in STEPS:
        raise InputError(f"unknown step {step!r}; choose from {', '.join(sorted(STEPS))}")
    # paths are resolved here, on the client: a worker's working folder may be another
    params = _absolute_paths(dict(params or {}))
    out = Path(out).expanduser().resolve()
    _check_out(items, out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one cohort run per output folder
        _check_out(items, out)
        return (yield from _run_batch(items, step, out, params, scheduler, n_workers,
                                      threads_per_worker, retries, client, on_start,
                                      overwrite))


def _check_out(items: list[CohortItem], out: Path) -> None:
    """Everything ``run_cohort_job`` refuses, checked before any slide runs."""
    from .io.atomic import check_inputs

    inputs = [p for it in items for p in (it.slide, it.ihc) if p]
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    check_inputs(out, inputs, whole=False)
    clashes = []
    for it in items:
        final = out / check_id(it.id, "cohort")
        check_inputs(final, [p for p in (it.slide, it.ihc) if p])
        if (final.exists() or final.is_symlink()) and not (final / RESULT_FILE).is_file():
            clashes.append(final)
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise InputError(f"{clashes[0]}: exists and is not a finished slide of a cohort run"
                         f"{more}; nothing was run or touched (choose another -o)")
    summ = out / SUMMARY_FILE
    if summ.exists() and not _is_our_summary(summ):
        raise InputError(f"{summ}: exists and was not written by lnmeta batch; nothing was "
                         "run or touched (choose another -o)")


def _is_our_summary(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return (header[:5] == ["id", "slide", "status", "seconds", "error"]
            and (path.parent / "cohort.json").is_file())


def _run_batch(items, step, out, params, scheduler, n_workers, threads_per_worker, retries,
               client, on_start, overwrite) -> Generator[Progress, None, CohortReport]:
    records: dict[str, dict[str, Any]] = {}
    todo: list[CohortItem] = []
    for it in items:
        base = {"id": it.id, "slide": it.slide, "step": step}
        if it.error:
            records[it.id] = {**base, "status": "failed", "error": it.error}
        elif (out / it.id / RESULT_FILE).is_file() and not overwrite:
            rec = json.loads((out / it.id / RESULT_FILE).read_text())
            records[it.id] = {**rec, "status": "skipped"}
        else:
            todo.append(it)
    total = len(items)
    done = len(records)
    yield Progress(done, total, f"{done} already finished or invalid, {len(todo)} to run")
    dashboard = None
    if todo and scheduler == "sync":
        for it in todo:
            rec = None
            for attempt in range(retries + 1):
                try:
                    rec = run_item(it, step, str(out), params, overwrite=overwrite)
                    break
                except Exception as e:  # reported per slide, never stops the cohort
                    err = _error_text(e)
                    if attempt == retries:
                        rec = {"id": it.id, "slide": it.slide, "step": step,
                               "status": "failed", "error": err}
            records[it.id] = rec
            done += 1
            yield Progress(done, total, f"{it.id}: {rec['status']}", partial=rec)
    elif todo:
        from distributed import Client, LocalCluster, as_completed

        own_client = client is None
        cluster = None
        if client is None:
            if scheduler:
                client = Client(scheduler)
            else:
                w, t = default_cluster_size()
                cluster = LocalCluster(n_workers=n_workers or w,
                                       threads_per_worker=threads_per_worker or t,
                                       processes=True, dashboard_address=":0",
                                       silence_logs=40)
                client = Client(cluster)
        dashboard = getattr(client, "dashboard_link", None)
        if on_start is not None:
            on_start(client)
        try:
            futures = {client.submit(run_item, it, step, str(out), params, key=f"{step}-{it.id}",
                                     retries=retries, pure=False, overwrite=overwrite): it
                       for it in todo}
            try:
                for fut in as_completed(futures):
                    it = futures[fut]
                    try:
                        rec = fut.result()
                    except Exception as e:
                        rec = {"id": it.id, "slide": it.slide, "step": step,
                               "status": "failed", "error": _error_text(e)}
                    records[it.id] = rec
                    done += 1
                    yield Progress(done, total, f"{it.id}: {rec['status']}", partial=rec)
            except GeneratorExit:  # cancelled: stop what is queued; finished folders stay
                client.cancel(list(futures))
                raise
        finally:
            if own_client:
                client.close()
                if cluster is not None:
                    cluster.close()
    ordered = [records[it.id] for it in items]
    tmp_name = re.compile(r"\.(.+)\.(tmp|old)-[0-9a-f]{8}")
    ids = {it.id for it in items}
    for stale in out.iterdir():  # temporary folders of tasks whose worker died mid-write
        m = tmp_name.fullmatch(stale.name)
        if m and m.group(1) in ids and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    write_summary(out, ordered)
    from .io.atomic import write_text_atomic

    write_text_atomic(out / "cohort.json", jsonio.dumps(
        {"step": step, "params": params, "items": [asdict(i) for i in items]}, indent=2),
        overwrite=True)
    return CohortReport(out=out, records=ordered, dashboard=dashboard)
