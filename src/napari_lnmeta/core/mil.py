"""Slide-level MIL inference: class probabilities and an attention heatmap for one slide.

Steps (seed 002, Figure 2c; seed 003):

1. the slide's patch features, from a feature cache or extracted now with the backbone
   the MIL model was trained on (same patch size, µm/px and tissue/entropy settings,
   stored in the model file); features from another backbone are refused;
2. ``M`` random bags of ``N`` patches; the slide's class probabilities are the mean of
   the bags' probabilities;
3. an attention value for **every** patch: the attention network scores all patches of
   the slide at once (an instance's score does not depend on its bag), the scores are
   turned into softmax weights over the whole slide and divided by the largest, so the
   heatmap is in (0, 1] with 1 at the most attended patch ("relative attention").

Outputs (:meth:`MILResult.write`): ``attention.ome.zarr``, a float32 heatmap with one cell
per grid stride on :meth:`PatchGrid.frame` (cells without a patch are 0), and
``summary.json`` with the class probabilities, the per-bag spread, the top-attended
patches (level-0 coordinates) and provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, ModelError, OutputExistsError
from ..io import jsonio
from ..progress import Job, Progress
from .tiling import PatchGrid

if TYPE_CHECKING:
    from ..io.frame import SlideFrame
    from ..io.slide import Slide
    from ..models.extractor import BackboneInfo
    from ..models.mil import MILInfo, MILModel
    from .features import FeatureCache

ATTENTION_NAME = "attention.ome.zarr"
SUMMARY_NAME = "summary.json"


@dataclass
class MILInferenceConfig:
    """Settings of one slide-level prediction (one object from widget/CLI to core).

    Parameters
    ----------
    bags
        ``M``: random bags whose probabilities are averaged.
    bag_size
        ``N``: patches per bag; ``None``: the size the model was trained with.
    replace
        Sample with replacement (only then may a slide have fewer than ``N`` patches).
    seed
        Seed of the bag draws (fixed: the same slide gives the same numbers).
    device, batch_size, amp
        Feature extraction and MIL on ``device`` (``"auto"``: CUDA when available).
    top_k
        Top-attended patches listed in the summary (and shown by the widget).
    cache_dir
        Where feature caches go (reused across runs); ``None``: ``<out_dir>/features``,
        or the user cache folder when there is no output folder.
    """

    bags: int = 32
    bag_size: int | None = None
    replace: bool = False
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    amp: bool = False
    top_k: int = 16
    cache_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MILResult:
    """The prediction for one slide (see module docstring)."""

    slide: str
    classes: list[str]
    probabilities: np.ndarray
    bag_probabilities: np.ndarray
    attention: np.ndarray
    attention_logits: np.ndarray
    grid: PatchGrid
    instances: np.ndarray
    backbone: str
    bag_size: int
    slide_path: str | None = None
    model_path: str | None = None
    features_path: str | None = None
    clinical: dict[str, Any] | None = None
    clinical_used: bool = False
    pooling: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    @property
    def frame(self) -> SlideFrame:
        return self.grid.frame()

    @property
    def patch_attention(self) -> np.ndarray:
        """Relative attention for every patch of :attr:`grid` (0 where not an instance)."""
        out = np.zeros(len(self.grid), dtype=np.float32)
        out[self.instances] = self.attention
        return out

    @property
    def heatmap(self) -> np.ndarray:
        """``grid_shape`` float32 attention map (0 off tissue / outside the instances)."""
        return self.grid.to_heatmap(self.patch_attention, fill=0.0).astype(np.float32)

    def top(self, k: int = 16) -> np.ndarray:
        """Indices into :attr:`grid` of the ``k`` most attended patches, highest first."""
        order = np.argsort(-self.attention, kind="stable")[:max(0, int(k))]
        return self.instances[order]

    def summary(self, top_k: int = 16) -> dict[str, Any]:
        g = self.grid
        top = [{"row": int(g.coords[i, 0]), "col": int(g.coords[i, 1]),
                "grid_row": int(g.index[i, 0]), "grid_col": int(g.index[i, 1]),
                "attention": float(self.patch_attention[i])} for i in self.top(top_k)]
        return {"slide": self.slide, "slide_path": self.slide_path,
                "model": self.model_path, "pooling": self.pooling,
                "classes": list(self.classes),
                "probabilities": {c: float(p) for c, p in zip(self.classes, self.probabilities,
                                                              strict=True)},
                "predicted": self.predicted,
                "bags": int(len(self.bag_probabilities)), "bag_size": int(self.bag_size),
                "bag_probability_sd": {c: float(s) for c, s in zip(
                    self.classes, self.bag_probabilities.std(axis=0), strict=True)},
                "n_patches": int(len(self.grid)), "n_instances": int(len(self.instances)),
                "patch_size": g.patch_size, "patch_mpp": g.mpp, "level": g.level,
                "backbone": self.backbone, "features": self.features_path,
                "clinical": self.clinical, "clinical_used": self.clinical_used,
                "attention": "softmax over all instances of the slide / its maximum",
                "top_patches": top, **self.extra}

    def write(self, out_dir: str | Path, *, overwrite: bool = False,
              inputs: tuple[str | Path, ...] = (), top_k: int = 16) -> dict[str, Path]:
        """Write ``attention.ome.zarr`` and ``summary.json`` into ``out_dir`` (atomically)."""
        from ..io.atomic import check_output, write_text_atomic
        from ..io.omezarr import write_ome_zarr

        out = Path(out_dir)
        att, summ = out / ATTENTION_NAME, out / SUMMARY_NAME
        for p in (att, summ):
            check_output(p, overwrite=overwrite, inputs=inputs)
        out.mkdir(parents=True, exist_ok=True)
        write_ome_zarr(att, self.heatmap, frame=self.frame, kind="image", name="attention",
                       overwrite=overwrite, inputs=inputs,
                       attrs={"mil": {"classes": list(self.classes),
                                      "probabilities": [float(p) for p in self.probabilities],
                                      "backbone": self.backbone,
                                      "grid": self.grid.meta(),
                                      "values": "relative attention (max 1), 0 = no patch"}})
        write_text_atomic(summ, jsonio.dumps(_jsonable(self.summary(top_k)), indent=1),
                          overwrite=overwrite)
        return {"attention": att, "summary": summ}


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


# --------------------------------------------------------------------------------------
# Reproducing the training features
# --------------------------------------------------------------------------------------
def extractor_for(backbone: BackboneInfo, *, device: Any = "cpu"):
    """Rebuild the feature extractor a MIL model was trained on, or say why not."""
    from ..models.backbones import is_named
    from ..models.extractor import load_extractor

    w = backbone.weights
    if w.startswith("random-seed"):
        seed = int(w[len("random-seed"):].split("-")[0])
        ext = load_extractor(backbone.name, seed=seed, patch_size=backbone.patch_size,
                             device=device)
    elif backbone.source and is_named(backbone.source):  # a cached pretrained backbone
        ext = load_extractor(backbone.source, patch_size=backbone.patch_size, device=device)
    else:
        src = backbone.source
        if not src or not Path(src).is_file():
            raise ModelError(src or backbone.name,
                             f"the backbone weights of this MIL model ({backbone.id}) are not "
                             "available here; extract the slide's features with that backbone "
                             "(lnmeta extract-features) and pass them with --features")
        from ..models.io import read_header

        md = read_header(src).get("__metadata__") or {}
        if "lnmeta" in md:
            ext = load_extractor(src, patch_size=backbone.patch_size, device=device)
        else:
            ext = load_extractor(backbone.name, init=src, patch_size=backbone.patch_size,
                                 device=device)
    if ext[1].id != backbone.id:
        raise ModelError(backbone.source or backbone.name,
                         f"rebuilt backbone is {ext[1].id!r}, the MIL model expects "
                         f"{backbone.id!r} (weights file changed, or another torch version "
                         "initialises randomly differently); extract features with the "
                         "original backbone and pass --features")
    return ext


def feature_config_for(info: MILInfo, config: MILInferenceConfig) -> Any:
    """The :class:`~napari_lnmeta.core.features.FeatureConfig` the model was trained with."""
    from .features import FeatureConfig

    f = dict(info.features or {})
    if "mpp" in f and "patch_mpp" not in f:  # models saved before the key was patch_mpp
        f["patch_mpp"] = f.pop("mpp")
    known = {k: f[k] for k in ("stride", "patch_mpp", "level", "min_tissue", "entropy_min",
                               "tissue_mpp", "dtype", "chunk") if k in f}
    return FeatureConfig(backbone=info.backbone.name, patch_size=info.backbone.patch_size,
                         batch_size=config.batch_size, device=config.device, amp=config.amp,
                         **known)


def default_cache_dir() -> Path:
    """``$LNMETA_CACHE/features`` or ``~/.cache/napari-lnmeta/features``."""
    import os

    base = os.environ.get("LNMETA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "napari-lnmeta") / "features"


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------
def predict_slide_job(slide: Slide, model: str | Path | tuple[MILModel, MILInfo], *,
                      config: MILInferenceConfig | None = None,
                      clinical: dict[str, Any] | None = None,
                      features: FeatureCache | str | Path | None = None,
                      regions: str | Path | None = None, region_scale: float = 1.0,
                      out_dir: str | Path | None = None, overwrite: bool = False,
                      clinical_source: str = "clinical data") -> Job[MILResult]:
    """Predict one slide with a MIL model (progress generator returning :class:`MILResult`).

    Parameters
    ----------
    slide
        The open slide.
    model
        A MIL model file, or ``(model, info)`` from :func:`napari_lnmeta.models.mil.load_mil`.
    config
        Bags, device, cache folder...
    clinical
        The slide's clinical values (column -> value) when the model fuses clinical data.
    clinical_source
        Where they came from (a CSV path), for error messages.
    features
        A feature cache of this slide (skips extraction); must come from the model's backbone.
    regions
        Restrict instances to annotated regions (seed 002 models); ``None``: all patches.
    out_dir
        Write ``attention.ome.zarr`` and ``summary.json`` here.
    """
    import contextlib

    from ..io.atomic import output_lock

    lock = output_lock(out_dir) if out_dir is not None else contextlib.nullcontext()
    with lock:  # one writer per output
        return (yield from _predict_slide_job_locked(
            slide, model, config, clinical, features, regions, region_scale, out_dir,
            overwrite, clinical_source))


def _predict_slide_job_locked(slide, model, config, clinical, features, regions, region_scale,
                              out_dir, overwrite, clinical_source) -> Job[MILResult]:
    """:func:`predict_slide_job`'s body, run while its output is locked."""
    import torch

    from ..models.io import resolve_device
    from ..models.mil import bag_probabilities, load_mil, relative_attention, small_model_threads
    from .bags import BagSpec, sample_bags, select_instances
    from .features import FeatureCache, slide_features_job

    config = config or MILInferenceConfig()
    inputs = (str(slide.path),)
    if out_dir is not None and not overwrite:
        for name in (ATTENTION_NAME, SUMMARY_NAME):
            if (Path(out_dir) / name).exists():
                raise OutputExistsError(Path(out_dir) / name)
    dev = resolve_device(config.device)
    if isinstance(model, (str, Path)):
        model_path: str | None = str(model)
        net, info = load_mil(model, device=dev)
    else:
        net, info = model
        model_path = info.path
        net.to(dev).eval()

    clin_vec = None
    if info.clinical is not None:
        if clinical is None:
            raise InputError(f"{Path(model_path).name if model_path else 'the MIL model'} fuses "
                             f"clinical data: give the slide's values for "
                             f"{', '.join(info.clinical.columns)} (--clinical CSV)")
        clin_vec = info.clinical.transform(clinical, name=slide.name, source=clinical_source)

    # 1. features
    if features is not None:
        cache = features if isinstance(features, FeatureCache) else FeatureCache(features)
        yield Progress(1, 1, "features given")
    else:
        fcfg = feature_config_for(info, config)
        cache_dir = Path(config.cache_dir) if config.cache_dir else (
            Path(out_dir) / "features" if out_dir is not None else default_cache_dir())
        ext = extractor_for(info.backbone, device="cpu")
        cache = yield from slide_features_job(slide, fcfg, cache_dir=cache_dir, extractor=ext,
                                              regions=None)
    info.check_features(cache)
    grid = cache.grid
    if grid.slide != slide.name or tuple(grid.slide_shape) != tuple(slide.shape):
        raise InputError(f"{cache.path}: features of slide {grid.slide!r} "
                         f"({grid.slide_shape[0]}x{grid.slide_shape[1]}), not of {slide.name!r} "
                         f"({slide.shape[0]}x{slide.shape[1]})")
    inst = select_instances(grid, regions=regions, region_scale=region_scale)
    feats = cache.load(inst) if len(inst) < len(grid) else cache.load()

    # 2. bags -> slide probability
    spec = BagSpec(size=config.bag_size or info.bag_size, per_slide=config.bags,
                   replace=config.replace, seed=config.seed)
    idx = sample_bags(len(inst), spec, np.random.default_rng(config.seed), slide=slide.name)
    yield Progress(0, 2, "MIL: bags")
    with small_model_threads(dev):  # the MIL model is small: few threads are faster
        probs, _ = bag_probabilities(net, feats[idx], clin_vec, device=dev)
    # 3. attention for every instance
    yield Progress(1, 2, "MIL: attention")
    with small_model_threads(dev), torch.inference_mode():
        logits = net.instance_logits(torch.from_numpy(feats).to(dev)).float().cpu().numpy()
    result = MILResult(slide=slide.name, classes=list(info.classes),
                       probabilities=probs.mean(axis=0), bag_probabilities=probs,
                       attention=relative_attention(logits), attention_logits=logits,
                       grid=grid, instances=inst, backbone=info.backbone.id,
                       bag_size=spec.size, slide_path=str(slide.path), model_path=model_path,
                       features_path=str(cache.path), clinical=None if clinical is None
                       else {k: clinical[k] for k in (info.clinical.columns if info.clinical
                                                       else clinical)},
                       clinical_used=clin_vec is not None, pooling=info.config.pooling,
                       extra={"regions": None if regions is None else str(regions),
                              "seed": config.seed,
                              "features_standardised": info.standardised,
                              "notes": list(info.notes)})
    if out_dir is not None:
        result.write(out_dir, overwrite=overwrite, inputs=inputs, top_k=config.top_k)
    yield Progress(2, 2, f"MIL: {result.predicted} "
                         f"({float(result.probabilities.max()):.2f})")
    return result



def predict_slides_job(slides: Sequence[Slide], model: str | Path | tuple[MILModel, MILInfo], *,
                       config: MILInferenceConfig | None = None,
                       clinical: Sequence[dict[str, Any] | None] | None = None,
                       out_dir: str | Path | None = None, overwrite: bool = False,
                       names: Sequence[str] | None = None,
                       ) -> Job[list[tuple[MILResult, np.ndarray]]]:
    """Predict several slides with one MIL model, one after the other (progress generator).

    Each slide is :func:`predict_slide_job` (with ``clinical[k]``), written to
    ``out_dir/<slide stem>.mil`` when ``out_dir`` is given; progress messages are prefixed
    ``[k/n] name`` (``names``: the slides' names by default). Returns, per slide, the
    result and its ``config.top_k`` most attended patches (RGB, as
    :func:`~napari_lnmeta.core.tiling.read_patches` reads them), highest first.
    """
    from ..progress import relay
    from .tiling import read_patches

    config = config or MILInferenceConfig()
    slides = list(slides)
    clinical = list(clinical) if clinical is not None else [None] * len(slides)
    names = list(names) if names is not None else [s.name for s in slides]
    if not (len(clinical) == len(names) == len(slides)):
        raise ValueError("slides, clinical and names must have the same length")
    done: list[tuple[MILResult, np.ndarray]] = []
    for k, (slide, clin, name) in enumerate(zip(slides, clinical, names, strict=True)):
        sub = None if out_dir is None else Path(out_dir) / f"{slide.path.name.split('.')[0]}.mil"
        gen = predict_slide_job(slide, model, config=config, clinical=clin, out_dir=sub,
                                overwrite=overwrite)
        res = yield from relay(gen, lambda p, k=k, name=name: Progress(
            p.done, p.total, f"[{k + 1}/{len(slides)}] {name}: {p.message}"))
        done.append((res, read_patches(slide, res.grid, res.top(config.top_k))))
    return done


__all__ = ["ATTENTION_NAME", "SUMMARY_NAME", "MILInferenceConfig", "MILResult",
           "default_cache_dir", "extractor_for", "feature_config_for", "predict_slide_job",
           "predict_slides_job"]
