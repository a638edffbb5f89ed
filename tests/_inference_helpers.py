"""Shared test data for the inference tests (core, widget, CLI).

A synthetic slide made of real CAMELYON16 tumor_001 pixels: dark lymph-node cortex as
"normal" tissue, a white (glass) band on the left, and "tumour" patches filled with real
tumour pixels (inside the expert annotation) planted at known level-0 boxes. A tiny
deterministic model scores the mean redness (R - B) of a patch, which separates a patch
that is entirely tumour from one that is half tumour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conftest import write_pyramid_tiff

PATCH = 64
MPP = 0.5
#: slide (height, width): not a multiple of the patch
SHAPE = (900, 740)
#: width of the glass (white) band on the left, level-0 px
GLASS = 128
#: planted tumour boxes' top-left corners (aligned to 64 px)
TUMOUR_64 = [(128, 256), (384, 512), (832, 640), (640, 192)]
#: planted boxes aligned to 32 px only (each straddles two 64-px patches)
TUMOUR_32 = [(224, 416), (544, 352)]

#: normal cortex and tumour source boxes in tumor_001_level5.tif (row, col, size)
_NORMAL_SRC = (2432, 1216, 128)
_TUMOUR_CENTRE = (3927, 2226)  # deepest point inside the annotation (33 px from its edge)
_TUMOUR_HALF = 23


@dataclass
class SyntheticSlide:
    path: Path
    tumour_64: list[tuple[int, int]]
    tumour_32: list[tuple[int, int]]
    tumour_rb: float
    normal_rb: float
    truth: np.ndarray  # bool (H, W) level-0 tumour mask


def _sources(camelyon: Path) -> tuple[np.ndarray, np.ndarray]:
    import tifffile
    from PIL import Image

    img = tifffile.imread(camelyon / "tumor_001_level5.tif")
    mask = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0
    r, c, s = _NORMAL_SRC
    normal = img[r:r + s, c:c + s]
    cy, cx = _TUMOUR_CENTRE
    h = _TUMOUR_HALF
    tumour = img[cy - h:cy + h, cx - h:cx + h]
    assert mask[cy - h:cy + h, cx - h:cx + h].all(), "tumour source must lie inside the annotation"
    return normal, tumour


def _tile(src: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fill ``shape`` with mirrored copies of ``src`` (no seams, only real pixels)."""
    block = np.concatenate([src, src[:, ::-1]], 1)
    block = np.concatenate([block, block[::-1]], 0)
    reps = (-(-shape[0] // block.shape[0]), -(-shape[1] // block.shape[1]))
    return np.ascontiguousarray(np.tile(block, (reps[0], reps[1], 1))[:shape[0], :shape[1]])


def make_synthetic_slide(tmp_path: Path, camelyon: Path, *, name: str = "synthetic.ome.tif",
                         shape: tuple[int, int] = SHAPE) -> SyntheticSlide:
    normal, tumour = _sources(camelyon)
    img = _tile(normal, shape)
    img[:, :GLASS] = 245
    truth = np.zeros(shape, dtype=bool)
    tpatch = _tile(tumour, (PATCH, PATCH))
    for y, x in TUMOUR_64 + TUMOUR_32:
        img[y:y + PATCH, x:x + PATCH] = tpatch
        truth[y:y + PATCH, x:x + PATCH] = True
    path = write_pyramid_tiff(tmp_path / name, img, levels=2, mpp=MPP, tile=128,
                              compression="zlib")

    def rb(a):
        a = a.astype(np.float64)
        return float(((a[..., 0] - a[..., 2]) / 255).mean())

    return SyntheticSlide(path=path, tumour_64=list(TUMOUR_64), tumour_32=list(TUMOUR_32),
                          tumour_rb=rb(tpatch), normal_rb=rb(_tile(normal, (PATCH, PATCH))),
                          truth=truth)


def redness_model(slide: SyntheticSlide):
    """A real nn.Module: logit = k * (mean(R - B) - t), t between full and half tumour."""
    import torch
    from torch import nn

    from napari_lnmeta.models.io import ModelMeta

    full, half = slide.tumour_rb, (slide.tumour_rb + slide.normal_rb) / 2
    t = (full + half) / 2

    class Redness(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("t", torch.tensor(float(t)))
            self.k = 400.0

        def forward(self, x):
            rb = (x[:, 0] - x[:, 2]).mean(dim=(1, 2))
            z = self.k * (rb - self.t)
            return torch.stack([torch.zeros_like(z), z], dim=1)

    meta = ModelMeta(architecture="redness", classes=["normal", "tumour"], patch_size=PATCH,
                     mpp=MPP, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return Redness().eval(), meta


def small_model_file(path: Path, *, patch_size: int = 32, mpp: float | None = 2.0,
                     classes=("normal", "tumour"), seed: int = 0) -> Path:
    """A real (randomly initialised) lnmeta_cnn_small saved with save_model.

    32 px patches at 2 µm/px: a few dozen patches on the synthetic slide, so tests that
    need a model *file* stay fast on a shared 2-core CPU.
    """
    import torch

    from napari_lnmeta.models.io import ModelMeta, save_model
    from napari_lnmeta.models.registry import build_model

    torch.manual_seed(seed)
    net = build_model("lnmeta_cnn_small", len(classes)).eval()
    meta = ModelMeta(architecture="lnmeta_cnn_small", classes=list(classes),
                     patch_size=patch_size, mpp=mpp)
    return save_model(path, net, meta, overwrite=True)
