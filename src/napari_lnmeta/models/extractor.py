"""Patch feature extractors: a registry backbone or a trained patch model without its head.

MIL (seeds 002/003) works on one feature vector per patch. The vector is the input of
the classification head, i.e. the backbone's penultimate layer:

* ResNet / RegNet / ShuffleNet / Inception / ``lnmeta_cnn_small``: the globally pooled
  features before ``fc`` (512 for ResNet-18, 2048 for ResNet-50...);
* DenseNet: the pooled features before ``classifier`` (1024 for DenseNet-121);
* VGG / AlexNet: the output of the second fully connected layer (4096), the layer
  before the last ``Linear`` of ``classifier``;
* EfficientNet / MobileNet / ConvNeXt: the input of the last ``Linear``;
* timm models (ViTs and pathology foundation models): timm's pooled features
  (``num_classes=0``), the class token for most ViTs;
* transformers encoders (Phikon, Phikon-v2): the class token of ``last_hidden_state``,
  as their model cards use it (:mod:`._hf`).

A backbone may also be a pretrained name (:mod:`napari_lnmeta.models.backbones`:
``imagenet`` with an architecture, ``timm:...``, ``hf-hub:...``, ``uni``, a folder): it is
loaded from the local cache, at its own input size, mean/std and µm/px.

Every extractor has an identity, :attr:`BackboneInfo.id`: the architecture plus its
weights, ``"random-seed0-<8 hex>"`` for a seeded random initialisation (the hex digits
are a digest of the weights) or ``"sha256:<16 hex>"`` of the weights file (a cached
pretrained checkpoint included; its name is kept in :attr:`BackboneInfo.source`). It is stored
with cached features and with MIL models, so features computed with one backbone are
never fed to a model trained on another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError
from .io import IMAGENET_MEAN, IMAGENET_STD
from .preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

#: default input side for registry backbones (seed 002: 256 x 256 patches)
DEFAULT_PATCH_SIZE = 256

_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path, n: int = 16) -> str:
    """First ``n`` hex digits of the file's SHA-256 (cached per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key][:n]


@dataclass
class BackboneInfo:
    """What produced a set of features; compared before features meet a MIL model.

    Attributes
    ----------
    name
        Registry architecture (``"resnet18"``, ``"vgg16_bn"``, ``"lnmeta_cnn_small"``...).
    weights
        ``"random-seed<k>-<digest>"`` or ``"sha256:<16 hex>"`` of the weights / model file.
    feature_dim
        Length of one feature vector.
    patch_size
        Input side in pixels the features were (or are to be) computed at.
    mpp
        µm/px of the patches (``None``: pixel units / read at a pyramid level).
    mean, std
        Input normalisation after scaling to [0, 1].
    normalisation
        Stain normalisation of a trained patch model (``{"method", "target"}``) or ``None``.
    source
        The model / init file, for messages.
    """

    name: str
    weights: str
    feature_dim: int
    patch_size: int = DEFAULT_PATCH_SIZE
    mpp: float | None = None
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    normalisation: dict | None = None
    source: str | None = None

    @property
    def id(self) -> str:
        """``"<architecture>:<weights>"``: equal ids mean interchangeable features."""
        return f"{self.name}:{self.weights}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "id": self.id}

    def features_key(self) -> tuple:
        """What makes two feature sets interchangeable: the backbone id and the input
        (patch size, mean/std, stain normalisation). The read µm/px is checked with the
        patch grid."""
        return (self.id, int(self.patch_size), tuple(round(float(v), 6) for v in self.mean),
                tuple(round(float(v), 6) for v in self.std),
                None if not self.normalisation else repr(sorted(self.normalisation.items())))

    def describe(self) -> str:
        """One line for messages: id, input size and normalisation."""
        return (f"{self.id} ({self.patch_size} px, mean {[round(v, 3) for v in self.mean]}, "
                f"std {[round(v, 3) for v in self.std]}"
                + (", stain-normalised" if self.normalisation else "") + ")")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackboneInfo:
        keys = ("name", "weights", "feature_dim", "patch_size", "mpp", "mean", "std",
                "normalisation", "source")
        return cls(**{k: d[k] for k in keys if k in d})


def feature_dim_of(model: nn.Module, architecture: str) -> int:
    """Length of the penultimate-layer vector of a built registry model."""
    from .registry import get_arch

    fam = get_arch(architecture).family
    if fam == "timm":
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    if fam in ("resnet", "regnet", "shufflenet", "inception", "lnmeta"):
        return int(model.fc.in_features)
    if fam == "densenet":
        return int(model.classifier.in_features)
    return int(model.classifier[-1].in_features)  # vgg, alexnet, features


def strip_head(model: nn.Module, architecture: str) -> nn.Module:
    """Replace the classification head by ``Identity`` (in place); returns the model."""
    from torch import nn

    from .registry import get_arch

    fam = get_arch(architecture).family
    if fam == "timm":
        model.reset_classifier(0)
    elif fam in ("resnet", "regnet", "shufflenet", "inception", "lnmeta"):
        model.fc = nn.Identity()
    elif fam == "densenet":
        model.classifier = nn.Identity()
    else:
        model.classifier[-1] = nn.Identity()
    return model


def state_digest(model: nn.Module, n: int = 8) -> str:
    """First ``n`` hex digits of a SHA-1 over a model's state dict (names and values).

    Identifies a randomly initialised backbone: the same seed gives the same weights only
    with the same torch build, so the id carries the weights themselves, not just the seed.
    """
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()[:n]


def _is_file(backbone: str | Path) -> bool:
    from .backbones import is_named

    s = str(backbone)
    if is_named(s):
        return False
    return s.endswith(".safetensors") or os.sep in s or Path(s).is_file()


def load_extractor(backbone: str | Path, *, init: str | Path | None = None, seed: int = 0,
                   patch_size: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, BackboneInfo]:
    """Build a feature extractor (eval mode, on ``device``) and its :class:`BackboneInfo`.

    Parameters
    ----------
    backbone
        A registry architecture name (``timm:MODEL`` included), a pretrained name
        (``hf-hub:ORG/NAME``, ``timm:MODEL.TAG``, ``uni``, a folder; see
        :mod:`~napari_lnmeta.models.backbones`) or a trained patch-model ``.safetensors``
        file (its penultimate layer is used, at the model's patch size and µm/px).
    init
        Weights for a registry backbone: a safetensors file or a pretrained name
        (``imagenet``...). Without it a registry backbone is randomly initialised from
        ``seed`` (reproducible; a baseline, or for tests).
    patch_size
        Input side; defaults to the model file's or :data:`DEFAULT_PATCH_SIZE`.

    Raises
    ------
    ModelError
        Unknown architecture, a bad model file, or a MIL model given as a backbone.
    """
    import torch

    from .io import load_model, read_meta
    from .registry import build_model, get_arch

    if _is_file(backbone):
        path = Path(backbone)
        meta = read_meta(path)
        if meta.architecture.startswith("mil:"):
            raise ModelError(path, "is a MIL model, not a patch model; give a registry "
                             "backbone name or a patch-classifier file as the backbone")
        model, meta = load_model(path, device="cpu")
        dim = feature_dim_of(model, meta.architecture)
        strip_head(model, meta.architecture)
        info = BackboneInfo(name=meta.architecture, weights=f"sha256:{file_digest(path)}",
                            feature_dim=dim, patch_size=int(patch_size or meta.patch_size),
                            mpp=meta.mpp, mean=list(meta.mean), std=list(meta.std),
                            normalisation=meta.normalisation, source=str(path))
    else:
        from .backbones import is_named, resolve
        from .registry import INIT_ATTR

        name = str(backbone)
        src = None
        if is_named(name) and name != "imagenet":
            if init is not None:
                raise ModelError(name, "is pretrained already; give --init only with a "
                                 "registry architecture")
            src = resolve(name)
            init, name = name, src.architecture
        elif is_named(init):
            src = resolve(str(init), name)
        if src is not None and src.is_transformers:
            return _transformers_extractor(src, patch_size, device)
        arch = get_arch(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = build_model(name, 1, init=init)
        dim = feature_dim_of(model, name)
        strip_head(model, name)
        prov = getattr(model, INIT_ATTR, None)
        weights = (f"sha256:{prov['weights_sha256'][:16]}" if prov is not None
                   else f"random-seed{int(seed)}-{state_digest(model)}")
        default_ps = src.input_size if src is not None else (
            _timm_input_size(model) if arch.family == "timm" else DEFAULT_PATCH_SIZE)
        ps = int(patch_size or default_ps)
        if ps < arch.min_size:
            raise ModelError(name, f"patches of {ps} px are too small for {name} "
                             f"(at least {arch.min_size} px)")
        kw = {}
        if src is not None:
            kw = {"mean": list(src.mean), "std": list(src.std), "mpp": src.mpp}
        elif arch.family == "timm":
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            if cfg.get("mean"):
                kw = {"mean": [float(v) for v in cfg["mean"]],
                      "std": [float(v) for v in cfg["std"]]}
        info = BackboneInfo(name=name, weights=weights, feature_dim=dim, patch_size=ps,
                            source=(src.id if src is not None
                                    else None if init is None else str(init)), **kw)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(torch.device(device))
    return model, info


def _transformers_extractor(src, patch_size: int | None,
                            device) -> tuple[nn.Module, BackboneInfo]:
    """A transformers encoder (Phikon, Phikon-v2...): the class token of its last hidden
    state, at the input size and mean/std of its ``preprocessor_config.json``."""
    import torch

    from ._hf import build_extractor

    model = build_extractor(src)
    ps = int(patch_size or src.input_size)
    if ps < 16:
        raise ModelError(src.spec, f"patches of {ps} px are too small for {src.id}")
    info = BackboneInfo(name=src.architecture, weights=f"sha256:{src.weights_sha256()[:16]}",
                        feature_dim=int(model.num_features), patch_size=ps, mpp=src.mpp,
                        mean=list(src.mean), std=list(src.std), source=src.id)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(torch.device(device))
    return model, info


def _timm_input_size(model) -> int:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return int((cfg.get("input_size") or (3, 224, 224))[-1])


def auto_batch_size(model: nn.Module, info: BackboneInfo, device, *, requested: int,
                    fraction: float = 0.6) -> int:
    """A forward batch that fits the free memory of a CUDA device (``requested`` on CPU).

    Estimates the activation memory per patch from one probing forward pass of two
    patches (peak allocated bytes minus the weights), then takes ``fraction`` of the
    free memory; never more than ``requested``, never less than 1. For a ViT the token
    activations and attention maps dominate, which the probe measures as they are.
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return int(requested)
    free, _ = torch.cuda.mem_get_info(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    x = torch.zeros(2, 3, info.patch_size, info.patch_size, device=dev)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        model(x)
    per = max(1, (torch.cuda.max_memory_allocated(dev) - base) // 2)
    fit = int(free * fraction // per)
    return int(max(1, min(int(requested), fit)))


class Preprocessor(Preprocess):
    """uint8 ``(B, H, W, 3)`` patches -> normalised float NCHW on the device, for a
    :class:`BackboneInfo`: the :class:`~napari_lnmeta.models.preprocess.Preprocess` every
    patch network uses, with the backbone's mean/std.

    A trained patch model whose metadata asks for stain normalisation needs its
    normaliser passed in as ``stain`` (models sit below the stain code);
    :func:`napari_lnmeta.core.features.make_preprocessor` builds both.
    """

    def __init__(self, info: BackboneInfo, device: str | torch.device, *,
                 stain: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if info.normalisation and stain is None:
            raise ValueError(f"{info.describe()} asks for stain normalisation: pass stain= "
                             "(core.features.make_preprocessor does)")
        super().__init__(info.mean, info.std, device=device, stain=stain)


__all__ = ["DEFAULT_PATCH_SIZE", "BackboneInfo", "Preprocessor", "auto_batch_size", "feature_dim_of", "file_digest",
           "load_extractor", "state_digest", "strip_head"]
