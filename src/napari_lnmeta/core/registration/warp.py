"""Images through a transform: sampling, reading a slide at mapped points, a lazy warped
pyramid for napari, and an in-memory RGB array as a slide.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ...io.slide import Slide
    from .transform import Transform

def sample_image(image: np.ndarray, coords: np.ndarray, origin: tuple[float, float],
                 downsample: float, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample ``image`` at level-0 coordinates ``coords (2, h, w)`` of the slide it lies on.

    ``image`` pixel ``(i, j)`` covers level-0 ``origin + [i, i+1) * downsample``.
    """
    from scipy import ndimage as ndi

    img = np.asarray(image)
    idx = (coords - np.asarray(origin, dtype=np.float64)[:, None, None]
           - (downsample - 1) / 2) / downsample
    if img.ndim == 2:
        out = ndi.map_coordinates(img, idx, order=order, mode="constant", cval=cval,
                                  prefilter=False)
        return out.astype(img.dtype, copy=False)
    chans = [ndi.map_coordinates(img[..., c], idx, order=order, mode="constant", cval=cval,
                                 prefilter=False) for c in range(img.shape[2])]
    out = np.stack(chans, axis=-1)
    if np.issubdtype(img.dtype, np.integer):
        out = np.clip(np.rint(out), np.iinfo(img.dtype).min, np.iinfo(img.dtype).max)
    return out.astype(img.dtype, copy=False)


def read_mapped(slide: Slide, coords: np.ndarray, downsample: float, *, cval: int = 255,
                margin: int = 2) -> np.ndarray:
    """RGB of ``slide`` at level-0 coordinates ``coords (2, h, w)`` (bilinear).

    Reads the bounding box of the coordinates at the pyramid level closest to (and not
    coarser than) ``downsample`` level-0 px per output px.
    """
    h, w = coords.shape[1:]
    sh, sw = slide.shape
    r0, r1 = float(np.nanmin(coords[0])), float(np.nanmax(coords[0]))
    c0, c1 = float(np.nanmin(coords[1])), float(np.nanmax(coords[1]))
    if r1 < -downsample or c1 < -downsample or r0 > sh + downsample or c0 > sw + downsample:
        return np.full((h, w, 3), cval, np.uint8)
    r0, c0 = max(r0, 0.0), max(c0, 0.0)
    r1, c1 = min(r1, sh - 1.0), min(c1, sw - 1.0)
    level = slide.best_level_for_downsample(max(downsample, 1.0))
    lds = slide.level_downsamples[level]
    ly0 = max(int(math.floor(r0 / lds)) - margin, 0)
    lx0 = max(int(math.floor(c0 / lds)) - margin, 0)
    ly1 = int(math.ceil(r1 / lds)) + margin + 1
    lx1 = int(math.ceil(c1 / lds)) + margin + 1
    lh, lw = slide.level_shapes[level]
    ly1, lx1 = min(ly1, lh), min(lx1, lw)
    if ly1 <= ly0 or lx1 <= lx0:
        return np.full((h, w, 3), cval, np.uint8)
    region = slide.read_region((int(ly0 * lds), int(lx0 * lds)), (ly1 - ly0, lx1 - lx0),
                               level=level)
    ratio = downsample / lds
    if ratio >= 1.5:  # no level close enough: average before sampling (no aliasing)
        from scipy import ndimage as ndi

        k = int(round(ratio))
        region = ndi.uniform_filter(region, size=(k, k, 1), mode="nearest")
    return sample_image(region, coords, (ly0 * lds, lx0 * lds), lds, order=1, cval=cval)


def warped_pyramid(transform: Transform, moving: Slide, *, tile: int = 512,
                   min_size: int = 512) -> tuple[list[Any], list[float]]:
    """The moving slide resampled onto the fixed slide, as a lazy multiscale RGB pyramid.

    Level ``k`` has downsample ``2**k`` on the fixed slide; each ``tile`` × ``tile`` chunk
    reads only the moving region that maps onto it when it is computed (napari computes
    what is on screen). Returns the dask arrays and their downsamples.
    """
    import dask.array as da

    h0, w0 = transform.fixed.shape
    levels, dss = [], []
    ds = 1.0
    while True:
        h, w = math.ceil(h0 / ds), math.ceil(w0 / ds)

        def block(block_info=None, _ds=ds):
            loc = block_info[None]["array-location"]
            (r0, r1), (c0, c1) = loc[0], loc[1]
            return transform.warp_slide_region(moving, (r0 * _ds, c0 * _ds),
                                               (r1 - r0, c1 - c0), _ds)

        chunks = (tuple(min(tile, h - i) for i in range(0, h, tile)),
                  tuple(min(tile, w - j) for j in range(0, w, tile)), (3,))
        levels.append(da.map_blocks(block, chunks=chunks, dtype=np.uint8,
                                    name=f"lnmeta-warped-{id(transform):x}-{ds:g}",
                                    meta=np.empty((0, 0, 0), np.uint8)))
        dss.append(ds)
        if max(h, w) <= min_size:
            break
        ds *= 2
    return levels, dss
