"""Registration inputs: slides or arrays read at a chosen downsample (:class:`_Source`),
their stain-invariant representation and tissue foreground.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import InputError
from .transform import SlideInfo

if TYPE_CHECKING:

    from ...io.slide import Slide

# --------------------------------------------------------------------------------------
# Inputs: slides or arrays, read at a chosen downsample
# --------------------------------------------------------------------------------------
class _Source:
    """A slide or an RGB array, with its level-0 shape, µm/px and low-resolution reads."""

    def __init__(self, obj: Slide | np.ndarray | str | Path, mpp: float | None = None,
                 name: str | None = None):
        from ...io.slide import Slide, open_slide

        self.slide: Slide | None = None
        self.array: np.ndarray | None = None
        if isinstance(obj, (str, Path)):
            obj = open_slide(obj, mpp=mpp)
        if isinstance(obj, Slide):
            self.slide = obj
            self.shape = tuple(int(v) for v in obj.shape)
            self.mpp = obj.mpp if mpp is None else float(mpp)
            self.name = name or obj.name
            self.path = str(obj.path)
        else:
            arr = np.asarray(obj)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            if arr.ndim != 3 or arr.shape[2] < 3:
                raise InputError(f"{name or 'image'}: expected an RGB image, got shape {arr.shape}")
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            self.array = np.ascontiguousarray(arr[..., :3])
            self.shape = arr.shape[:2]
            self.mpp = None if mpp is None else float(mpp)
            self.name = name or "image"
            self.path = None
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def info(self) -> SlideInfo:
        return SlideInfo(self.name, self.shape, self.mpp, self.path)

    def read(self, size: tuple[int, int]) -> np.ndarray:
        """The whole image resampled (box filter) to ``size = (h, w)``."""
        from PIL import Image

        size = (max(int(size[0]), 1), max(int(size[1]), 1))
        if size in self._cache:
            return self._cache[size]
        if self.array is not None:
            src = self.array
        else:
            slide = self.slide
            ds = min(slide.shape[0] / size[0], slide.shape[1] / size[1])
            pyr = slide.pyramid()
            dss = [(slide.shape[0] / p.shape[0] + slide.shape[1] / p.shape[1]) / 2 for p in pyr]
            idx = max((i for i, d in enumerate(dss) if d <= ds * 1.001), default=0)
            src = np.asarray(pyr[idx].compute(scheduler="threads"))
        if src.shape[:2] == size:
            out = np.ascontiguousarray(src)
        else:
            out = np.asarray(Image.fromarray(src).resize((size[1], size[0]), Image.BOX))
        self._cache[size] = out
        return out


# --------------------------------------------------------------------------------------
# Image representation and foreground
# --------------------------------------------------------------------------------------
def representation(rgb: np.ndarray, kind: str = "haematoxylin") -> np.ndarray:
    """Stain-invariant float32 image: 0 on glass, about 1 on dense tissue.

    ``"haematoxylin"``: the H concentration of Ruifrok colour deconvolution (both H&E and
    DAB IHC have a haematoxylin counterstain); ``"grey"``: mean optical density. Each is
    divided by its 99th percentile over the foreground so stain intensity differences
    between the two slides do not matter.
    """
    from ..stain import deconvolve, rgb_to_od

    rep = deconvolve(rgb)[..., 0] if kind == "haematoxylin" else rgb_to_od(rgb).mean(-1)
    rep = rep.astype(np.float32)
    fg = rep[foreground(rgb)]
    scale = float(np.percentile(fg, 99)) if fg.size > 16 else float(rep.max() or 1.0)
    return np.clip(rep / max(scale, 1e-6), 0, 2).astype(np.float32)


def foreground(rgb: np.ndarray, *, min_od: float = 0.05) -> np.ndarray:
    """Tissue (anything that absorbs light) at low resolution, for registration only.

    Otsu on the grey optical density, never below ``min_od`` so a blank slide gives an
    empty mask; a small closing joins sparse tissue (lung alveoli, fat).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from ..stain import rgb_to_od

    od = ndi.uniform_filter(rgb_to_od(rgb).mean(-1), 3)
    thr = min_od
    if od.max() > min_od and od.min() < od.max():
        thr = max(float(threshold_otsu(od)) * 0.5, min_od)
    mask = od > thr
    mask = ndi.binary_closing(mask, structure=np.ones((5, 5)), border_value=0)
    return ndi.binary_fill_holes(mask) if mask.mean() < 0.5 else mask
