"""The training loop: a progress generator that trains, validates, logs and checkpoints.

:func:`train_job` yields :class:`~napari_lnmeta.progress.Progress` after every step
(``partial`` carries the loss, the learning rate and, at epoch ends, the validation
metrics and the whole history, which the widget plots) and returns a
:class:`TrainResult`. The CLI and tests drive it with :func:`~napari_lnmeta.progress.run`;
the widget runs it in a thread worker whose Cancel stops it at the next ``yield``.

Files in the output folder (all written atomically: a cancel or a crash leaves the
previous version intact, never a half-written file):

``last.safetensors``
    model + metadata after the latest completed epoch (or ``checkpoint_every`` steps);
``best.safetensors``
    the best model by ``monitor`` so far;
``state-<step>.safetensors``
    optimiser, scheduler, AMP scaler and random-number state of ``last`` (torch, numpy,
    Python and the batch sampler, with the sampler's state at the start of the epoch and
    the batch reached, for ``resume``);
``log.csv``
    one row per epoch: losses, validation metrics, learning rate, time;
``config.json``
    the training and patch configuration.

Seeds: ``seed`` fixes weight init, batch order and augmentations (``deterministic``
also asks cuDNN / torch for deterministic kernels). A resumed run continues with the
same random streams and, after a mid-epoch checkpoint, at the next batch of the same
epoch order, so with ``deterministic`` it ends with the weights of an uninterrupted run. AMP (float16 autocast + gradient
scaling) is used on CUDA when ``amp`` is true.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# No early torchvision import here: its first import pulls in torch._dynamo and, where
# installed, triton, whose bundled LLVM collides with Mesa OpenGL's libLLVM once napari's
# canvas exists. That crashes in any thread, the main one included, so importing it here first
# is no protection; the napari plugin loads triton safely instead (napari_lnmeta._llvm_guard).
from torch import nn

from ..core.inference import model_preprocess
from ..core.metrics import binary_metrics, multiclass_metrics
from ..errors import InputError, ModelError
from ..io import jsonio
from ..io.atomic import write_text_atomic
from ..models.io import (
    ModelMeta,
    logits_to_probs,
    read_meta,
    read_safetensors,
    resolve_device,
    save_model,
)
from ..models.registry import build_model, count_parameters, set_train_mode
from ..progress import Job, Progress
from ._epochs import (
    Monitor,
    _latest_state,
    _load_state,
    _save_state,
    close_epoch,
    epoch_row,
    optimiser_step,
    step_progress,
)
from .augment import make_augment
from .datasets import BatchLoader, PatchSet, check_class_counts
from .options import OPTIMIZERS, SCHEDULERS


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in ``config.json`` and the model).

    Attributes
    ----------
    architecture
        Registry name (:func:`~napari_lnmeta.models.registry.list_architectures`).
    head
        ``"softmax"`` (cross-entropy) or ``"sigmoid"`` (BCE; one logit when binary).
    epochs, batch_size
        Seed 000: 18 epochs of 128.
    optimizer
        ``sgd`` | ``adam`` | ``adamw`` | ``rmsprop``; ``lr``, ``weight_decay``,
        ``momentum`` (SGD / RMSprop).
    scheduler
        ``none`` | ``cosine`` (seed 000) | ``onecycle`` (peak ``max_lr``) |
        ``plateau`` (ReduceLROnPlateau ×``plateau_factor`` after ``plateau_patience``
        epochs, seed 001) | ``cosine_restarts`` (period ``t0`` epochs, ×``t_mult``;
        seeds 002–003).
    early_stopping
        Stop after this many epochs without improvement of ``monitor``
        (``val_loss``, ``val_auc``, ``val_acc``, ``val_f1``; ``train_loss`` without
        validation data).
    freeze, freeze_convs, init
        Frozen stages / conv layers and an optional safetensors initialisation.
    augment
        Preset of :func:`~napari_lnmeta.train.augment.make_augment`.
    sampler, epoch_size
        ``shuffle`` (every patch once per epoch) or ``balanced`` (equal numbers per
        class each epoch, negatives re-drawn); ``epoch_size`` patches per epoch.
    normalise
        ``"dataset"``: per-channel mean / std of the training patches (seed 000);
        ``"imagenet"``: ImageNet statistics (use with pretrained ``init``);
        ``"pretrained"``: the mean / std of the named ``init``'s own preprocessing config
        (a foundation model's, see :mod:`napari_lnmeta.models.backbones`).
    l1, label_smoothing
        L1 weight penalty (seed 003: 1e-6) and cross-entropy label smoothing.
    seed, deterministic, device, amp, workers
        Reproducibility, ``"auto"``/``"cpu"``/``"cuda"``, mixed precision on CUDA,
        patch-reading threads.
    max_steps
        Stop after this many optimisation steps (quick checks).
    val_every
        Validate every this many epochs (and after the last one).
    checkpoint_every
        Also write ``last`` every this many steps (0: at epoch ends only).
    save_dtype
        ``"float16"`` to store the final models at half precision.
    """

    architecture: str = "resnet18"
    head: str = "softmax"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    scheduler: str = "cosine"
    max_lr: float | None = None
    t0: int = 5
    t_mult: int = 1
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    early_stopping: int | None = None
    monitor: str = "val_loss"
    freeze: int = 0
    freeze_convs: int = 0
    init: str | None = None
    augment: str = "none"
    sampler: str = "shuffle"
    epoch_size: int | None = None
    normalise: str = "dataset"
    l1: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    max_steps: int | None = None
    val_every: int = 1
    checkpoint_every: int = 0
    save_dtype: str | None = None
    tensorboard: bool = False

    def __post_init__(self):
        self.optimizer = self.optimizer.lower()
        self.scheduler = self.scheduler.lower().replace("-", "_")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r} (choose {', '.join(OPTIMIZERS)})")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"unknown scheduler {self.scheduler!r} (choose {', '.join(SCHEDULERS)})")
        if self.head not in ("softmax", "sigmoid"):
            raise InputError(f"head must be softmax or sigmoid, got {self.head!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("epochs and batch size must be >= 1")
        if self.normalise not in ("dataset", "imagenet", "pretrained"):
            raise InputError(f"normalise must be 'dataset', 'imagenet' or 'pretrained', got "
                             f"{self.normalise!r}")
        if self.monitor not in ("val_loss", "val_auc", "val_acc", "val_f1", "train_loss"):
            raise InputError(f"unknown monitor {self.monitor!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_job` returns."""

    out_dir: Path
    last: Path
    best: Path
    history: list[dict[str, Any]]
    best_value: float
    best_epoch: int
    stopped_early: bool
    steps: int
    meta: ModelMeta
    seconds: float
    patches_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the trained network (last)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def dataset_stats(ps: PatchSet, *, n: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (after /255) of up to ``n`` random patches."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ps), min(n, len(ps)), replace=False))
    x = ps.read(idx).reshape(-1, 3).astype(np.float64) / 255.0
    std = x.std(axis=0)
    return x.mean(axis=0).tolist(), np.where(std > 1e-3, std, 1.0).tolist()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise InputError("every parameter is frozen; lower --freeze")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


def make_scheduler(cfg: TrainConfig, opt, steps_per_epoch: int, total_steps: int):
    """The scheduler and whether it steps per batch (``"step"``) or per epoch (``"epoch"``)."""
    s = cfg.scheduler
    if s == "none":
        return None, "none"
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps)), "step"
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.max_lr or cfg.lr * 10, total_steps=max(2, total_steps)), "step"
    if s == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=max(1, cfg.t0 * steps_per_epoch), T_mult=max(1, cfg.t_mult)), "step"
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min" if cfg.monitor.endswith("loss") else "max",
        factor=cfg.plateau_factor, patience=cfg.plateau_patience), "epoch"


def _loss_fn(cfg: TrainConfig, n_classes: int):
    if cfg.head == "softmax":
        ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        return lambda logits, y: ce(logits.float(), y)
    bce = nn.BCEWithLogitsLoss()
    if n_classes == 2:
        return lambda logits, y: bce(logits.float()[:, 0], y.float())
    return lambda logits, y: bce(logits.float(), nn.functional.one_hot(y, n_classes).float())


# --------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------
def predict_patches_job(model: nn.Module, ps: PatchSet, meta: ModelMeta, *, device: torch.device,
                batch_size: int = 256, amp: bool = False, workers: int = 2,
                message: str = "predicting") -> Job[np.ndarray]:
    """Class probabilities ``(N, C)`` of every patch of ``ps`` (in order)."""
    dev = torch.device(device)
    prep = model_preprocess(meta, dev)
    out = np.empty((len(ps), len(meta.classes)), dtype=np.float32)
    loader = BatchLoader(ps, batch_size, sampler="sequential", workers=workers)
    was_training = model.training
    model.eval()
    n_batches = len(loader)
    pos = 0
    try:
        for b, (x, _) in enumerate(loader):
            with torch.inference_mode():
                xt = prep(x)
                if amp and dev.type == "cuda":
                    with torch.autocast("cuda", dtype=torch.float16):
                        logits = model(xt)
                else:
                    logits = model(xt)
                out[pos:pos + len(x)] = logits_to_probs(logits, meta).cpu().numpy()
            pos += len(x)
            yield Progress(b + 1, n_batches, message)
    finally:
        model.train(was_training)
    return out


def val_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Validation loss, accuracy, weighted F1 and AUC (one-vs-rest mean beyond two classes)."""
    eps = 1e-7
    p_true = probs[np.arange(len(y)), y] if probs.shape[1] > 1 else probs[:, 0]
    loss = float(-np.mean(np.log(np.clip(p_true, eps, 1.0))))
    if len(classes) == 2:
        m = binary_metrics(y, probs[:, 1])
        return {"val_loss": loss, "val_acc": m["ACC"], "val_auc": m["AUC"], "val_sen": m["SEN"],
                "val_spe": m["SPE"], "val_f1": m["F1_weighted"]}
    m = multiclass_metrics(y, probs, classes=classes)
    return {"val_loss": loss, "val_acc": m["ACC"], "val_f1": m["F1_weighted"],
            "val_auc": float(np.nanmean(list(m["AUC_ovr"].values())))}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def finish_run(model: nn.Module, meta: ModelMeta, *, out: Path, history: list[dict[str, Any]],
               monitor: Monitor, stopped_early: bool, steps: int, t_start: float, seen: int,
               t_train: float, device: torch.device, amp: bool) -> TrainResult:
    """The end of a patch or spatial run: ``best.safetensors`` (the last weights when no
    epoch improved on the monitored value) and the :class:`TrainResult`."""
    last_p, best_p = out / "last.safetensors", out / "best.safetensors"
    if not best_p.exists():
        save_model(best_p, model, meta, overwrite=True)
    return TrainResult(out_dir=out, last=last_p, best=best_p, history=history,
                       best_value=monitor.best_value, best_epoch=monitor.best_epoch,
                       stopped_early=stopped_early, steps=steps, meta=meta,
                       seconds=time.perf_counter() - t_start,
                       patches_per_second=seen / t_train if t_train else float("nan"),
                       extra={"device": str(device), "amp": amp,
                              "parameters": count_parameters(model)},
                       model=model.eval())


def train_job(cfg: TrainConfig, train_set: PatchSet, val_set: PatchSet | None = None, *,
              out_dir: str | Path, resume: bool = False, overwrite: bool = False,
              patch_config: dict | None = None) -> Job[TrainResult]:
    """Train a patch classifier (a progress generator returning :class:`TrainResult`).

    Parameters
    ----------
    cfg
        The training configuration.
    train_set, val_set
        Patch sets (split by slide or region beforehand); ``val_set`` drives early
        stopping, the plateau scheduler and the ``best`` checkpoint.
    out_dir
        Folder for checkpoints and logs (see module docstring).
    resume
        Continue from ``out_dir/last.safetensors`` and its training state.
    overwrite
        Allow a fresh run in a folder that already holds a ``last.safetensors``.
    patch_config
        How the patches were made (stored in the model's metadata).
    """
    import dataclasses
    import shutil
    import uuid

    from ..io.atomic import output_lock, replace

    out = Path(out_dir)
    with output_lock(out):  # one writer per output
        if not (overwrite and not resume and (out / "last.safetensors").exists()):
            return (yield from _train_job_locked(cfg, train_set, val_set, out_dir=out,
                                                 resume=resume, overwrite=overwrite,
                                                 patch_config=patch_config))
        # --overwrite of an earlier run: train beside it, swap when complete
        foreign = sorted(c.name for c in out.iterdir() if not _is_run_file(c.name))
        if foreign:
            raise InputError(f"{out}: --overwrite replaces a training run folder as a whole, "
                             f"and this one also holds {', '.join(foreign[:3])}"
                             f"{' ...' if len(foreign) > 3 else ''}; move those away or "
                             "choose another output")
        stage = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            res = yield from _train_job_locked(cfg, train_set, val_set, out_dir=stage,
                                               resume=False, overwrite=False,
                                               patch_config=patch_config)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        replace(stage, out)
        return dataclasses.replace(res, out_dir=out, last=out / res.last.name,
                                   best=out / res.best.name)


_RUN_FILES = ("config.json", "last.safetensors", "best.safetensors", "log.csv", "tensorboard",
              "eval", ".lnmeta")


def _is_run_file(name: str) -> bool:
    """A file or folder a training run writes (its folder may be replaced as a whole)."""
    return (name in _RUN_FILES or (name.startswith("state-") and name.endswith(".safetensors"))
            or (name.startswith(".") and (".tmp-" in name or ".old-" in name
                                          or name.endswith(".lock"))))


def _train_job_locked(cfg: TrainConfig, train_set: PatchSet, val_set: PatchSet | None = None, *,
                      out_dir: str | Path, resume: bool = False, overwrite: bool = False,
                      patch_config: dict | None = None) -> Job[TrainResult]:
    t_start = time.perf_counter()
    out = Path(out_dir)
    last_p, best_p = out / "last.safetensors", out / "best.safetensors"
    if last_p.exists() and not (resume or overwrite):
        raise InputError(f"{out}: already holds a training run (pass --resume to continue or "
                         "--overwrite to start again)")
    if resume and not last_p.exists():
        raise InputError(f"{out}: nothing to resume (no last.safetensors)")
    if len(train_set) == 0:
        raise InputError("the training set is empty")
    check_class_counts(train_set, "training set")
    if val_set is not None and len(val_set) == 0:
        val_set = None
    if val_set is not None and val_set.classes != train_set.classes:
        raise InputError(f"validation classes {val_set.classes} differ from training classes "
                         f"{train_set.classes}")
    monitor = cfg.monitor if val_set is not None else "train_loss"
    seed_everything(cfg.seed, cfg.deterministic)
    dev = resolve_device(cfg.device)
    classes = list(train_set.classes)
    n_out = 1 if (cfg.head == "sigmoid" and len(classes) == 2) else len(classes)

    yield Progress(0, 1, "preparing")
    if resume:
        prev = read_meta(last_p)
        mean, std = prev.mean, prev.std
    elif cfg.normalise == "imagenet":
        from ..models.io import IMAGENET_MEAN, IMAGENET_STD

        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    elif cfg.normalise == "pretrained":
        from ..models.backbones import is_named, resolve

        if not is_named(cfg.init):
            raise InputError("normalise='pretrained' needs a named pretrained init "
                             "(--init imagenet, hf-hub:..., a folder)")
        src = resolve(cfg.init, cfg.architecture)
        mean, std = list(src.mean), list(src.std)
    else:
        mean, std = dataset_stats(train_set, seed=cfg.seed)
    meta = ModelMeta(architecture=cfg.architecture, classes=classes,
                     patch_size=train_set.patch_size, mpp=train_set.read_mpp,
                     normalisation=None, mean=mean, std=std, head=cfg.head,
                     extra={"train": cfg.to_json(), "patches": patch_config or train_set.meta.get("config"),
                            "train_slides": train_set.slide_names(),
                            "val_slides": val_set.slide_names() if val_set is not None else [],
                            "train_counts": dict(zip(classes, train_set.counts().tolist(), strict=True))})
    model = build_model(cfg.architecture, n_out, init=cfg.init, freeze=cfg.freeze,
                        freeze_convs=cfg.freeze_convs)
    if getattr(model, "_lnmeta_init", None):  # provenance: backbone id + weights hash
        meta.extra["init"] = dict(model._lnmeta_init)
    model.to(dev)
    augment = make_augment(cfg.augment).to(dev)
    loader = BatchLoader(train_set, cfg.batch_size, sampler=cfg.sampler, seed=cfg.seed,
                         epoch_size=cfg.epoch_size, workers=cfg.workers,
                         drop_last=len(train_set) > cfg.batch_size)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, int(cfg.max_steps))
    opt = make_optimizer(cfg, model.parameters())
    sched, sched_unit = make_scheduler(cfg, opt, steps_per_epoch, total_steps)
    loss_fn = _loss_fn(cfg, len(classes))
    use_amp = bool(cfg.amp and dev.type == "cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    prep = model_preprocess(meta, dev)  # the model's input transform, augmented between its steps

    history: list[dict[str, Any]] = []
    step, start_epoch = 0, 0
    resume_batch, resume_running = 0, [0.0, 0, 0]
    mon = Monitor(monitor, patience=cfg.early_stopping or None)
    if resume:
        lmeta = read_meta(last_p)
        if lmeta.architecture != cfg.architecture or lmeta.classes != classes:
            raise ModelError(last_p, f"cannot resume: it is a {lmeta.architecture} for "
                             f"{lmeta.classes}, not a {cfg.architecture} for {classes}")
        tensors, _ = read_safetensors(last_p)
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
        info = lmeta.extra.get("checkpoint", {})
        step, start_epoch = int(info.get("step", 0)), int(info.get("epochs_done", 0))
        st = _latest_state(out, step)
        if st is None:
            raise ModelError(last_p, f"cannot resume: its training state state-{step}.safetensors "
                             "is missing")
        smeta = _load_state(st, opt, sched)
        srng = smeta["rng"]
        in_epoch = int(smeta.get("batch_in_epoch", 0))
        if in_epoch and srng.get("epoch"):  # mid-epoch: the same order, from the next batch
            loader.resume_epoch(srng["epoch"], in_epoch)
            resume_batch = in_epoch
            resume_running = smeta.get("running") or [0.0, 0, 0]
        else:
            loader.set_state(srng.get("sampler", srng))
        if scaler is not None and smeta.get("scaler"):
            scaler.load_state_dict(smeta["scaler"])
        history = list(smeta.get("history", []))
        mon.restore(smeta)
    tb = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            yield Progress(0, 1, "TensorBoard is not installed; logging to log.csv only")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", jsonio.dumps(
        {"train": cfg.to_json(), "patches": patch_config or train_set.meta.get("config"),
         "model": meta.to_json(), "parameters": count_parameters(model),
         "trainable": count_parameters(model, trainable_only=True)}, indent=2, default=str),
        overwrite=True)

    def checkpoint(epochs_done: int, *, best: bool, batch_in_epoch: int = 0,
                   running: list | None = None) -> None:
        meta.extra["checkpoint"] = {"step": step, "epochs_done": epochs_done,
                                    "history": history[-1] if history else None}
        meta.extra["history"] = history
        # the sampler now, and before this epoch's order was drawn (for a mid-epoch resume)
        rng_state = {"sampler": loader.rng.bit_generator.state, "epoch": loader.epoch_state}
        state_p = out / f"state-{step}.safetensors"
        _save_state(state_p, opt, sched, rng_state,
                    {"history": history, **mon.state(), "step": step, "epochs_done": epochs_done,
                     "batch_in_epoch": batch_in_epoch, "running": running,
                     "scaler": scaler.state_dict() if scaler is not None else None})
        save_model(last_p, model, meta, overwrite=True)  # the commit point
        for old in out.glob("state-*.safetensors"):
            if old != state_p:
                old.unlink(missing_ok=True)
        if best:
            save_model(best_p, model, meta, overwrite=True)

    stopped_early = False
    seen = 0
    t_train = 0.0
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        set_train_mode(model, True)
        running, n_run, correct = 0.0, 0, 0
        first = 0
        if resume_batch and epoch == start_epoch:  # finish the interrupted epoch
            first = resume_batch
            running, n_run, correct = (float(resume_running[0]), int(resume_running[1]),
                                       int(resume_running[2]))
        t_epoch = time.perf_counter()
        t_prev = t_epoch
        for b, (x_np, y_np) in enumerate(loader, start=first):
            x = prep.normalise(augment(prep.to_unit(x_np)))
            y = torch.from_numpy(y_np).to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            if use_amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = model(x)
                    loss = loss_fn(logits, y)
            else:
                logits = model(x)
                loss = loss_fn(logits, y)
            if cfg.l1:
                loss = loss + cfg.l1 * sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
            optimiser_step(loss, opt, scaler, sched if sched_unit == "step" else None, step)
            step += 1
            lv = float(loss.detach())
            running += lv * len(y_np)
            n_run += len(y_np)
            with torch.no_grad():
                pred = logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long()
                correct += int((pred == y).sum())
            seen += len(y_np)
            now = time.perf_counter()
            t_train += now - t_prev  # reading + augmenting + the step: the real pipeline
            yield step_progress(step, total_steps, epoch, cfg.epochs, b, steps_per_epoch, lv,
                                opt.param_groups[0]["lr"])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                    and b + 1 < steps_per_epoch:
                checkpoint(epoch, best=False, batch_in_epoch=b + 1,
                           running=[running, n_run, correct])
            t_prev = time.perf_counter()
            if step >= total_steps:
                break
        row = epoch_row(epoch, step, {"loss": running}, n_run, correct,
                        opt.param_groups[0]["lr"], time.perf_counter() - t_epoch)

        def validate():
            job = predict_patches_job(model, val_set, meta, device=dev,
                                      batch_size=max(cfg.batch_size, 128), amp=use_amp,
                                      workers=cfg.workers, message="validating")
            probs = yield from job
            return val_metrics(probs, val_set.labels, classes)

        def save(improved: bool, epoch=epoch, row=row) -> None:
            meta.extra["best"] = {"monitor": monitor, "value": mon.best_value,
                                  "epoch": mon.best_epoch}
            checkpoint(epoch + 1, best=improved)
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                        tb.add_scalar(k, v, epoch + 1)

        stopped_early = yield from close_epoch(
            row, epoch=epoch, epochs=cfg.epochs, step=step, total_steps=total_steps,
            history=history, monitor=mon, validate=validate if val_set is not None else None,
            val_every=cfg.val_every, sched=sched, sched_unit=sched_unit, save=save,
            log=out / "log.csv", shown=("loss", "auc", "acc"))
        if stopped_early:
            break
    if tb is not None:
        tb.close()
    if cfg.save_dtype:
        # re-save final models at the requested precision
        for p in (last_p, best_p):
            if p.exists():
                from ..models.io import load_model

                m, mt = load_model(p)
                save_model(p, m, mt, overwrite=True, dtype=cfg.save_dtype)
    return finish_run(model, meta, out=out, history=history, monitor=mon,
                      stopped_early=stopped_early, steps=step, t_start=t_start, seen=seen,
                      t_train=t_train, device=dev, amp=use_amp)


__all__ = ["OPTIMIZERS", "SCHEDULERS", "TrainConfig", "TrainResult", "dataset_stats",
           "make_optimizer", "make_scheduler", "predict_patches_job",
           "seed_everything", "train_job"]
