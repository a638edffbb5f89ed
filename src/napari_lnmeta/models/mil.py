"""Attention-based multiple-instance learning over bags of patch features (seeds 002/003).

A bag is ``(N, D)``: the features of N patches of one slide. :class:`MILModel` embeds the
instances, pools them into one bag vector, optionally concatenates the clinical vector
repeated ``clinical_repeat`` times (seed 002: 10), and classifies the bag (2 classes: N0
vs N+; 3 classes: N0 / N+(1-2) / N+(>=3)). Poolings (``MILConfig.pooling``):

``attention``
    Ilse, Tomczak & Welling (2018), eq. 8: ``a_k = softmax_k(w^T tanh(V h_k))``,
    ``z = sum_k a_k h_k``.
``gated_attention``
    Ilse et al. eq. 9: ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``.
``maxpool_attention``
    The variant seed 002 describes: each instance vector is max-pooled (kernel
    ``feature_pool`` along the feature axis) and reshaped, two fully connected layers
    (ReLU between) turn it into one weight per instance, the weights (softmax over the
    bag) multiply the original instance vectors, which are summed. This is our reading
    of the paper's text; it is Ilse's attention with a max-pooled input and a ReLU MLP.
``mean`` / ``max``
    Baselines: the mean or the element-wise max of the instances. Their "attention"
    is uniform (mean) or the share of feature dimensions where an instance is the max.

Model files are safetensors written with :func:`napari_lnmeta.models.io.save_model`; the
header's :class:`~napari_lnmeta.models.io.ModelMeta` has ``architecture = "mil:<pooling>"``
and ``extra`` holds ``mil`` (this config), ``backbone`` (the feature extractor's
:class:`~napari_lnmeta.models.extractor.BackboneInfo`), ``clinical`` (the fitted
:class:`~napari_lnmeta.models.clinical.ClinicalEncoder` or ``None``), ``features`` (the
patch grid settings used in training) and ``bags`` (bag size and bags per slide).

**Feature standardisation.** Backbone features are far from zero mean and unit variance
(ImageNet resnet18 penultimate features: mean about 1.2, SD about 0.17 per dimension),
which leaves the attention network nearly flat and training at the mercy of the
initialisation. The model therefore holds the training slides' per-dimension mean and
SD as buffers (``feature_mean``, ``feature_std``, saved with the weights) and
standardises every input itself, in :meth:`MILModel.forward` and
:meth:`MILModel.instance_logits`: training, the CLI, the widget and the batch step all
run the same arithmetic. ``extra["feature_standardisation"]`` says where they came
from. A model file written before this (no such tensors) loads with mean 0 / SD 1, i.e.
raw features as before, and :attr:`MILInfo.notes` says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelError
from .clinical import ClinicalEncoder
from .extractor import BackboneInfo
from .io import ModelMeta, read_meta, read_safetensors, save_model

POOLINGS = ("attention", "gated_attention", "maxpool_attention", "mean", "max")
#: poolings whose instance weights come from a learned attention network
ATTENTION_POOLINGS = ("attention", "gated_attention", "maxpool_attention")
#: earlier names of poolings, still read (model files written before the rename)
POOLING_ALIASES = {"seed002": "maxpool_attention"}
#: the class sets of seed 002
CLASSES_2 = ["N0", "N+"]
CLASSES_3 = ["N0", "N+(1-2)", "N+(>=3)"]


@dataclass
class MILConfig:
    """Architecture of a :class:`MILModel` (stored in the model file).

    Parameters
    ----------
    feature_dim
        Length of an instance feature vector (the backbone's penultimate layer).
    n_classes
        2 (N0 vs N+) or 3 (N0 / N+(1-2) / N+(>=3)); any number >= 2 works.
    pooling
        One of :data:`POOLINGS`.
    embed_dim
        Instances pass ``Linear(feature_dim, embed_dim) + ReLU + Dropout`` first
        (Ilse's ``L``); ``None`` keeps the backbone features as they are.
    attn_dim
        Hidden size of the attention network (Ilse's ``D``).
    dropout
        Dropout after the embedding and before the classifier.
    clinical_dim, clinical_repeat
        Length of the encoded clinical vector (0: no clinical fusion) and how often it
        is repeated before concatenation (seed 002: 10).
    feature_pool
        Max-pooling kernel along the feature axis of ``maxpool_attention`` (seed 002).
    """

    feature_dim: int
    n_classes: int = 2
    pooling: str = "gated_attention"
    embed_dim: int | None = 128
    attn_dim: int = 128
    dropout: float = 0.25
    clinical_dim: int = 0
    clinical_repeat: int = 10
    feature_pool: int = 4

    def __post_init__(self) -> None:
        self.pooling = POOLING_ALIASES.get(self.pooling, self.pooling)
        if self.pooling not in POOLINGS:
            raise InputError(f"unknown MIL pooling {self.pooling!r}; choose one of "
                             + ", ".join(POOLINGS))
        if int(self.n_classes) < 2:
            raise InputError(f"a MIL model needs >= 2 classes, got {self.n_classes}")
        if int(self.feature_dim) < 1:
            raise InputError(f"feature_dim must be >= 1, got {self.feature_dim}")
        self.feature_dim = int(self.feature_dim)
        self.n_classes = int(self.n_classes)
        self.embed_dim = None if self.embed_dim in (None, 0) else int(self.embed_dim)
        self.clinical_dim = int(self.clinical_dim)

    @property
    def instance_dim(self) -> int:
        return self.embed_dim or self.feature_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MILConfig:
        d = dict(d)
        if "seed002_pool" in d:  # the field's earlier name
            d.setdefault("feature_pool", d.pop("seed002_pool"))
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class MILModel(nn.Module):
    """Embedding -> pooling -> (clinical fusion) -> classifier; see module docstring."""

    def __init__(self, config: MILConfig):
        super().__init__()
        self.config = cfg = config
        e = cfg.instance_dim
        if cfg.embed_dim:
            self.embed = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.embed_dim), nn.ReLU(),
                                       nn.Dropout(cfg.dropout))
        else:
            self.embed = nn.Identity()
        if cfg.pooling in ("attention", "gated_attention"):
            self.attn_v = nn.Linear(e, cfg.attn_dim)
            if cfg.pooling == "gated_attention":
                self.attn_u = nn.Linear(e, cfg.attn_dim)
            self.attn_w = nn.Linear(cfg.attn_dim, 1)
        elif cfg.pooling == "maxpool_attention":
            k = max(1, min(int(cfg.feature_pool), e))
            self.pool = nn.MaxPool1d(k, stride=k)
            self.attn_fc = nn.Sequential(nn.Linear(e // k, cfg.attn_dim), nn.ReLU(),
                                         nn.Linear(cfg.attn_dim, 1))
        fused = e + cfg.clinical_dim * cfg.clinical_repeat
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(fused, cfg.n_classes))
        # per-dimension standardisation of the input features (training slides' statistics)
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_std", torch.ones(cfg.feature_dim))

    def set_feature_stats(self, mean: np.ndarray | torch.Tensor,
                          std: np.ndarray | torch.Tensor) -> None:
        """Store the per-dimension mean and SD that every input is standardised with
        (a dimension with SD 0 is only centred)."""
        m = torch.as_tensor(np.asarray(mean, np.float32)).reshape(-1)
        sd = torch.as_tensor(np.asarray(std, np.float32)).reshape(-1)
        if m.numel() != self.config.feature_dim or sd.numel() != self.config.feature_dim:
            raise InputError(f"feature statistics have {m.numel()} values, the MIL model "
                             f"takes {self.config.feature_dim} features")
        if not (torch.isfinite(m).all() and torch.isfinite(sd).all()):
            raise InputError("feature statistics are not finite (NaN or inf in the features)")
        sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
        self.feature_mean.copy_(m.to(self.feature_mean.device))
        self.feature_std.copy_(sd.to(self.feature_std.device))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - feature_mean) / feature_std`` (identity for a model without statistics)."""
        return (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)

    # -- pieces --------------------------------------------------------------------------
    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised instance scores ``(..., N)`` of embedded instances ``(..., N, E)``.

        For ``mean`` they are zeros; for ``max`` the log share of feature dimensions where
        the instance holds the bag maximum (only meaningful within one bag).
        """
        p = self.config.pooling
        if p == "attention":
            return self.attn_w(torch.tanh(self.attn_v(h))).squeeze(-1)
        if p == "gated_attention":
            return self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)
        if p == "maxpool_attention":
            shp = h.shape
            pooled = self.pool(h.reshape(-1, 1, shp[-1])).reshape(*shp[:-1], -1)
            return self.attn_fc(pooled).squeeze(-1)
        if p == "mean":
            return torch.zeros(h.shape[:-1], device=h.device, dtype=h.dtype)
        arg = h.argmax(dim=-2)  # (..., E): which instance holds each dimension's max
        counts = torch.zeros(h.shape[:-1], device=h.device, dtype=h.dtype)
        counts.scatter_add_(-1, arg, torch.ones_like(arg, dtype=h.dtype))
        return torch.log(counts.clamp_min(1e-6) / h.shape[-1])

    def pool_bags(self, h: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag vectors ``(B, E)`` and instance weights ``(B, N)`` from ``(B, N, E)``."""
        p = self.config.pooling
        if p == "max":
            hm = h if mask is None else h.masked_fill(~mask[..., None], float("-inf"))
            z = hm.max(dim=1).values
            logits = self.attention_logits(hm)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            return z, torch.softmax(logits, dim=1)
        logits = self.attention_logits(h)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=1)
        z = torch.bmm(w.unsqueeze(1), h).squeeze(1)
        return z, w

    def forward(self, bags: torch.Tensor, clinical: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``(B, C)`` and instance weights ``(B, N)``.

        Parameters
        ----------
        bags
            ``(B, N, D)`` (or one bag ``(N, D)``) instance features.
        clinical
            ``(B, clinical_dim)`` encoded clinical vectors (required when the model was
            built with ``clinical_dim > 0``).
        mask
            Optional ``(B, N)`` bool, ``False`` for padding instances.
        """
        if bags.ndim == 2:
            bags = bags.unsqueeze(0)
            if clinical is not None and clinical.ndim == 1:
                clinical = clinical.unsqueeze(0)
        if bags.shape[-1] != self.config.feature_dim:
            raise InputError(f"instance features have {bags.shape[-1]} dimensions, the MIL "
                             f"model expects {self.config.feature_dim}")
        h = self.embed(self.standardise(bags))
        z, w = self.pool_bags(h, mask)
        if self.config.clinical_dim:
            if clinical is None:
                raise InputError("this MIL model fuses clinical data: give the clinical values")
            if clinical.shape[-1] != self.config.clinical_dim:
                raise InputError(f"clinical vector has {clinical.shape[-1]} values, the model "
                                 f"expects {self.config.clinical_dim}")
            z = torch.cat([z, clinical.to(z.dtype).repeat(1, self.config.clinical_repeat)], dim=1)
        return self.classifier(z), w

    @torch.no_grad()
    def instance_logits(self, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Attention scores of any number of instances ``(N, D)`` -> ``(N,)``, in chunks.

        For the attention poolings the score of an instance does not depend on the other
        instances, so scoring all the patches of a slide at once gives a softmax over the
        whole slide (the attention heatmap). For ``max`` the scores of one big bag are
        returned (computed on the whole set), for ``mean`` zeros.
        """
        if self.config.pooling == "max":
            return self.attention_logits(self.embed(self.standardise(features))[None])[0]
        out = [self.attention_logits(self.embed(self.standardise(features[i:i + chunk])))
               for i in range(0, len(features), chunk)]
        return torch.cat(out) if out else torch.zeros(0, device=features.device)

    def l1_penalty(self) -> torch.Tensor:
        """Sum of absolute weights (not biases) for the seed-003 L1 term."""
        return sum(p.abs().sum() for n, p in self.named_parameters() if n.endswith("weight"))


def feature_stats(features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and SD over all instances of ``features`` (one ``(N, D)``
    array per slide), accumulated in float64 without concatenating."""
    n, s, ss = 0, None, None
    for f in features:
        x = np.asarray(f, np.float64).reshape(len(f), -1)
        if s is None:
            s, ss = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        s += x.sum(0)
        ss += (x * x).sum(0)
        n += len(x)
    if not n:
        raise InputError("no instances to compute the feature statistics from")
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


#: MIL models are small: one intra-op thread is faster than several on a busy CPU (a
#: 36-slide training run: 33 s with one thread vs 179 s with the default on 2 cores)
SMALL_MODEL_THREADS = 1


@contextlib.contextmanager
def small_model_threads(device: Any = "cpu"):
    """Run a small model's work with few torch threads (restored afterwards).

    On the CPU the intra-op thread count is set to ``$LNMETA_MIL_THREADS`` or
    :data:`SMALL_MODEL_THREADS`; on a GPU nothing changes.
    """
    import os

    if torch.device(device).type != "cpu":
        yield
        return
    try:
        want = int(os.environ.get("LNMETA_MIL_THREADS", SMALL_MODEL_THREADS))
    except ValueError:
        want = SMALL_MODEL_THREADS
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, want))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
@dataclass
class MILInfo:
    """Everything a MIL model file says besides its weights."""

    config: MILConfig
    classes: list[str]
    backbone: BackboneInfo
    clinical: ClinicalEncoder | None = None
    features: dict[str, Any] = field(default_factory=dict)
    bags: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    #: what loading found worth saying (e.g. an older file without feature statistics)
    notes: list[str] = field(default_factory=list)

    @property
    def standardised(self) -> bool:
        """The model standardises its input features with stored training statistics."""
        return bool(self.extra.get("feature_standardisation"))

    @property
    def bag_size(self) -> int:
        return int(self.bags.get("size", 16))

    def check_features(self, cache: Any, *, what: str | None = None) -> None:
        """Refuse a feature cache made by another backbone (or of another length)."""
        what = what or (f"the MIL model {Path(self.path).name}" if self.path else "the MIL model")
        cache.check_backbone(self.backbone.to_json(), what=what)
        if int(cache.dim) != self.config.feature_dim:
            raise ModelError(cache.path, f"features have {cache.dim} dimensions but {what} "
                             f"expects {self.config.feature_dim}")

    def to_meta(self) -> ModelMeta:
        b = self.backbone
        return ModelMeta(architecture=f"mil:{self.config.pooling}", classes=list(self.classes),
                         patch_size=int(b.patch_size), mpp=b.mpp, normalisation=b.normalisation,
                         mean=list(b.mean), std=list(b.std), head="softmax",
                         extra={**self.extra, "mil": self.config.to_json(),
                                "backbone": b.to_json(),
                                "clinical": None if self.clinical is None else self.clinical.to_json(),
                                "features": self.features, "bags": self.bags})

    @classmethod
    def from_meta(cls, meta: ModelMeta, path: str | Path | None = None) -> MILInfo:
        ex = dict(meta.extra)
        where = path or meta.architecture
        if not meta.architecture.startswith("mil:") or "mil" not in ex:
            raise ModelError(where, f"is a {meta.architecture} patch model, not a MIL model; "
                             "train one with lnmeta train-mil")
        if "backbone" not in ex:
            raise ModelError(where, "MIL model without backbone metadata")
        info = cls(config=MILConfig.from_json(ex.pop("mil")), classes=list(meta.classes),
                   backbone=BackboneInfo.from_json(ex.pop("backbone")),
                   clinical=ClinicalEncoder.from_json(ex.pop("clinical", None)),
                   features=ex.pop("features", {}) or {}, bags=ex.pop("bags", {}) or {},
                   extra=ex, path=None if path is None else str(path))
        if len(info.classes) != info.config.n_classes:
            raise ModelError(where, f"{len(info.classes)} class names for "
                             f"{info.config.n_classes} outputs")
        return info


def build_mil(config: MILConfig) -> MILModel:
    """A freshly initialised :class:`MILModel`."""
    return MILModel(config)


def save_mil(path: str | Path, model: MILModel, info: MILInfo, *,
             overwrite: bool = False) -> Path:
    """Write a MIL model file (safetensors + metadata), atomically."""
    if info.clinical is not None and info.clinical.dim != model.config.clinical_dim:
        raise ModelError(path, f"clinical encoder gives {info.clinical.dim} values, the model "
                         f"takes {model.config.clinical_dim}")
    info.config = model.config
    return save_model(path, model, info.to_meta(), overwrite=overwrite)


def read_mil_info(path: str | Path) -> MILInfo:
    """The :class:`MILInfo` of a MIL model file (header only, no torch tensors read)."""
    return MILInfo.from_meta(read_meta(path), path)


def load_mil(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[MILModel, MILInfo]:
    """Load a MIL model file: the model in eval mode on ``device`` and its :class:`MILInfo`."""
    path = Path(path)
    info = read_mil_info(path)
    tensors, _ = read_safetensors(path)
    model = MILModel(info.config)
    own = model.state_dict()
    stats = ("feature_mean", "feature_std")
    if not any(k in tensors for k in stats):  # a file from before feature standardisation
        tensors = {**tensors, **{k: own[k] for k in stats}}
        info.extra.pop("feature_standardisation", None)
        info.notes.append(f"{path.name}: MIL model file without feature statistics (written "
                          "by an older version): features enter the model unstandardised, "
                          "as it was trained; retrain it to standardise them")
    bad = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors
                                              and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise ModelError(path, f"weights do not fit the MIL architecture in its metadata "
                         f"({', '.join(bad[:3])})")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()}, strict=True)
    model.to(torch.device(device))
    model.eval()
    return model, info


def bag_probabilities(model: MILModel, bags: np.ndarray | torch.Tensor,
                      clinical: np.ndarray | None = None, *, device: str | torch.device = "cpu",
                      batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities ``(B, C)`` and instance weights ``(B, N)`` of bags ``(B, N, D)``."""
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(bags, dtype=np.float32))
    c = None if clinical is None else torch.as_tensor(np.asarray(clinical, np.float32))
    probs, weights = [], []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            cb = None
            if c is not None:
                cb = (c[None] if c.ndim == 1 else c[i:i + batch]).to(dev)
                if cb.shape[0] == 1 and len(x[i:i + batch]) > 1:
                    cb = cb.expand(len(x[i:i + batch]), -1)
            logits, w = model(x[i:i + batch].to(dev), cb)
            probs.append(torch.softmax(logits.float(), 1).cpu().numpy())
            weights.append(w.float().cpu().numpy())
    if not probs:
        return np.zeros((0, model.config.n_classes), np.float32), np.zeros((0, x.shape[1]), np.float32)
    return np.concatenate(probs), np.concatenate(weights)


def relative_attention(logits: np.ndarray) -> np.ndarray:
    """``exp(s - max s)``: softmax weights relative to the top instance (max 1, all > 0)."""
    s = np.asarray(logits, dtype=np.float64)
    if s.size == 0:
        return s.astype(np.float32)
    return np.exp(s - s.max()).astype(np.float32)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def default_classes(n: int) -> list[str]:
    """Seed 002's class names for 2 or 3 classes, else ``class0..``."""
    return list(CLASSES_2 if n == 2 else CLASSES_3 if n == 3 else [f"class{i}" for i in range(n)])


__all__ = ["ATTENTION_POOLINGS", "CLASSES_2", "CLASSES_3", "POOLINGS", "POOLING_ALIASES", "MILConfig", "MILInfo",
           "MILModel", "bag_probabilities", "build_mil", "count_parameters", "default_classes",
           "load_mil", "read_mil_info", "relative_attention", "save_mil"]
