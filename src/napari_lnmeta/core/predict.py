"""Whole-slide prediction: inference + derived maps + lesions + evaluation, and the result folder.

:func:`postprocess` turns an :class:`~napari_lnmeta.core.inference.InferenceResult` into a
:class:`Prediction` (binary and 3-tier maps, slide score, lesions, optional evaluation);
:func:`write_prediction` writes it as a folder; :func:`predict_to_folder_job` does all of it
resumably (``lnmeta predict``).

The result folder::

    OUT_DIR/
      probability.ome.zarr   heatmap (float16 or uint8), multiscale OME-Zarr, slide-aligned
      binary.ome.zarr        labels: 1 where p > 0.5 (red)
      tiers.ome.zarr         labels: 1 blue (0.5-0.7), 2 green (0.7-0.9), 3 red (> 0.9)
      analysed.ome.zarr      labels: 1 on the cells that were analysed (tissue patches),
                             2 on unknown cells (a corrupt tile, ``--on-corrupt-tile skip``)
      lesions.geojson        lesion candidates (QuPath GeoJSON points)
      overview.png           thumbnail with the 3-tier map
      summary.json           written last: its presence means the folder is complete
      .partial/              checkpoint while a run is unfinished (removed at the end)

Every file is written atomically; ``summary.json`` comes last, so a cancelled or crashed
run never leaves a folder that claims to be complete. The folder is built beside the
target (``.OUT_DIR.tmp-*``) and swapped in when complete, so ``--overwrite`` keeps the
previous result until the new one is ready; a run holds the writer lock on ``OUT_DIR``
(:func:`napari_lnmeta.io.atomic.output_lock`) from start to finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, OutputExistsError
from ..progress import Job, Progress
from .heatmap import (
    BINARY_COLORS,
    TIER_COLORS,
    binary_map,
    overview_image,
    slide_score,
    tier_counts,
    tier_map,
    to_storage,
    write_png,
)
from .inference import InferenceConfig, InferenceResult, run_inference_job
from .lesions import Lesions, find_lesions, write_lesions_geojson

if TYPE_CHECKING:
    from torch import nn

    from ..io.slide import Slide
    from ..models.io import ModelMeta

SUMMARY = "summary.json"
PARTIAL = ".partial"
OUTPUTS = ("probability.ome.zarr", "binary.ome.zarr", "tiers.ome.zarr", "analysed.ome.zarr",
           "lesions.geojson", "overview.png")
SUMMARY_FORMAT = "lnmeta-prediction"


@dataclass
class Prediction:
    """Everything derived from one inference run."""

    result: InferenceResult
    binary: np.ndarray
    tiers: np.ndarray
    score: dict[str, Any]
    lesions: Lesions
    evaluation: dict[str, Any] | None = None

    @property
    def frame(self):
        return self.result.frame

    @property
    def probability(self) -> np.ndarray:
        return self.result.probability

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json``."""
        r = self.result
        cfg = r.config
        mpp0 = r.frame.slide_mpp
        cell_um2 = (r.frame.downsample * mpp0) ** 2 if mpp0 else None
        n_cells = int(r.scored.sum())
        n_unknown = 0 if r.unknown is None else int(r.unknown.sum())
        tissue_um2 = r.tissue.area_um2
        return {
            "format": SUMMARY_FORMAT,
            "version": 1,
            "complete": True,
            "slide": {"path": r.slide_path, "name": r.grid.slide,
                      "shape": list(r.grid.slide_shape), "mpp": mpp0},
            "score": self.score,
            "counts": {"patches": int(len(r.grid)), "cells_analysed": n_cells,
                       "unknown_cells": n_unknown,
                       "positive_cells": int((self.binary > 0).sum()),
                       "tiers": tier_counts(self.tiers), "lesions": len(self.lesions)},
            "tissue": {"area_um2": tissue_um2,
                       "area_mm2": None if tissue_um2 is None else tissue_um2 / 1e6,
                       "fraction": r.tissue.area_fraction,
                       "analysed_area_mm2": None if cell_um2 is None else n_cells * cell_um2 / 1e6,
                       "method": r.tissue.method, "threshold": r.tissue.threshold},
            "timing": r.timing,
            "device": r.device,
            "batch_size": r.batch_size,
            "model": {"path": r.model_path, "architecture": r.meta.architecture,
                      "classes": r.meta.classes, "patch_size": r.meta.patch_size,
                      "mpp": r.meta.mpp, "head": r.meta.head,
                      "normalisation": r.meta.normalisation,
                      # provenance of a pretrained start: backbone id + weights hash
                      "init": (r.meta.extra or {}).get("init")},
            "parameters": {**_jsonable(r.params), "heatmap_dtype": cfg.heatmap_dtype,
                           "lesion_threshold": cfg.lesion_threshold,
                           "lesion_radius_um": cfg.lesion_radius_um,
                           "lesion_method": cfg.lesion_method, "top_k": cfg.top_k,
                           "amp": cfg.amp, "channels_last": cfg.channels_last,
                           "compile": cfg.compile, "decode": cfg.decode,
                           "on_corrupt_tile": cfg.on_corrupt_tile},
            "corrupt_tiles": r.corrupt_tiles[:1000],
            "frame": r.frame.to_json(),
            "lesions": self.lesions.to_json(),
            "lesion_notes": self.lesions.notes,
            "evaluation": self.evaluation,
            "warnings": r.warnings,
            "resumed_patches": r.resumed,
            "files": list(OUTPUTS),
        }


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (np.integer,)):
        return int(d)
    if isinstance(d, (np.floating,)):
        return float(d)
    return d


def postprocess(result: InferenceResult, *, truth: Any = None,
                truth_scale: float = 1.0) -> Prediction:
    """Binary and 3-tier maps, slide score, lesions and (with ``truth``) evaluation."""
    cfg = result.config
    prob = np.where(result.scored, result.probability, 0.0).astype(np.float32)
    lesions = find_lesions(prob, result.frame, threshold=cfg.lesion_threshold,
                           radius_um=cfg.lesion_radius_um, scored=result.scored,
                           method=cfg.lesion_method)
    pred = Prediction(result=result, binary=binary_map(prob), tiers=tier_map(prob),
                      score=slide_score(prob, result.scored, top_k=cfg.top_k), lesions=lesions)
    if truth is not None:
        pred.evaluation = evaluate(pred, truth, truth_scale=truth_scale)
    return pred


def predict_job(slide: Slide, config: InferenceConfig | None = None, *,
                model: tuple[nn.Module, ModelMeta] | None = None,
                truth: Any = None) -> Job[Prediction]:
    """:func:`run_inference_job` then :func:`postprocess`, in memory (the widget's job)."""
    result = yield from run_inference_job(slide, config, model=model)
    return postprocess(result, truth=truth)


def evaluate(pred: Prediction, truth: Any, *, truth_scale: float = 1.0) -> dict[str, Any]:
    """Patch-level ACC, SEN, SPE, weighted F1, AUC of a prediction against a tumour mask.

    ``truth_scale``: slide pixels per file pixel for polygon files (see
    :func:`napari_lnmeta.core.evaluation.truth_fractions`).
    """
    from .evaluation import PatchBoxes, evaluate_heatmap

    r = pred.result
    keep = r.scored[r.grid.index[:, 0], r.grid.index[:, 1]]
    boxes = PatchBoxes(coords=r.grid.coords[keep].astype(np.float64), size0=r.grid.size0,
                       cells=r.grid.index[keep], slide_shape=r.grid.slide_shape,
                       slide_mpp=r.frame.slide_mpp)
    out = evaluate_heatmap(r.probability, boxes, truth, scale=truth_scale)
    out["truth"] = str(truth) if isinstance(truth, (str, Path)) else type(truth).__name__
    return out


def write_prediction(pred: Prediction, out_dir: str | Path, *, overwrite: bool = False,
                     slide: Slide | None = None, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Write a prediction folder (see module docstring); ``summary.json`` last.

    Parameters
    ----------
    pred
        What to write.
    out_dir
        Target folder; an existing *complete* result is refused unless ``overwrite``.
    slide
        The slide, for the overview thumbnail (re-opened from its path when ``None``).
    inputs
        Paths never to write into (the slide).
    """
    from ..io.atomic import atomic_path

    out = Path(out_dir)
    r = pred.result
    inputs = tuple(inputs) + (r.slide_path,)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    # The new folder is built beside the old one and swapped in when complete: an
    # existing result (or an unfinished run's checkpoint) stays until then.
    replace_ok = overwrite or not (out / SUMMARY).exists()
    with atomic_path(out, overwrite=replace_ok, inputs=inputs) as tmp:
        if (out / SUMMARY).exists() and not overwrite:
            raise OutputExistsError(out)
        tmp.mkdir()
        _write_files(pred, tmp, slide, inputs)
    return out


def _write_files(pred: Prediction, out: Path, slide: Slide | None,
                 inputs: tuple[str | Path, ...]) -> None:
    from ..io.atomic import write_json_atomic
    from ..io.omezarr import write_ome_zarr

    r = pred.result
    frame = r.frame
    common = {"frame": frame, "overwrite": True, "inputs": inputs}
    u8 = r.config.heatmap_dtype == "uint8"
    prob_attrs = {"probability": {"dtype": r.config.heatmap_dtype, "size0": r.size0,
                                  "stride0": float(r.grid.stride0), "scale": 255 if u8 else 1},
                  "contrast_limits": [0, 255] if u8 else [0.0, 1.0],
                  "model": r.meta.architecture}
    prob = np.where(r.scored, r.probability, 0.0)
    analysed = r.scored.astype(np.uint8)
    if r.unknown is not None and r.unknown.any():
        prob = np.where(r.unknown, np.nan, prob)  # float heatmaps: NaN; uint8: 0
        analysed[r.unknown] = 2
    if slide is None:
        from ..io.slide import open_slide

        slide = open_slide(r.slide_path, mpp=r.grid.slide_mpp)

    def overview() -> None:
        import contextlib

        # skipping corrupt tiles: a damaged tile of the thumbnail's level is drawn as decoded
        unchecked = r.config.on_corrupt_tile == "skip" and hasattr(slide, "unchecked_reads")
        with slide.unchecked_reads() if unchecked else contextlib.nullcontext():
            thumb = overview_image(slide, pred.tiers, frame, lesions=pred.lesions.coords,
                                   scored=r.scored)
        write_png(out / "overview.png", thumb, overwrite=True)

    from concurrent.futures import ThreadPoolExecutor

    # the thumbnail (a slide read, blending, PNG encoding: all release the GIL) is made
    # beside the small maps' writes
    with ThreadPoolExecutor(1, thread_name_prefix="lnmeta-overview") as ex:
        thumb_done = ex.submit(overview)
        write_ome_zarr(out / "probability.ome.zarr", to_storage(prob, r.config.heatmap_dtype),
                       kind="image", name="tumour probability", attrs=prob_attrs, **common)
        write_ome_zarr(out / "binary.ome.zarr", pred.binary, kind="labels",
                       name="tumour (p > 0.5)", colors=BINARY_COLORS, **common)
        write_ome_zarr(out / "tiers.ome.zarr", pred.tiers, kind="labels",
                       name="tumour probability tiers", colors=TIER_COLORS, **common)
        write_ome_zarr(out / "analysed.ome.zarr", analysed, kind="labels",
                       name="analysed cells", colors={1: (128, 128, 128, 255),
                                                      2: (255, 0, 255, 255)}, **common)
        write_lesions_geojson(out / "lesions.geojson", pred.lesions, overwrite=True)
        thumb_done.result()
    write_json_atomic(out / SUMMARY, _jsonable(pred.summary()), overwrite=True)


def prepare_output(out_dir: str | Path, *, overwrite: bool = False,
                   inputs: tuple[str | Path, ...] = ()) -> tuple[Path, bool]:
    """Decide what to do with ``out_dir`` before a run.

    * missing or empty: use it;
    * a complete result (``summary.json``): refuse unless ``overwrite``;
    * an unfinished run (``.partial``): resume it (the checkpoint decides whether the
      parameters match; see :func:`predict_to_folder_job`);
    * anything else: refuse unless ``overwrite`` (it is not ours).

    Returns
    -------
    (path, has_partial)
    """
    from ..io.atomic import check_inputs, is_replaceable

    out = Path(out_dir)
    check_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return out, False
    if (out / SUMMARY).exists() or not (out / PARTIAL).is_dir():
        if not overwrite:
            raise OutputExistsError(out)
        if not is_replaceable(out):
            raise InputError(f"{out}: --overwrite replaces only result folders napari-lnmeta "
                             "wrote; this folder holds other files (choose another output)")
    # an unfinished run (also a killed --overwrite re-run beside the old result) resumes
    return out, (out / PARTIAL).is_dir()


def predict_to_folder_job(slide: Slide | str | Path, out_dir: str | Path,
                      config: InferenceConfig | None = None, *, overwrite: bool = False,
                      truth: Any = None, truth_scale: float = 1.0,
                      model: tuple[nn.Module, ModelMeta] | None = None,
                      mpp: float | None = None) -> Job[Prediction]:
    """Run inference on a slide and write the result folder, resumably.

    Parameters
    ----------
    slide
        An open slide or its path.
    out_dir
        Result folder (see module docstring).
    config
        Run parameters.
    overwrite
        Replace an existing complete result (or a foreign folder, or an unfinished run
        with other parameters).
    truth
        Optional tumour ground truth for the evaluation in ``summary.json``.
    truth_scale
        Slide pixels per file pixel of a polygon ``truth`` file.
    model
        In-memory ``(network, ModelMeta)`` instead of ``config.model``.
    mpp
        Level-0 µm/px when opening ``slide`` from a path.

    Raises
    ------
    OutputExistsError
        ``out_dir`` holds a complete result or a foreign folder and ``overwrite`` is false.
    InputError
        ``out_dir`` holds an unfinished run with other parameters and ``overwrite`` is
        false.
    """
    from ..io.slide import open_slide

    if not hasattr(slide, "read_region"):
        slide = open_slide(slide, mpp=mpp)
    from ..io.atomic import check_inputs, output_lock

    cfg = config or InferenceConfig()
    if truth is not None:  # a bad ground truth fails now, not after the whole inference
        from .evaluation import check_truth

        check_truth(truth, slide_shape=tuple(slide.level_shapes[0]), slide_mpp=slide.mpp,
                    scale=truth_scale)
    check_inputs(out_dir, (slide.path,))
    with output_lock(out_dir):  # one writer per result folder, checkpoint included
        out, has_partial = prepare_output(out_dir, overwrite=overwrite, inputs=(slide.path,))
        ckdir = out / PARTIAL
        result = yield from run_inference_job(
            slide, cfg, model=model, checkpoint_dir=ckdir,
            on_mismatch="error" if has_partial and not overwrite else "restart")
        t0 = time.perf_counter()
        yield Progress(result.timing["patches"], result.timing["patches"], "writing results")
        pred = postprocess(result, truth=truth, truth_scale=truth_scale)
        result.timing["postprocess_s"] = time.perf_counter() - t0
        write_prediction(pred, out, overwrite=True, slide=slide)  # the checkpoint goes too
    return pred
