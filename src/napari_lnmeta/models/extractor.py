"""Patch feature extractors: a registry backbone or a trained patch model without its head.

MIL (seeds 002/003) works on one feature vector per patch. The vector is the input of
the classification head, i.e. the backbone's penultimate layer:

* ResNet / RegNet / ShuffleNet / Inception / ``lnmeta_cnn_small``: the globally pooled
  features before ``fc`` (512 for ResNet-18, 2048 for ResNet-50...);
* DenseNet: the pooled features before ``classifier`` (1024 for DenseNet-121);
* VGG / AlexNet: the output of the second fully connected layer (4096), the layer
  before the last ``Linear`` of ``classifier``;
* EfficientNet / MobileNet / ConvNeXt: the input of the last ``Linear``.

Every extractor has an identity, :attr:`BackboneInfo.id`: the architecture plus its
weights, ``"random-seed0-<8 hex>"`` for a seeded random initialisation (the hex digits
are a digest of the weights) or ``"sha256:<16 hex>"`` of the weights file. It is stored
with cached features and with MIL models, so features computed with one backbone are
never fed to a model trained on another.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError
from .io import IMAGENET_MEAN, IMAGENET_STD

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

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackboneInfo:
        keys = ("name", "weights", "feature_dim", "patch_size", "mpp", "mean", "std",
                "normalisation", "source")
        return cls(**{k: d[k] for k in keys if k in d})


def feature_dim_of(model: nn.Module, architecture: str) -> int:
    """Length of the penultimate-layer vector of a built registry model."""
    from .registry import get_arch

    fam = get_arch(architecture).family
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
    if fam in ("resnet", "regnet", "shufflenet", "inception", "lnmeta"):
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
    s = str(backbone)
    return s.endswith(".safetensors") or os.sep in s or Path(s).is_file()


def load_extractor(backbone: str | Path, *, init: str | Path | None = None, seed: int = 0,
                   patch_size: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, BackboneInfo]:
    """Build a feature extractor (eval mode, on ``device``) and its :class:`BackboneInfo`.

    Parameters
    ----------
    backbone
        A registry architecture name, or a trained patch-model ``.safetensors`` file
        (its penultimate layer is used, at the model's patch size and µm/px).
    init
        Safetensors weights for a registry backbone (e.g. converted ImageNet weights).
        Without it the backbone is randomly initialised from ``seed`` (reproducible, but
        only useful as a baseline or for tests: this product downloads no weights).
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
        name = str(backbone)
        arch = get_arch(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = build_model(name, 1, init=init)
        dim = feature_dim_of(model, name)
        strip_head(model, name)
        weights = (f"sha256:{file_digest(init)}" if init is not None
                   else f"random-seed{int(seed)}-{state_digest(model)}")
        ps = int(patch_size or DEFAULT_PATCH_SIZE)
        if ps < arch.min_size:
            raise ModelError(name, f"patches of {ps} px are too small for {name} "
                             f"(at least {arch.min_size} px)")
        info = BackboneInfo(name=name, weights=weights, feature_dim=dim, patch_size=ps,
                            source=None if init is None else str(init))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(torch.device(device))
    return model, info


class Preprocessor:
    """uint8 ``(B, H, W, 3)`` patches -> normalised float NCHW on the device.

    Applies the stain normalisation of a trained patch model when its metadata has one,
    then the mean/std of :class:`BackboneInfo`.
    """

    def __init__(self, info: BackboneInfo, device: str | torch.device):
        import torch

        self.device = torch.device(device)
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)
        self.stain = None
        if info.normalisation:
            from ..core.stain import torch_normaliser

            self.stain = torch_normaliser(info.normalisation, device=self.device)

    def __call__(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(patches)) if isinstance(patches, np.ndarray) \
            else patches
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if self.stain is not None:
            x = self.stain(x)
        return ((x - self.mean) / self.std).contiguous()


__all__ = ["DEFAULT_PATCH_SIZE", "BackboneInfo", "Preprocessor", "feature_dim_of", "file_digest",
           "load_extractor", "state_digest", "strip_head"]
