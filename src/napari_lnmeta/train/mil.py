"""Training attention MIL on slide labels (seed 002: Adam; seed 003: SGD + L1).

:func:`train_mil_job` is a progress generator (one step per epoch, plus a final
evaluation); closing it (``worker.quit()`` in the GUI, Ctrl-C in the CLI) stops training
at the next epoch boundary and leaves the last checkpoint on disk.

Protocol (seed 002, section 2.2):

* slides are split 4:1 into a training and an independent test cohort, and 25 % of the
  training cohort is the validation cohort (:func:`split_slides`, stratified by class,
  by slide, never by bag or patch);
* every training slide gives ``M`` bags of ``N`` random patches with the slide's label
  (new random bags every epoch unless ``resample=False``);
* Adam, learning rate 1e-4, weight decay 1e-3, cosine annealing with warm restarts
  (``t0`` epochs per cycle, stepped every batch); seed 003 uses SGD (lr 1e-4, weight
  decay 1e-3) with an added L1 penalty of weight 1e-6 (``optimizer="sgd", l1=1e-6``);
* a slide's prediction is the mean of its bags' class probabilities (Figure 2c); the
  validation/test bags are drawn once with a fixed seed so numbers are reproducible;
* the model of the best validation epoch (AUC, then loss) is kept; metrics come from
  :mod:`napari_lnmeta.core.metrics`: AUC with bootstrap and DeLong 95 % CI, ACC, SEN,
  SPE, PPV, NPV, F1 (binary) or accuracy, per-class report and one-vs-rest AUCs plus
  the N0-vs-N+ collapse (3 classes).

Checkpoints in ``out_dir``: ``last.safetensors`` (every ``checkpoint_every`` epochs),
``best.safetensors``, ``history.json``, ``metrics.json`` and ``splits.csv``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.bags import BagSpec, MILSlide, check_enough, gather, make_bags, sample_bags
from ..errors import InputError
from ..io import jsonio
from ..progress import Job, Progress
from ._epochs import Monitor

if TYPE_CHECKING:
    from ..models.clinical import ClinicalEncoder
    from ..models.extractor import BackboneInfo
    from ..models.mil import MILInfo, MILModel

SPLITS = ("train", "val", "test")


@dataclass
class MILTrainConfig:
    """Everything about one MIL training run (passed from widget/CLI to core as one object).

    Model: ``pooling``, ``embed_dim``, ``attn_dim``, ``dropout``, ``clinical_repeat``,
    ``feature_pool`` (see :class:`napari_lnmeta.models.mil.MILConfig`).
    Bags: ``bag_size`` (N), ``bags_per_slide`` (M), ``replace``, ``resample`` (new bags
    every epoch), ``eval_bags`` (M for validation/test, default ``bags_per_slide``).
    Optimisation: ``epochs``, ``batch_size`` (bags per step), ``optimizer`` (``"adam"``
    or ``"sgd"``), ``lr``, ``weight_decay``, ``momentum`` (SGD), ``l1``, ``t0`` /
    ``t_mult`` / ``eta_min`` (cosine warm restarts), ``balance`` (class-weighted loss),
    ``patience`` (early stopping on the validation criterion, ``None``: off),
    ``select`` (``"val_auc"``, ``"val_loss"`` or ``"last"``).
    Splits: ``test_fraction`` (0.2 = 4:1), ``val_fraction`` (of the training cohort).
    """

    pooling: str = "gated_attention"
    embed_dim: int | None = 128
    attn_dim: int = 128
    dropout: float = 0.25
    clinical_repeat: int = 10
    feature_pool: int = 4
    bag_size: int = 16
    bags_per_slide: int = 10
    replace: bool = False
    resample: bool = True
    eval_bags: int | None = None
    epochs: int = 50
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-3
    momentum: float = 0.9
    l1: float = 0.0
    t0: int = 10
    t_mult: int = 1
    eta_min: float = 0.0
    balance: bool = True
    patience: int | None = None
    select: str = "val_auc"
    test_fraction: float = 0.2
    val_fraction: float = 0.25
    seed: int = 0
    device: str = "auto"
    n_boot: int = 1000
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.select not in ("val_auc", "val_loss", "last"):
            raise InputError(f"select must be val_auc, val_loss or last, got {self.select!r}")
        if self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}")
        if not (0 <= self.test_fraction < 1 and 0 <= self.val_fraction < 1):
            raise InputError("test_fraction and val_fraction must be in [0, 1)")

    @classmethod
    def sgd_warm_restarts(cls, **kw) -> MILTrainConfig:
        """SGD lr 1e-4, weight decay 1e-3, L1 1e-6, cosine warm restarts (seed 003's)."""
        return cls(**{"optimizer": "sgd", "lr": 1e-4, "weight_decay": 1e-3, "l1": 1e-6, **kw})

    def bag_spec(self) -> BagSpec:
        return BagSpec(size=self.bag_size, per_slide=self.bags_per_slide, replace=self.replace,
                       seed=self.seed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MILTrainResult:
    """What :func:`train_mil_job` returns."""

    model: MILModel
    info: MILInfo
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    splits: dict[str, str]
    predictions: dict[str, dict[str, Any]]
    best_epoch: int
    model_path: Path | None = None
    out_dir: Path | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------
def split_slides(labels: Sequence[int], *, test_fraction: float = 0.2,
                 val_fraction: float = 0.25, seed: int = 0) -> list[str]:
    """``"train"`` / ``"val"`` / ``"test"`` for each slide, stratified by class.

    Seed 002: 4:1 train:test (``test_fraction=0.2``), then 25 % of the training cohort
    as validation. Within each class the counts are rounded; a class with a single slide
    goes to training.
    """
    y = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = np.array(["train"] * len(y), dtype=object)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        n_test = int(round(n * test_fraction)) if n > 1 else 0
        n_val = int(round((n - n_test) * val_fraction)) if n - n_test > 1 else 0
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "val"
    return [str(s) for s in out]


# --------------------------------------------------------------------------------------
# Prediction and metrics
# --------------------------------------------------------------------------------------
def predict_slides(model: MILModel, slides: Sequence[MILSlide], spec: BagSpec, *,
                   device: Any = "cpu", m: int | None = None, seed: int = 12345
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide probabilities ``(S, C)`` (mean over its bags) and each slide's bag probabilities."""
    from ..models.mil import bag_probabilities

    rng = np.random.default_rng(seed)
    c = model.config.n_classes
    if not slides:
        return np.zeros((0, c), np.float32), []
    # all bags of all slides in one batched pass (slides are small, calls are not)
    idx = [sample_bags(len(s), spec, rng, slide=s.name, m=m) for s in slides]
    bags = np.concatenate([s.features[i] for s, i in zip(slides, idx, strict=True)])
    clin = None
    if model.config.clinical_dim:
        clin = np.concatenate([np.repeat(np.asarray(s.clinical, np.float32)[None], len(i), 0)
                               for s, i in zip(slides, idx, strict=True)])
    from ..models.mil import small_model_threads

    with small_model_threads(device):
        p, _ = bag_probabilities(model, bags, clin, device=device, batch=256)
    bounds = np.cumsum([0] + [len(i) for i in idx])
    per_bag = [p[bounds[k]:bounds[k + 1]] for k in range(len(slides))]
    return np.stack([pb.mean(axis=0) for pb in per_bag]), per_bag


def slide_metrics(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], *,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Seed 002's numbers for slide predictions (see module docstring)."""
    from ..core.metrics import evaluate_binary, multiclass_metrics

    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if len(y) == 0:
        return {"n": 0}
    if len(classes) == 2:
        out = evaluate_binary(y, proba[:, 1], n_boot=n_boot, seed=seed)
    else:
        out = multiclass_metrics(y, proba, classes=list(classes))
        pos = (y > 0).astype(np.int64)
        out["binary_N0_vs_rest"] = evaluate_binary(pos, 1.0 - proba[:, 0], n_boot=n_boot, seed=seed)
        out["AUC"] = out["binary_N0_vs_rest"]["AUC"]
    return _jsonable(out)


def attention_instance_auc(model: MILModel, bags: Sequence[MILSlide], *,
                           device: Any = "cpu") -> dict[str, Any]:
    """How well attention finds the positive instances inside positive bags.

    Every bag is scored whole (all its instances, one forward pass). Returns the bag
    AUC (positive-class probability vs bag label), ``instance_auc_mean``: the mean over
    positive bags that hold both kinds of instance of the AUC of the attention weights
    vs the instance labels (does attention rank the tumour patches of a bag first?),
    ``instance_auc_pooled``: one AUC over the attention logits of all those instances,
    and ``top1``: the share of positive bags whose most-attended patch is positive.
    """


    from ..models.mil import small_model_threads

    with small_model_threads(device):
        return _attention_instance_auc(model, bags, device=device)


def _attention_instance_auc(model: MILModel, bags: Sequence[MILSlide], *,
                            device: Any = "cpu") -> dict[str, Any]:
    import torch

    from ..core.metrics import roc_auc
    from ..models.mil import bag_probabilities

    probs, aucs, top1, logits_all, lab_all = [], [], [], [], []
    for b in bags:
        p, w = bag_probabilities(model, b.features[None], b.clinical, device=device)
        probs.append(p[0])
        if b.label == 1 and b.instance_labels is not None:
            yl = np.asarray(b.instance_labels, dtype=np.int64)
            top1.append(float(yl[int(np.argmax(w[0]))]))
            if 0 < yl.sum() < len(yl):
                aucs.append(roc_auc(yl, w[0]))
                with torch.inference_mode():
                    x = torch.from_numpy(b.features).to(device)
                    logits_all.append(model.instance_logits(x).float().cpu().numpy())
                lab_all.append(yl)
    pr = np.stack(probs)
    y = np.array([b.label for b in bags], dtype=np.int64)
    pooled = (roc_auc(np.concatenate(lab_all), np.concatenate(logits_all))
              if lab_all else float("nan"))
    return {"bag_auc": roc_auc(y, pr[:, 1]) if 0 < y.sum() < len(y) else float("nan"),
            "bag_acc": float((pr.argmax(1) == y).mean()),
            "instance_auc_mean": float(np.mean(aucs)) if aucs else float("nan"),
            "instance_auc_pooled": float(pooled),
            "top1": float(np.mean(top1)) if top1 else float("nan"),
            "n_bags": len(bags), "n_positive_bags": int(y.sum())}


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if math.isnan(f) or math.isinf(f) else f
    return o


def _loss_of(proba: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    p = np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(p).mean())


def _auc_of(proba: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    from ..core.metrics import roc_auc

    if len(y) == 0:
        return float("nan")
    if n_classes == 2:
        return roc_auc(y, proba[:, 1])
    return roc_auc((y > 0).astype(np.int64), 1.0 - proba[:, 0])


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _validate(slides: Sequence[MILSlide], classes: Sequence[str], spec: BagSpec,
              clinical_dim: int, feature_dim: int | None) -> int:
    if not slides:
        raise InputError("no slides to train on")
    names = [s.name for s in slides]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"slide names must be unique, repeated: {', '.join(dup[:5])}")
    dims = {s.features.shape[1] for s in slides}
    if len(dims) != 1:
        raise InputError(f"slides have features of different lengths {sorted(dims)}; they "
                         "come from different backbones")
    d = dims.pop()
    if feature_dim is not None and d != feature_dim:
        raise InputError(f"features have {d} dimensions, the backbone gives {feature_dim}")
    for s in slides:
        if not 0 <= s.label < len(classes):
            raise InputError(f"{s.name}: label {s.label} is not a class index of "
                             f"{list(classes)}")
        if clinical_dim and (s.clinical is None or len(s.clinical) != clinical_dim):
            raise InputError(f"{s.name}: no clinical vector of length {clinical_dim}")
        check_enough(len(s), spec, s.name)
    return d


def train_mil_job(slides: Sequence[MILSlide], config: MILTrainConfig, *,
                  classes: Sequence[str], backbone: BackboneInfo,
                  clinical: ClinicalEncoder | None = None,
                  splits: Sequence[str] | None = None, out_dir: str | Path | None = None,
                  overwrite: bool = False, features_meta: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> Job[MILTrainResult]:
    """Train a MIL model on slide-labelled feature sets (progress generator).

    Runs with few torch threads on the CPU (:func:`napari_lnmeta.models.mil.small_model_threads`);
    the parameters are those of :func:`_train_mil_job`.
    """
    from ..models.io import resolve_device
    from ..models.mil import small_model_threads

    with small_model_threads(resolve_device(config.device)):
        return (yield from _train_mil_job(
            slides, config, classes=classes, backbone=backbone, clinical=clinical,
            splits=splits, out_dir=out_dir, overwrite=overwrite, features_meta=features_meta,
            extra=extra))


def _train_mil_job(slides: Sequence[MILSlide], config: MILTrainConfig, *,
                   classes: Sequence[str], backbone: BackboneInfo,
                   clinical: ClinicalEncoder | None = None,
                   splits: Sequence[str] | None = None, out_dir: str | Path | None = None,
                   overwrite: bool = False, features_meta: dict[str, Any] | None = None,
                   extra: dict[str, Any] | None = None) -> Job[MILTrainResult]:
    """Train a MIL model on slide-labelled feature sets (progress generator).

    Parameters
    ----------
    slides
        One :class:`~napari_lnmeta.core.bags.MILSlide` per slide (features, label,
        clinical vector).
    config
        Model, bag, optimiser and split settings.
    classes
        Class names in label order (2: ``["N0", "N+"]``, 3: ``["N0", "N+(1-2)", "N+(>=3)"]``).
    backbone
        The feature extractor's :class:`~napari_lnmeta.models.extractor.BackboneInfo`
        (stored in the model so inference refuses features of another backbone).
    clinical
        Fitted encoder when the slides carry clinical vectors (fit it on the training
        slides only).
    splits
        ``"train"``/``"val"``/``"test"`` per slide; default :func:`split_slides`.
    out_dir
        Checkpoints, history, metrics and splits go here (see module docstring).
    features_meta
        Patch-grid settings of the features (stored for inference on new slides).

    Returns
    -------
    MILTrainResult
        With the best model (eval mode) and the validation and test metrics. The model
        standardises its input features with the training slides' per-dimension mean and
        SD (stored in the model file).
    """
    import contextlib

    from ..io.atomic import output_lock

    lock = output_lock(out_dir) if out_dir is not None else contextlib.nullcontext()
    with lock:  # one writer per output
        return (yield from _train_mil_job_locked(slides, config, classes=classes, backbone=backbone, clinical=clinical, splits=splits, out_dir=out_dir, overwrite=overwrite, features_meta=features_meta, extra=extra))


def _train_mil_job_locked(slides: Sequence[MILSlide], config: MILTrainConfig, *,
                          classes: Sequence[str], backbone: BackboneInfo,
                          clinical: ClinicalEncoder | None = None,
                          splits: Sequence[str] | None = None, out_dir: str | Path | None = None,
                          overwrite: bool = False, features_meta: dict[str, Any] | None = None,
                          extra: dict[str, Any] | None = None) -> Job[MILTrainResult]:
    import torch
    from torch import nn

    from ..io.atomic import write_text_atomic
    from ..models.io import resolve_device
    from ..models.mil import MILConfig, MILInfo, MILModel, feature_stats, save_mil
    from ._epochs import optimiser_step

    t_start = time.perf_counter()
    classes = [str(c) for c in classes]
    spec = config.bag_spec()
    cdim = clinical.dim if clinical is not None else 0
    dim = _validate(slides, classes, spec, cdim, backbone.feature_dim)
    labels = [s.label for s in slides]
    if splits is None:
        splits = split_slides(labels, test_fraction=config.test_fraction,
                              val_fraction=config.val_fraction, seed=config.seed)
    splits = [str(s) for s in splits]
    if len(splits) != len(slides) or set(splits) - set(SPLITS):
        raise InputError("splits must give train/val/test for every slide")
    by = {k: [s for s, sp in zip(slides, splits, strict=True) if sp == k] for k in SPLITS}
    if not by["train"]:
        raise InputError("no training slides after the split")
    present = sorted({s.label for s in by["train"]})
    if len(present) < 2:
        raise InputError(f"the training slides hold only class {classes[present[0]]!r}; "
                         "MIL needs slides of at least two classes")

    out = None
    if out_dir is not None:
        out = Path(out_dir)
        if (out / "best.safetensors").exists() and not overwrite:
            from ..errors import OutputExistsError

            raise OutputExistsError(out / "best.safetensors")
        out.mkdir(parents=True, exist_ok=True)
        lines = ["slide,label,class,split"] + [
            f"{s.name},{s.label},{classes[s.label]},{sp}"
            for s, sp in zip(slides, splits, strict=True)]
        write_text_atomic(out / "splits.csv", "\n".join(lines) + "\n", overwrite=True)

    dev = resolve_device(config.device)
    torch.manual_seed(config.seed)
    mcfg = MILConfig(feature_dim=dim, n_classes=len(classes), pooling=config.pooling,
                     embed_dim=config.embed_dim, attn_dim=config.attn_dim,
                     dropout=config.dropout, clinical_dim=cdim,
                     clinical_repeat=config.clinical_repeat, feature_pool=config.feature_pool)
    model = MILModel(mcfg)
    # the model standardises its inputs with the training slides' statistics
    mean, sd = feature_stats([s.features for s in by["train"]])
    model.set_feature_stats(mean, sd)
    model.to(dev)
    info = MILInfo(config=mcfg, classes=classes, backbone=backbone, clinical=clinical,
                   features=dict(features_meta or {}),
                   bags={"size": spec.size, "per_slide": spec.per_slide,
                         "replace": spec.replace},
                   extra={"training": config.to_json(), **(extra or {}),
                          "feature_standardisation": {
                              "from": "training slides", "slides": len(by["train"]),
                              "instances": int(sum(len(s) for s in by["train"]))}})
    if config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=max(1, int(config.t0)), T_mult=max(1, int(config.t_mult)), eta_min=config.eta_min)
    weight = None
    if config.balance:
        counts = np.bincount([s.label for s in by["train"]], minlength=len(classes)).astype(float)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(present), 0.0)
        weight = torch.tensor(w, dtype=torch.float32, device=dev)
    loss_fn = nn.CrossEntropyLoss(weight=weight)

    train = by["train"]
    clin = np.stack([s.clinical for s in train]).astype(np.float32) if cdim else None
    rng = np.random.default_rng(config.seed)
    fixed = make_bags(train, spec, rng) if not config.resample else None
    eval_m = config.eval_bags or spec.per_slide
    y_val = np.array([s.label for s in by["val"]], dtype=np.int64)

    history: list[dict[str, Any]] = []
    # best by (val AUC, then val loss) or val loss, or the last epoch (also without val slides)
    mon = Monitor(config.select, patience=config.patience if by["val"] else None,
                  better=partial(_better, select=config.select, has_val=bool(by["val"])),
                  best_value=(-1.0, math.inf), best_epoch=0)
    best_state = None
    stopped_early = False
    total = config.epochs
    yield Progress(0, total, "training MIL")
    for epoch in range(1, config.epochs + 1):
        model.train()
        which, idx = fixed if fixed is not None else make_bags(train, spec, rng)
        order = rng.permutation(len(which))
        n_steps = max(1, math.ceil(len(order) / config.batch_size))
        run_loss, n_seen = 0.0, 0
        for step in range(n_steps):
            sel = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = torch.from_numpy(gather(train, which[sel], idx[sel])).to(dev)
            y = torch.tensor([train[int(k)].label for k in which[sel]], device=dev)
            c = torch.from_numpy(clin[which[sel]]).to(dev) if clin is not None else None
            logits, _ = model(x, c)
            loss = loss_fn(logits, y)
            if config.l1:
                loss = loss + config.l1 * model.l1_penalty()
            opt.zero_grad(set_to_none=True)
            optimiser_step(loss, opt, None, None, step)
            sched.step(epoch - 1 + (step + 1) / n_steps)
            run_loss += float(loss.detach()) * len(sel)
            n_seen += len(sel)
        rec: dict[str, Any] = {"epoch": epoch, "train_loss": run_loss / max(n_seen, 1),
                               "lr": float(opt.param_groups[0]["lr"])}
        if by["val"]:
            pv, _ = predict_slides(model, by["val"], spec, device=dev, m=eval_m)
            rec["val_loss"] = _loss_of(pv, y_val)
            rec["val_auc"] = _auc_of(pv, y_val, len(classes))
            rec["val_acc"] = float((pv.argmax(1) == y_val).mean())
        history.append(rec)
        if mon.update((_nz(rec.get("val_auc"), -1.0), _nz(rec.get("val_loss"), math.inf)),
                      epoch):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_mil(out / "best.safetensors", model, _with(info, epoch, rec), overwrite=True)
        if out is not None and (epoch % max(1, config.checkpoint_every) == 0
                                or epoch == config.epochs):
            save_mil(out / "last.safetensors", model, _with(info, epoch, rec), overwrite=True)
            write_text_atomic(out / "history.json", jsonio.dumps(_jsonable(history), indent=1),
                              overwrite=True)
        msg = f"epoch {epoch}: loss {rec['train_loss']:.3f}"
        if "val_auc" in rec:
            msg += f", val AUC {rec['val_auc']:.3f}"
        yield Progress(epoch, total, msg, partial=rec)
        if mon.exhausted:
            stopped_early = True
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics: dict[str, Any] = {"best_epoch": mon.best_epoch}
    predictions: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        if not by[split]:
            continue
        p, per_bag = predict_slides(model, by[split], spec, device=dev, m=eval_m)
        y = np.array([s.label for s in by[split]], dtype=np.int64)
        if split != "train":
            metrics[split] = slide_metrics(y, p, classes, n_boot=config.n_boot, seed=config.seed)
        for s, pr, pb in zip(by[split], p, per_bag, strict=True):
            predictions[s.name] = {"split": split, "label": classes[s.label],
                                   "proba": [float(v) for v in pr],
                                   "bag_proba_sd": [float(v) for v in pb.std(0)]}
    info.extra["metrics"] = _jsonable(metrics)
    info.extra["best_epoch"] = mon.best_epoch
    model_path = None
    if out is not None:
        model_path = save_mil(out / "best.safetensors", model, info, overwrite=True)
        write_text_atomic(out / "metrics.json",
                          jsonio.dumps(_jsonable({"metrics": metrics, "predictions": predictions,
                                                "config": config.to_json(),
                                                "classes": classes,
                                                "backbone": backbone.to_json()}), indent=1),
                          overwrite=True)
    yield Progress(total, total, "done")
    return MILTrainResult(model=model, info=info, history=history, metrics=_jsonable(metrics),
                          splits={s.name: sp for s, sp in zip(slides, splits, strict=True)},
                          predictions=predictions, best_epoch=mon.best_epoch,
                          model_path=model_path, out_dir=out, stopped_early=stopped_early,
                          seconds=time.perf_counter() - t_start)


def _nz(v: Any, default: float) -> float:
    return default if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _better(value: tuple[float, float], best: tuple[float, float], *, select: str,
            has_val: bool) -> bool:
    """Whether an epoch's (val AUC, val loss) beats the best so far under ``select``."""
    if select == "last" or not has_val:
        return True
    (auc, loss), (best_auc, best_loss) = value, best
    if select == "val_loss":
        return loss < best_loss
    return auc > best_auc + 1e-9 or (abs(auc - best_auc) <= 1e-9 and loss < best_loss)


def _with(info: MILInfo, epoch: int, rec: dict[str, Any]) -> MILInfo:
    from dataclasses import replace

    return replace(info, extra={**info.extra, "epoch": epoch, "epoch_record": _jsonable(rec)})


__all__ = ["SPLITS", "MILTrainConfig", "MILTrainResult", "attention_instance_auc",
           "predict_slides", "slide_metrics", "split_slides", "train_mil_job"]
