"""Images for judging a registration by eye: the whole H&E and the registered IHC on one
low-resolution grid, their checkerboard, and the difference of their haematoxylin
densities (dark where the two agree).

Used by the "Register IHC" widget (in its worker) and by ``lnmeta check-registration``.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...progress import Progress

if TYPE_CHECKING:
    from ...io.frame import SlideFrame
    from ...io.slide import Slide
    from .transform import Transform

#: the views :func:`RegistrationCheck.view` makes
VIEWS = ("checkerboard", "difference")


@dataclass
class RegistrationCheck:
    """The H&E (``fixed``) and registered IHC (``moving``), both RGB uint8 on the grid
    of ``frame`` (the whole H&E at ``frame.downsample`` level-0 px per pixel)."""

    fixed: np.ndarray
    moving: np.ndarray
    frame: SlideFrame

    def checkerboard(self, squares: int = 8) -> np.ndarray:
        """Alternating squares of H&E and registered IHC, ``squares`` along the longest
        side (RGB uint8)."""
        side = max(1, max(self.fixed.shape[:2]) // max(1, int(squares)))
        yy, xx = np.indices(self.fixed.shape[:2])
        board = ((yy // side + xx // side) % 2).astype(bool)
        return np.where(board[..., None], self.moving, self.fixed)

    def difference(self) -> np.ndarray:
        """``|H(fixed) - H(moving)|`` of the haematoxylin representations (float32, in
        [0, 1]: 0 where they agree)."""
        from .inputs import representation

        return np.abs(representation(self.fixed) - representation(self.moving))

    def view(self, mode: str, *, squares: int = 8) -> np.ndarray:
        if mode == "checkerboard":
            return self.checkerboard(squares)
        if mode == "difference":
            return self.difference()
        raise ValueError(f"unknown view {mode!r} (one of {', '.join(VIEWS)})")


def registration_check_job(transform: Transform, fixed: Slide, moving: Slide, *,
                           size: int = 1024) -> Generator[Progress, None, RegistrationCheck]:
    """Read the whole H&E and warp the IHC onto it at ``size`` px (longest side); a
    progress generator returning a :class:`RegistrationCheck`. Bounded work: two images
    of at most ``size`` px a side."""
    from ...io.frame import SlideFrame
    from ..dab import _check_transform_fits
    from .warp import read_mapped

    _check_transform_fits(transform, fixed, moving)
    h0, w0 = fixed.shape
    ds = max(1.0, max(h0, w0) / int(size))
    shape = (max(1, int(np.ceil(h0 / ds))), max(1, int(np.ceil(w0 / ds))))
    yield Progress(0, 2, f"reading the H&E at {shape[1]}x{shape[0]} px")
    coords = np.stack(np.meshgrid(np.arange(shape[0]) * ds + (ds - 1) / 2,
                                  np.arange(shape[1]) * ds + (ds - 1) / 2, indexing="ij"))
    fixed_rgb = read_mapped(fixed, coords, ds)
    yield Progress(1, 2, "warping the IHC")
    moving_rgb = transform.warp_slide_region(moving, (0.0, 0.0), shape, ds)
    yield Progress(2, 2, "registration check")
    frame = SlideFrame(ds, (0.0, 0.0), fixed.mpp, fixed.name, tuple(fixed.shape))
    return RegistrationCheck(fixed_rgb, moving_rgb, frame)


def check_png(image: np.ndarray) -> bytes:
    """PNG bytes of a view: RGB as is, a difference image as 8-bit grey (0..1 → 0..255)."""
    import io

    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
