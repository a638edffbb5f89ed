"""Augmentations as composable torchvision-v2-style modules that run on batches, on the device.

Every transform here is a ``torch.nn.Module`` taking a float batch ``(B, 3, H, W)`` in
[0, 1] and drawing its random parameters **per sample** (torchvision's own v2
transforms draw one set of parameters per call, i.e. per batch). They compose with
:class:`torchvision.transforms.v2.Compose`; a torchvision transform that has no batched
form (rotation, shear, erasing, AutoAugment, RandAugment, TrivialAugmentWide, AugMix) is
applied sample by sample, still on the device, by :class:`PerSample`.

Named presets (:func:`make_augment`):

``none``
    identity.
``flips``
    the 8 dihedral transforms.
``photometric``
    seed 000's: grayscale, HSV saturation, Gaussian noise, salt-and-pepper noise, RGB
    channel split, contrast α / brightness β (each with a probability).
``policy-trivialaugment``
    seed 003's: flips, rotation ≤ 10°, shear, TrivialAugmentWide, random erasing;
    ``policy-autoaugment`` / ``policy-randaugment`` / ``policy-augmix`` use that policy
    instead.
``dihedral-jitter``
    seed 004's: 8 dihedral transforms + colour jitter (hue 0.04, saturation 0.25,
    contrast 0.75, brightness 64/255 additive).
``stain``
    HED stain jitter (Tellez et al. 2018 style, on Ruifrok & Johnston vectors) + flips.

Parameter ranges that the seeds give in units that would destroy an image when read
literally (seed 000: contrast α ∈ [0, 10], salt-and-pepper probability ∈ [0, 1], HSV
saturation 1–180) are kept in the same form with conservative defaults; every range
is a constructor argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .options import AUGMENT_PRESETS as PRESETS
from .options import augment_name


def _uniform(b: int, lo: float, hi: float, x: torch.Tensor) -> torch.Tensor:
    return torch.empty(b, device=x.device, dtype=x.dtype).uniform_(lo, hi).view(b, 1, 1, 1)


def _coin(b: int, p: float, x: torch.Tensor) -> torch.Tensor:
    return (torch.rand(b, device=x.device) < p).view(b, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(choices):
        m = i == k
        out[:, 0] = torch.where(m, rr, out[:, 0])
        out[:, 1] = torch.where(m, gg, out[:, 1])
        out[:, 2] = torch.where(m, bb, out[:, 2])
    return out


class _Base(nn.Module):
    """Per-sample random transform of a float batch; ``p`` is the chance per sample."""

    def __init__(self, p: float = 1.0):
        super().__init__()
        if not 0 <= p <= 1:
            raise InputError(f"probability must be in [0, 1], got {p}")
        self.p = float(p)

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return x
        y = self.apply(x)
        if self.p >= 1:
            return y
        return torch.where(_coin(x.shape[0], self.p, x), y, x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
class RandomDihedral(_Base):
    """One of the 8 symmetries of the square per sample (seed 004); flips only if H != W."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        square = x.shape[-1] == x.shape[-2]
        k = torch.randint(0, 8 if square else 4, (b,), device="cpu")
        if self.p < 1:
            k[torch.rand(b) >= self.p] = 0
        out = x.clone()
        for code in k.unique().tolist():
            if code == 0:
                continue
            idx = (k == code).nonzero().flatten().to(x.device)
            y = x.index_select(0, idx)
            if square:
                y = torch.rot90(y, code % 4, dims=(-2, -1))
                if code >= 4:
                    y = torch.flip(y, dims=(-1,))
            else:
                if code & 1:
                    y = torch.flip(y, dims=(-1,))
                if code & 2:
                    y = torch.flip(y, dims=(-2,))
            out.index_copy_(0, idx, y)
        return out


class RandomFlips(_Base):
    """Independent horizontal and vertical flips per sample (probability 0.5 each)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = _coin(b, 0.5 * self.p, x)
        x = torch.where(h, torch.flip(x, dims=(-1,)), x)
        v = _coin(b, 0.5 * self.p, x)
        return torch.where(v, torch.flip(x, dims=(-2,)), x)


# --------------------------------------------------------------------------------------
# Colour and noise (seed 000)
# --------------------------------------------------------------------------------------
class RandomGrayscale(_Base):
    """Replace a sample by its luma (3 equal channels)."""

    def __init__(self, p: float = 0.1):
        super().__init__(p)

    def apply(self, x):
        return _gray(x).expand_as(x)


class HSVSaturation(_Base):
    """Multiply HSV saturation by a factor drawn uniformly from ``factor`` per sample.

    Seed 000 draws "saturation values between 1 and 180" (an OpenCV-style absolute
    value); a multiplicative factor keeps the tissue's own saturation pattern.
    """

    def __init__(self, factor: tuple[float, float] = (0.5, 1.5), p: float = 0.3):
        super().__init__(p)
        self.factor = tuple(float(v) for v in factor)

    def apply(self, x):
        hsv = rgb_to_hsv(x)
        f = _uniform(x.shape[0], *self.factor, x)[:, 0]
        hsv[:, 1] = (hsv[:, 1] * f).clamp(0, 1)
        return hsv_to_rgb(hsv)


class GaussianNoise(_Base):
    """Add N(mean, sigma²) noise; ``sigma`` drawn per sample from ``sigma`` (0–255 units).

    Seed 000: "Gaussian noise with mean values randomly selected from 0 to 10"; here
    the 0–10 range is the standard deviation on the 0–255 scale (a mean shift is the
    brightness β below).
    """

    def __init__(self, sigma: tuple[float, float] = (0.0, 10.0), mean: float = 0.0, p: float = 0.3):
        super().__init__(p)
        self.sigma = tuple(float(v) for v in sigma)
        self.mean = float(mean)

    def apply(self, x):
        s = _uniform(x.shape[0], *self.sigma, x) / 255.0
        return (x + self.mean / 255.0 + s * torch.randn_like(x)).clamp(0, 1)


class SaltPepper(_Base):
    """Set a fraction of pixels (drawn per sample from ``amount``) to black or white."""

    def __init__(self, amount: tuple[float, float] = (0.0, 0.05), p: float = 0.2):
        super().__init__(p)
        self.amount = tuple(float(v) for v in amount)

    def apply(self, x):
        b, _, h, w = x.shape
        a = _uniform(b, *self.amount, x)
        u = torch.rand(b, 1, h, w, device=x.device, dtype=x.dtype)
        salt = u < a / 2
        pepper = (u >= a / 2) & (u < a)
        y = torch.where(salt, torch.ones_like(x), x)
        return torch.where(pepper, torch.zeros_like(x), y)


class ChannelSplit(_Base):
    """Show one RGB channel (chosen per sample) in all three channels ("RGB split")."""

    def __init__(self, p: float = 0.05):
        super().__init__(p)

    def apply(self, x):
        b = x.shape[0]
        c = torch.randint(0, 3, (b,), device=x.device)
        return x[torch.arange(b, device=x.device), c].unsqueeze(1).expand_as(x)


class ContrastBrightness(_Base):
    """``α x + β`` per sample (OpenCV ``convertScaleAbs`` form; β in 0–255 units)."""

    def __init__(self, alpha: tuple[float, float] = (0.75, 1.25),
                 beta: tuple[float, float] = (0.0, 10.0), p: float = 0.3):
        super().__init__(p)
        self.alpha = tuple(float(v) for v in alpha)
        self.beta = tuple(float(v) for v in beta)

    def apply(self, x):
        b = x.shape[0]
        return (x * _uniform(b, *self.alpha, x) + _uniform(b, *self.beta, x) / 255.0).clamp(0, 1)


# --------------------------------------------------------------------------------------
# Colour jitter (seed 004) and stain jitter
# --------------------------------------------------------------------------------------
class ColorJitter(_Base):
    """Per-sample brightness (additive delta), contrast, saturation and hue jitter.

    Seed 004's values: ``brightness=64/255`` (TensorFlow ``random_brightness``
    max-delta), ``contrast=0.75``, ``saturation=0.25``, ``hue=0.04`` (factors in
    ``[1 - c, 1 + c]``, hue shift in turns).
    """

    def __init__(self, brightness: float = 64 / 255, contrast: float = 0.75,
                 saturation: float = 0.25, hue: float = 0.04, p: float = 1.0):
        super().__init__(p)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)

    def apply(self, x):
        b = x.shape[0]
        if self.brightness:
            x = (x + _uniform(b, -self.brightness, self.brightness, x)).clamp(0, 1)
        if self.contrast:
            f = _uniform(b, max(0.0, 1 - self.contrast), 1 + self.contrast, x)
            m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (m + f * (x - m)).clamp(0, 1)
        if self.saturation:
            f = _uniform(b, max(0.0, 1 - self.saturation), 1 + self.saturation, x)
            g = _gray(x)
            x = (g + f * (x - g)).clamp(0, 1)
        if self.hue:
            hsv = rgb_to_hsv(x)
            hsv[:, 0] = (hsv[:, 0] + _uniform(b, -self.hue, self.hue, x)[:, 0]) % 1.0
            x = hsv_to_rgb(hsv)
        return x


class HEDJitter(_Base):
    """Stain augmentation: scale and shift haematoxylin, eosin and DAB concentrations.

    Colour deconvolution with the Ruifrok & Johnston vectors of
    :mod:`napari_lnmeta.core.stain`; each stain's optical density is multiplied by a
    factor in ``[1 - sigma, 1 + sigma]`` and shifted by ``[-bias, bias]`` per sample.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05, p: float = 1.0):
        super().__init__(p)
        self.sigma, self.bias = float(sigma), float(bias)

    def apply(self, x):
        from ..core.stain import RUIFROK_HED

        m = torch.as_tensor(RUIFROK_HED, dtype=x.dtype, device=x.device)  # (3 stains, 3 rgb)
        minv = torch.linalg.inv(m)
        b = x.shape[0]
        od = -torch.log(x.clamp_min(1 / 255.0))                      # (B, 3, H, W)
        conc = torch.einsum("bchw,cs->bshw", od, minv)              # stains
        a = torch.empty(b, 3, 1, 1, device=x.device, dtype=x.dtype).uniform_(1 - self.sigma, 1 + self.sigma)
        s = torch.empty(b, 3, 1, 1, device=x.device, dtype=x.dtype).uniform_(-self.bias, self.bias)
        od2 = torch.einsum("bshw,sc->bchw", conc * a + s, m)
        return torch.exp(-od2).clamp(0, 1)


# --------------------------------------------------------------------------------------
# torchvision transforms applied per sample
# --------------------------------------------------------------------------------------
class PerSample(nn.Module):
    """Apply a torchvision (v2) transform to each sample separately.

    ``uint8=True`` converts to uint8 around the transform (AutoAugment and friends are
    defined on 8-bit images).
    """

    def __init__(self, transform: Callable, *, uint8: bool = False, p: float = 1.0):
        super().__init__()
        self.transform = transform
        self.uint8 = uint8
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        pick = torch.rand(x.shape[0]) < self.p
        for i in pick.nonzero().flatten().tolist():
            xi = x[i]
            if self.uint8:
                y = self.transform((xi * 255 + 0.5).clamp(0, 255).to(torch.uint8))
                out[i] = y.to(x.dtype) / 255.0
            else:
                out[i] = self.transform(xi)
        return out

    def extra_repr(self) -> str:
        return f"{self.transform!r}, p={self.p}"


class StainNormalise(nn.Module):
    """Normalise every sample with a fitted stain normaliser (runs on the CPU).

    ``normaliser`` is any object with ``transform(rgb uint8 (H, W, 3)) -> rgb uint8``
    (the Macenko / Vahadane / Reinhard normalisers of :mod:`napari_lnmeta.core.stain`).
    """

    def __init__(self, normaliser: Any):
        super().__init__()
        if not hasattr(normaliser, "transform"):
            raise InputError("a stain normaliser needs a transform(rgb) method")
        self.normaliser = normaliser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np
        arr = (x.detach().permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        out = np.stack([np.asarray(self.normaliser.transform(a)) for a in arr])
        return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255.0


class Augment(nn.Module):
    """A sequence of batch transforms; accepts uint8 or float input, returns float [0, 1]."""

    def __init__(self, transforms: Sequence[Any] = (), name: str = "custom"):
        super().__init__()
        self.transforms = nn.ModuleList([t if isinstance(t, nn.Module) else _Wrap(t)
                                            for t in transforms])
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        for t in self.transforms:
            x = t(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def make_augment(preset: str = "none", **overrides: Any) -> Augment:
    """A named augmentation preset (see module docstring).

    ``overrides`` are passed to the seed-000 transforms by class name in lower case,
    e.g. ``make_augment("photometric", gaussiannoise={"p": 0.5})``. The earlier preset
    names (``seed000``, ``seed003[-POLICY]``, ``seed004``) are still accepted.
    """
    from torchvision.transforms import v2

    preset = augment_name(preset)
    if preset not in PRESETS:
        raise InputError(f"unknown augmentation preset {preset!r}; choose one of "
                         + ", ".join(PRESETS))

    def kw(cls):
        return overrides.get(cls.__name__.lower(), {})

    if preset == "none":
        ts: list[Any] = []
    elif preset == "flips":
        ts = [RandomDihedral()]
    elif preset == "photometric":
        ts = [RandomGrayscale(**kw(RandomGrayscale)), HSVSaturation(**kw(HSVSaturation)),
              GaussianNoise(**kw(GaussianNoise)), SaltPepper(**kw(SaltPepper)),
              ChannelSplit(**kw(ChannelSplit)), ContrastBrightness(**kw(ContrastBrightness))]
    elif preset.startswith("policy-"):
        policy = preset.split("-", 1)[1]
        pol = {"autoaugment": v2.AutoAugment(), "randaugment": v2.RandAugment(),
               "augmix": v2.AugMix(), "trivialaugment": v2.TrivialAugmentWide()}[policy]
        ts = [RandomFlips(),
              PerSample(v2.RandomAffine(degrees=10, shear=10, fill=1.0), p=0.5),
              PerSample(pol, uint8=True, p=0.5),
              PerSample(v2.RandomErasing(p=1.0, scale=(0.02, 0.15), value=1.0), p=0.25)]
    elif preset == "dihedral-jitter":
        ts = [RandomDihedral(), ColorJitter(**kw(ColorJitter))]
    elif preset == "stain":
        ts = [RandomDihedral(), HEDJitter(**kw(HEDJitter))]
    else:  # pragma: no cover
        raise AssertionError(preset)
    return Augment(ts, name=preset)


def describe(preset: str) -> str:
    """One line per transform of a preset (for --help and the docs)."""
    return "\n".join(repr(t).replace("\n", " ") for t in make_augment(preset).transforms) or "identity"


__all__ = ["PRESETS", "Augment", "ChannelSplit", "ColorJitter", "ContrastBrightness",
           "GaussianNoise", "HEDJitter", "HSVSaturation", "PerSample", "RandomDihedral",
           "RandomFlips", "RandomGrayscale", "SaltPepper", "StainNormalise", "describe",
           "hsv_to_rgb", "make_augment", "rgb_to_hsv"]
