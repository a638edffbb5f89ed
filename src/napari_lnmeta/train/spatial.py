"""Training the seed-004 spatial-context model: neighbourhood sets, the sampler, the loop.

A :class:`NeighbourhoodSet` is a patch set (:class:`~napari_lnmeta.train.datasets.PatchSet`,
built from slides + masks / polygons by the same code and labelling rule as ``lnmeta
make-patches``) whose every patch comes with its ``k x k`` neighbourhood: the pixels are
read as one ``(k·p) x (k·p)`` window centred on the patch, and every cell of the window
gets its own label by the same rule (tumour share > ``positive_min`` → tumour, ≤
``negative_max`` → normal, in between → ``-1``, left out of both losses).

:class:`ClassSlideSampler` is seed 004's sampling: pick "normal" or "tumour" with equal
probability, then a slide that has patches of that class uniformly at random, then one
of its patches of that class uniformly at random (with replacement). Slides with many
patches are therefore not favoured over slides with few.

:func:`train_spatial_job` (a progress generator, like :func:`~napari_lnmeta.train.loop.train_job`)
trains :class:`~napari_lnmeta.models.spatial.SpatialContextModel` with
``L_CE + β L_spatial``; the window and its label grid go through the same dihedral
transform, so augmented labels stay under their cells. Output folder: ``last.safetensors``,
``best.safetensors`` (by ``monitor``), ``log.csv``, ``config.json``; all written atomically.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.inference import model_preprocess
from ..errors import InputError
from ..io import jsonio
from ..io.atomic import write_text_atomic
from ..models.io import ModelMeta, logits_to_probs, resolve_device, save_model
from ..models.registry import count_parameters, set_train_mode
from ..models.spatial import (
    SpatialConfig,
    SpatialContextModel,
    spatial_meta,
    spatial_objective,
    window_offset,
)
from ..progress import Job, Progress, relay
from ._epochs import Monitor, close_epoch, epoch_row, optimiser_step, step_progress
from .datasets import (
    PatchConfig,
    PatchSet,
    class_values,
    fractions_of,
    patches_from_slide_job,
    region_masks,
)
from .loop import (
    TrainConfig,
    TrainResult,
    dataset_stats,
    finish_run,
    make_optimizer,
    make_scheduler,
    seed_everything,
    val_metrics,
)
from .options import SPATIAL_AUGMENTS as AUGMENTS
from .options import augment_name


# --------------------------------------------------------------------------------------
# Neighbourhood sets
# --------------------------------------------------------------------------------------
@dataclass
class NeighbourhoodSet:
    """Patches with their ``k x k`` neighbourhoods (see module docstring).

    Attributes
    ----------
    windows
        A :class:`PatchSet` of the ``(k·p) x (k·p)`` windows: ``coords`` are the windows'
        top-left corners, ``labels`` the centre patches' classes.
    grid_labels
        ``(N, k, k)`` int64 class of every cell (``-1``: neither class by the rule).
    k
        Neighbourhood side in patches.
    """

    windows: PatchSet
    grid_labels: np.ndarray
    k: int

    def __post_init__(self) -> None:
        self.grid_labels = np.asarray(self.grid_labels, dtype=np.int64).reshape(
            -1, self.k, self.k)
        if len(self.grid_labels) != len(self.windows):
            raise ValueError("grid_labels and windows differ in length")

    def __len__(self) -> int:
        return len(self.windows)

    def __repr__(self) -> str:
        counts = dict(zip(self.classes, self.windows.counts().tolist(), strict=True))
        return (f"<NeighbourhoodSet {len(self)} patches {counts}, {self.k}x{self.k} "
                f"neighbourhoods of {self.cell_size} px, {len(self.windows.slides)} slide(s)>")

    @property
    def classes(self) -> list[str]:
        return self.windows.classes

    @property
    def labels(self) -> np.ndarray:
        """Class of each centre patch."""
        return self.windows.labels

    @property
    def slide_index(self) -> np.ndarray:
        return self.windows.slide_index

    @property
    def cell_size(self) -> int:
        """Patch (cell) side in read pixels."""
        return self.windows.patch_size // self.k

    @property
    def read_mpp(self) -> float | None:
        return self.windows.read_mpp

    def slide_names(self) -> list[str]:
        return self.windows.slide_names()

    def offset0(self) -> np.ndarray:
        """Per-patch level-0 offset from the window corner to the centre patch corner."""
        size0 = np.array([self.cell_size * e.downsample for e in self.windows.slides])
        off = np.array([window_offset(s, self.k) for s in size0], dtype=np.int64)
        return off[self.windows.slide_index] if len(self) else np.zeros(0, np.int64)

    def subset(self, idx) -> NeighbourhoodSet:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return NeighbourhoodSet(self.windows.subset(idx), self.grid_labels[idx], self.k)

    def centres(self) -> PatchSet:
        """The centre patches alone (``p`` px), e.g. for a plain-CNN baseline on the same patches."""
        slides = [replace(e, patch_size=self.cell_size) for e in self.windows.slides]
        off = self.offset0()[:, None]
        w = self.windows
        return PatchSet(slides, w.slide_index, w.coords + off, w.labels, w.fractions,
                        w.classes, w.meta)

    def read(self, idx) -> np.ndarray:
        """Windows ``idx`` as ``(B, k·p, k·p, 3)`` uint8."""
        return self.windows.read(idx)

    def load_pixels(self, *, workers: int = 2) -> np.ndarray:
        """Read every window into memory once (``N · (k·p)² · 3`` bytes)."""
        return self.windows.load_pixels(workers=workers)

    def load_pixels_job(self, *, workers: int = 2) -> Job[np.ndarray]:
        return self.windows.load_pixels_job(workers=workers)


def label_cells(lm, config: PatchConfig, coords: np.ndarray, size0: float) -> np.ndarray:
    """Class of the level-0 boxes ``coords`` (side ``size0``) by the patch-set rule.

    The same rule as :func:`~napari_lnmeta.train.datasets.patches_from_slide_job`:
    the class covering the largest share when above ``positive_min``; normal when all
    positive classes cover at most ``negative_max`` (and, with ``negatives="annotated"``,
    the box lies in regions labelled normal); ``-1`` otherwise.
    """
    pos_values, neg_values = class_values(lm, config)
    fr = np.stack([fractions_of(lm, pos_values[c], coords, size0)
                   for c in range(1, len(config.classes))], axis=1)
    total = fr.sum(axis=1)
    label = np.full(len(coords), -1, dtype=np.int64)
    best = fr.argmax(axis=1) + 1
    best_frac = fr.max(axis=1)
    pos = best_frac > config.positive_min
    label[pos] = best[pos]
    neg = total <= config.negative_max + 1e-9
    if config.negatives == "annotated":
        neg &= fractions_of(lm, neg_values, coords, size0) >= config.min_tissue
    label[neg & (label < 0)] = 0
    return label


def neighbourhoods_from_slide_job(slide, labels, config: PatchConfig, *, k: int = 3,
                                  source: str = "default", label_scale: float = 1.0,
                                  mpp: float | None = None, tissue=None,
                                  rng: np.random.Generator | None = None
                                  ) -> Job[NeighbourhoodSet]:
    """The patches of one slide (as ``lnmeta make-patches`` cuts them) with neighbourhoods.

    Parameters are those of :func:`~napari_lnmeta.train.datasets.patches_from_slide_job`,
    plus ``k`` (odd). Centre patches must pass the tissue filter; neighbour cells need
    not (glass around a node is "normal" context).
    """
    from ..io.annotations import load_labels
    from ..io.slide import open_slide

    SpatialConfig(k=k)  # validates k
    sl = open_slide(slide, mpp=mpp) if isinstance(slide, (str, Path)) else slide
    lm = load_labels(labels, slide_shape=sl.shape, slide_mpp=sl.mpp, slide=sl.name,
                     scale=label_scale)
    ps: PatchSet = yield from patches_from_slide_job(sl, lm, config, source=source, mpp=mpp,
                                                     tissue=tissue, rng=rng)
    e = ps.slides[0]
    size0 = e.patch_size * e.downsample
    off = window_offset(size0, k)
    d = np.arange(k) - k // 2
    cells = np.empty((len(ps), k, k), dtype=np.int64)
    for i, di in enumerate(d):
        for j, dj in enumerate(d):
            shift = np.array([di, dj], dtype=np.float64) * size0
            cells[:, i, j] = label_cells(lm, config, np.floor(ps.coords + shift).astype(np.int64),
                                         size0)
    cells[:, k // 2, k // 2] = ps.labels  # the patch set's own labels are authoritative
    windows = PatchSet([replace(e, patch_size=e.patch_size * k)], ps.slide_index,
                       ps.coords - off, ps.labels, ps.fractions, ps.classes,
                       meta={**ps.meta, "neighbourhood": {"k": k, "cell_size": e.patch_size}})
    yield Progress(4, 4, f"{sl.name}: {len(ps)} neighbourhoods")
    return NeighbourhoodSet(windows, cells, k)


def build_neighbourhoods_job(items, config: PatchConfig, *, k: int = 3,
                             sources=None, label_scales=None, mpps=None
                             ) -> Job[NeighbourhoodSet]:
    """Neighbourhood sets of several ``(slide, labels)`` pairs, joined (progress generator)."""
    if not items:
        raise InputError("no slides given")
    rng = np.random.default_rng(config.seed)
    windows, grids = [], []
    n = len(items)
    for i, (slide, labels) in enumerate(items):
        job = neighbourhoods_from_slide_job(
            slide, labels, config, k=k, source=(sources[i] if sources else "default"),
            label_scale=(label_scales[i] if label_scales else 1.0),
            mpp=(mpps[i] if mpps else None), rng=rng)
        got = yield from relay(job, lambda p, i=i: Progress(i * 4 + min(p.done, 4), n * 4,
                                                            p.message))
        windows.append(got.windows)
        grids.append(got.grid_labels)
    return NeighbourhoodSet(PatchSet.concat(windows), np.concatenate(grids), k)


def build_neighbourhoods(items, config: PatchConfig, **kw) -> NeighbourhoodSet:
    """:func:`build_neighbourhoods_job`, run to completion."""
    from ..progress import run

    return run(build_neighbourhoods_job(items, config, **kw))


def split_neighbourhoods(ns: NeighbourhoodSet, *, region=None, region_slide: str | None = None,
                         margin: float = 0.0, test_slides=None, test_fraction: float | None = None,
                         seed: int = 0) -> tuple[NeighbourhoodSet, NeighbourhoodSet | None]:
    """Train / test split by a level-0 region or by slides, on whole windows.

    With ``region = (row0, col0, row1, col1)``, test windows lie entirely inside it and
    training windows entirely outside it grown by ``margin``; windows across the border
    are dropped, so no pixel a training window reads is in a test window (the same rule
    as :func:`~napari_lnmeta.train.datasets.split_by_region`, applied to the windows).
    """
    w = ns.windows
    if region is not None:
        if test_slides is not None or test_fraction is not None:
            raise InputError("choose a hold-out region or held-out slides, not both")
        outside, inside = region_masks(w, region, slide=region_slide, margin=margin,
                                       what="neighbourhood set")
        return ns.subset(outside), ns.subset(inside)
    names = ns.slide_names()
    if test_slides is None and test_fraction is None:
        return ns, None
    if test_slides is None:
        if len(names) < 2:
            raise InputError("a split by slide needs at least 2 slides; hold out a region "
                             "(--holdout-region) of a single slide")
        rng = np.random.default_rng(seed)
        kk = min(len(names) - 1, max(1, int(round(float(test_fraction) * len(names)))))
        test_idx = set(rng.choice(len(names), kk, replace=False).tolist())
    else:
        wanted = {Path(t).name for t in test_slides}
        test_idx = {i for i, e in enumerate(w.slides)
                    if e.name in wanted or e.path in {str(t) for t in test_slides}}
        unknown = wanted - {w.slides[i].name for i in test_idx}
        if unknown:
            raise InputError(f"held-out slides not in the neighbourhood set: {sorted(unknown)}")
    is_test = np.isin(w.slide_index, sorted(test_idx))
    return ns.subset(~is_test), ns.subset(is_test)


# --------------------------------------------------------------------------------------
# The seed-004 sampler
# --------------------------------------------------------------------------------------
class ClassSlideSampler:
    """Class uniformly, then a slide that has it uniformly, then one of its patches (seed 004).

    Parameters
    ----------
    labels, slide_index
        Class and slide of every patch (``-1`` labels are never drawn).
    """

    def __init__(self, labels, slide_index):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        slide_index = np.asarray(slide_index, dtype=np.int64).reshape(-1)
        if len(labels) != len(slide_index):
            raise ValueError("labels and slide_index differ in length")
        self.classes = sorted(int(c) for c in np.unique(labels) if c >= 0)
        if not self.classes:
            raise InputError("no labelled patches to sample from")
        self.slides_of: dict[int, np.ndarray] = {}
        self.members: dict[tuple[int, int], np.ndarray] = {}
        for c in self.classes:
            in_c = labels == c
            sl = np.unique(slide_index[in_c])
            self.slides_of[c] = sl
            for s in sl:
                self.members[(c, int(s))] = np.flatnonzero(in_c & (slide_index == s))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` patch indices drawn independently (with replacement)."""
        cls = np.asarray(self.classes)[rng.integers(0, len(self.classes), int(n))]
        out = np.empty(int(n), dtype=np.int64)
        for c in self.classes:
            pos = np.flatnonzero(cls == c)
            if not len(pos):
                continue
            slides = self.slides_of[c]
            pick = slides[rng.integers(0, len(slides), len(pos))]
            for s in np.unique(pick):
                at = pos[pick == s]
                m = self.members[(c, int(s))]
                out[at] = m[rng.integers(0, len(m), len(at))]
        return out


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclass
class SpatialTrainConfig:
    """A spatial-context training run (saved in ``config.json`` and the model file).

    Attributes
    ----------
    spatial
        Backbone, neighbourhood ``k`` and LSTM size (:class:`SpatialConfig`).
    beta
        Weight of the spatial loss (seed 004: cross-validated; 0 gives CNN + LSTM with
        cross-entropy only, the seed's ablation).
    ce_cells
        Cross-entropy over ``"all"`` labelled cells of a neighbourhood or the ``"centre"``.
    head
        ``"softmax"`` (two logits, cross-entropy) or ``"sigmoid"`` (one logit, BCE).
    epochs, epoch_size, batch_size
        Neighbourhoods drawn per epoch by the seed-004 sampler (default: the set size).
    optimizer, lr, weight_decay, momentum, scheduler, max_lr, t0, t_mult
        As :class:`~napari_lnmeta.train.loop.TrainConfig` (seed 004: ``rmsprop``,
        ``lr=0.01``, ``momentum=0.9``).
    augment
        ``none`` | ``flips`` (the 8 dihedral transforms of the whole window and its label
        grid) | ``dihedral-jitter`` (flips + colour jitter of seed 004 per window).
    normalise
        ``"dataset"`` (mean / std of the training windows) or ``"imagenet"``.
    init, freeze
        Backbone initialisation file and frozen stages.
    monitor, early_stopping, val_every
        Best-model selection and early stopping (``val_loss``/``val_auc``... on the
        centre patches of the validation set; ``train_loss`` without one).
    seed, device, amp, workers, max_steps
        As in :class:`~napari_lnmeta.train.loop.TrainConfig`.
    """

    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    beta: float = 1.0
    ce_cells: str = "all"
    head: str = "softmax"
    epochs: int = 10
    epoch_size: int | None = None
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    max_lr: float | None = None
    t0: int = 5
    t_mult: int = 1
    augment: str = "flips"
    normalise: str = "dataset"
    init: str | None = None
    freeze: int = 0
    monitor: str = "val_loss"
    early_stopping: int | None = None
    val_every: int = 1
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.spatial, dict):
            self.spatial = SpatialConfig.from_json(self.spatial)
        self.augment = augment_name(self.augment)
        if self.augment not in AUGMENTS:
            raise InputError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.ce_cells not in ("all", "centre"):
            raise InputError(f"ce_cells must be 'all' or 'centre', got {self.ce_cells!r}")
        if self.beta < 0:
            raise InputError(f"beta must be >= 0, got {self.beta}")
        self.as_train_config()  # validates optimiser, scheduler, head, monitor...

    def as_train_config(self) -> TrainConfig:
        """The equivalent :class:`TrainConfig` (optimiser and scheduler factories use it)."""
        return TrainConfig(architecture=self.spatial.backbone, head=self.head,
                           epochs=self.epochs, batch_size=self.batch_size,
                           optimizer=self.optimizer, lr=self.lr,
                           weight_decay=self.weight_decay, momentum=self.momentum,
                           scheduler=self.scheduler, max_lr=self.max_lr, t0=self.t0,
                           t_mult=self.t_mult, monitor=self.monitor, normalise=self.normalise,
                           seed=self.seed, device=self.device)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["spatial"] = self.spatial.to_json()
        return d


def dihedral_windows(x: torch.Tensor, grid: torch.Tensor, codes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply dihedral transform ``codes[i]`` (0–7) to window ``x[i]`` and its label grid.

    Code ``c``: ``c % 4`` quarter turns, then a left-right flip when ``c >= 4`` (the
    engine's TTA order, :func:`napari_lnmeta.core.inference.dihedral`). ``x`` is
    ``(B, 3, H, W)``, ``grid`` ``(B, k, k)``.
    """
    xo, go = x.clone(), grid.clone()
    for code in codes.unique().tolist():
        if code == 0:
            continue
        idx = (codes == code).nonzero().flatten()
        xs, gs = x.index_select(0, idx), grid.index_select(0, idx)
        xs, gs = torch.rot90(xs, code % 4, dims=(-2, -1)), torch.rot90(gs, code % 4, dims=(-2, -1))
        if code >= 4:
            xs, gs = torch.flip(xs, dims=(-1,)), torch.flip(gs, dims=(-1,))
        xo.index_copy_(0, idx, xs)
        go.index_copy_(0, idx, gs)
    return xo, go


def _batches(ns: NeighbourhoodSet, chunks: list[np.ndarray], workers: int, prefetch: int = 3):
    """``(windows uint8, grid labels)`` of each chunk, read ahead in threads."""
    if ns.windows._pixels is not None or workers <= 1:
        for c in chunks:
            yield c, ns.read(c), ns.grid_labels[c]
        return
    with ThreadPoolExecutor(workers) as ex:
        futs = [ex.submit(ns.read, c) for c in chunks[:prefetch]]
        nxt = len(futs)
        try:
            for i, c in enumerate(chunks):
                arr = futs[i].result()
                if nxt < len(chunks):
                    futs.append(ex.submit(ns.read, chunks[nxt]))
                    nxt += 1
                futs[i] = None
                yield c, arr, ns.grid_labels[c]
        finally:
            for f in futs:
                if f is not None:
                    f.cancel()


def predict_neighbourhoods_job(model: SpatialContextModel, ns: NeighbourhoodSet, meta: ModelMeta,
                               *, device, batch_size: int = 128, workers: int = 2,
                               tta: bool = False, message: str = "predicting"
                               ) -> Job[np.ndarray]:
    """Class probabilities ``(N, C)`` of every centre patch of ``ns`` (in order).

    ``tta`` averages the 8 dihedral transforms of each window, like the inference
    engine's ``--tta``.
    """
    from ..core.inference import dihedral

    dev = torch.device(device)
    prep = model_preprocess(meta, dev)
    out = np.empty((len(ns), len(meta.classes)), dtype=np.float32)
    chunks = [np.arange(i, min(i + batch_size, len(ns))) for i in range(0, len(ns), batch_size)]
    was = model.training
    model.eval()
    try:
        for b, (c, x, _) in enumerate(_batches(ns, chunks, workers)):
            with torch.inference_mode():
                xt = prep(x)
                views = range(8) if tta else range(1)
                p = sum(logits_to_probs(model(dihedral(xt, v)), meta) for v in views)
                out[c] = (p / len(views)).cpu().numpy()
            yield Progress(b + 1, len(chunks), message)
    finally:
        model.train(was)
    return out


def train_spatial_job(cfg: SpatialTrainConfig, train_set: NeighbourhoodSet,
                  val_set: NeighbourhoodSet | None = None, *, out_dir: str | Path,
                  overwrite: bool = False, patch_config: dict | None = None
                  ) -> Job[TrainResult]:
    """Train a spatial-context model (a progress generator returning a ``TrainResult``).

    Each step draws ``batch_size`` neighbourhoods with :class:`ClassSlideSampler`,
    augments window and label grid together, and minimises ``L_CE + β L_spatial``.
    Progress ``partial`` dicts are ``{"kind": "step", "loss", "ce", "spatial", "lr"...}``
    and, at epoch ends, ``{"kind": "epoch", "row", "history"}`` (as ``train_job``).

    Raises
    ------
    InputError
        An existing run in ``out_dir`` (without ``overwrite``), not two classes, an
        empty class, or a neighbourhood size different from the model's.
    """
    from ..models.spatial import tumour_probability
    from .augment import ColorJitter

    t_start = time.perf_counter()
    out = Path(out_dir)
    last_p, best_p = out / "last.safetensors", out / "best.safetensors"
    if last_p.exists() and not overwrite:
        raise InputError(f"{out}: already holds a training run (pass --overwrite to start again)")
    if len(train_set) == 0:
        raise InputError("the training set is empty")
    if len(train_set.classes) != 2:
        raise InputError(f"the seed-004 spatial loss is defined for two classes (normal, "
                         f"tumour); got {train_set.classes}")
    if train_set.k != cfg.spatial.k:
        raise InputError(f"the neighbourhoods are {train_set.k}x{train_set.k} but the model "
                         f"asks for k={cfg.spatial.k}")
    counts = train_set.windows.counts()
    if (counts == 0).any():
        raise InputError(f"training set: no patches of class "
                         f"{', '.join(c for c, n in zip(train_set.classes, counts, strict=True) if not n)}")
    if val_set is not None and len(val_set) == 0:
        val_set = None
    monitor = cfg.monitor if val_set is not None else "train_loss"
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    classes = list(train_set.classes)
    n_out = 1 if cfg.head == "sigmoid" else 2
    yield Progress(0, 1, "preparing")
    if cfg.normalise == "imagenet":
        from ..models.io import IMAGENET_MEAN, IMAGENET_STD

        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        mean, std = dataset_stats(train_set.windows, seed=cfg.seed)
    model = SpatialContextModel(cfg.spatial, n_out, patch_size=train_set.cell_size,
                                init=cfg.init, freeze=cfg.freeze).to(dev)
    meta = spatial_meta(cfg.spatial, classes=classes, patch_size=train_set.cell_size,
                        mpp=train_set.read_mpp, mean=mean, std=std, head=cfg.head,
                        extra={"train_spatial": cfg.to_json(),
                               "patches": patch_config or train_set.windows.meta.get("config"),
                               "train_slides": train_set.slide_names(),
                               "val_slides": val_set.slide_names() if val_set is not None else [],
                               "train_counts": dict(zip(classes, counts.tolist(), strict=True))})
    tcfg = cfg.as_train_config()
    sampler = ClassSlideSampler(train_set.labels, train_set.slide_index)
    rng = np.random.default_rng(cfg.seed)
    epoch_size = int(cfg.epoch_size or len(train_set))
    steps_per_epoch = max(1, epoch_size // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, int(cfg.max_steps))
    opt = make_optimizer(tcfg, model.parameters())
    sched, sched_unit = make_scheduler(tcfg, opt, steps_per_epoch, total_steps)
    use_amp = bool(cfg.amp and dev.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    jitter = ColorJitter().to(dev) if cfg.augment == "dihedral-jitter" else None
    prep = model_preprocess(meta, dev)  # the model's input transform, augmented between its steps
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", jsonio.dumps(
        {"train_spatial": cfg.to_json(), "patches": meta.extra["patches"],
         "model": meta.to_json(), "parameters": count_parameters(model),
         "trainable": count_parameters(model, trainable_only=True)}, indent=2, default=str),
        overwrite=True)

    history: list[dict[str, Any]] = []
    mon = Monitor(monitor, patience=cfg.early_stopping or None)
    step, seen, t_train = 0, 0, 0.0
    stopped_early = False
    for epoch in range(cfg.epochs):
        if step >= total_steps:
            break
        set_train_mode(model, True)
        order = sampler.sample(steps_per_epoch * cfg.batch_size, rng)
        chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        sums = {"loss": 0.0, "ce": 0.0, "spatial": 0.0}
        n_run, correct = 0, 0
        t_epoch = t_prev = time.perf_counter()
        for b, (_, x_np, g_np) in enumerate(_batches(train_set, chunks, cfg.workers)):
            x = prep.to_unit(x_np)
            g = torch.from_numpy(g_np).to(dev)
            if cfg.augment != "none":
                codes = torch.randint(0, 8, (len(x),))
                x, g = dihedral_windows(x, g, codes.to(dev))
            if jitter is not None:
                x = jitter(x)
            x = prep.normalise(x)
            opt.zero_grad(set_to_none=True)
            if use_amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = model.forward_grid(x)
            else:
                logits = model.forward_grid(x)
            loss, ce, sp = spatial_objective(logits.float(), g.reshape(len(g), -1),
                                             beta=cfg.beta, head=cfg.head,
                                             ce_cells=cfg.ce_cells)
            optimiser_step(loss, opt, scaler, sched if sched_unit == "step" else None, step)
            step += 1
            bn = len(x_np)
            lv = float(loss.detach())
            sums["loss"] += lv * bn
            sums["ce"] += float(ce.detach()) * bn
            sums["spatial"] += float(sp.detach()) * bn
            n_run += bn
            with torch.no_grad():
                centre = cfg.spatial.centre
                pc = tumour_probability(logits[:, centre].float(), cfg.head)
                yc = g.reshape(len(g), -1)[:, centre]
                correct += int(((pc > 0.5).long() == yc).sum())
            seen += bn
            now = time.perf_counter()
            t_train += now - t_prev
            yield step_progress(step, total_steps, epoch, cfg.epochs, b, steps_per_epoch, lv,
                                opt.param_groups[0]["lr"], ce=float(ce.detach()),
                                spatial=float(sp.detach()))
            t_prev = time.perf_counter()
            if step >= total_steps:
                break
        row = epoch_row(epoch, step, sums, n_run, correct, opt.param_groups[0]["lr"],
                        time.perf_counter() - t_epoch)

        def validate():
            job = predict_neighbourhoods_job(model, val_set, meta, device=dev,
                                             batch_size=max(cfg.batch_size, 64),
                                             workers=cfg.workers, message="validating")
            probs = yield from job
            return val_metrics(probs, val_set.labels, classes)

        def save(improved: bool, epoch=epoch, step=step) -> None:
            meta.extra["history"] = history
            meta.extra["best"] = {"monitor": monitor, "value": mon.best_value,
                                  "epoch": mon.best_epoch}
            meta.extra["checkpoint"] = {"step": step, "epochs_done": epoch + 1}
            save_model(last_p, model, meta, overwrite=True)
            if improved:
                save_model(best_p, model, meta, overwrite=True)

        stopped_early = yield from close_epoch(
            row, epoch=epoch, epochs=cfg.epochs, step=step, total_steps=total_steps,
            history=history, monitor=mon, validate=validate if val_set is not None else None,
            val_every=cfg.val_every, sched=sched, sched_unit=sched_unit, save=save,
            log=out / "log.csv", shown=("loss", "auc", "acc", "spatial"))
        if stopped_early:
            break
    return finish_run(model, meta, out=out, history=history, monitor=mon,
                      stopped_early=stopped_early, steps=step, t_start=t_start, seen=seen,
                      t_train=t_train, device=dev, amp=use_amp)


__all__ = ["AUGMENTS", "ClassSlideSampler", "NeighbourhoodSet", "SpatialTrainConfig",
           "build_neighbourhoods", "build_neighbourhoods_job", "dihedral_windows",
           "label_cells", "neighbourhoods_from_slide_job", "predict_neighbourhoods_job",
           "split_neighbourhoods", "train_spatial_job"]
