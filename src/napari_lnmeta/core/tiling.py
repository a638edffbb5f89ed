"""Patch grids: where to read patches on a slide, and reading them.

A :class:`PatchGrid` is a small object: the level-0 ``(row, col)`` of each kept patch's
top-left corner, its ``(row, col)`` in the regular grid, and how patches are read
(``patch_size``/``stride`` in pixels at the read resolution, ``level`` or ``mpp``).
The regular grid starts at ``origin`` and covers the whole slide; patches are kept
when they pass every filter given to :func:`make_grid`:

* ``tissue``: at least ``min_tissue`` of the patch is tissue (a
  :class:`~napari_lnmeta.core.tissue.TissueMask`);
* ``rois``: at least ``min_region`` of the patch lies in the ROI rectangles (the CSV
  ``xs, ys, xe, ye`` of seed 001, read by :func:`napari_lnmeta.io.annotations.read_roi_csv`);
* ``mask``: at least ``min_region`` of the patch lies in a mask (a ``TissueMask``, a
  ``(bool array, SlideFrame)`` pair, a bool array covering the slide) or in polygons
  (a list of ``(N, 2)`` arrays of level-0 ``(row, col)`` vertices);
* ``entropy_min``: the Shannon entropy (bits) of the grey patch is at least this
  (seed 003: drops empty, blurred and artefact patches). Needs reading the patches,
  so it is the only filter that costs I/O; :func:`make_grid_job` reports progress.

Heatmaps computed on a grid use :meth:`PatchGrid.frame`: one cell per stride, centred
on the patch, so they overlay the slide in napari.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io import jsonio
from ..io.annotations import read_roi_csv
from ..io.frame import SlideFrame
from ..io.validate import check_mpp
from ..progress import Job, Progress, run
from .tissue import TissueMask, box_fractions, integral_image

if TYPE_CHECKING:
    from ..io.slide import Slide

GRID_FORMAT = "lnmeta-patch-grid"
GRID_VERSION = 1


@dataclass
class PatchGrid:
    """Kept patches of a regular grid over a slide (see module docstring).

    Attributes
    ----------
    coords
        ``(N, 2)`` int64 level-0 ``(row, col)`` of each patch's top-left corner.
    index
        ``(N, 2)`` int64 ``(row, col)`` of each patch in the regular grid.
    grid_shape
        Rows and columns of the full regular grid (tissue or not).
    origin
        Level-0 ``(row, col)`` of grid cell ``(0, 0)``'s top-left corner.
    patch_size, stride
        Pixels at the read resolution.
    downsample
        Level-0 pixels per read pixel.
    level
        Pyramid level read (``None`` when read at ``mpp`` with resampling).
    mpp
        µm per read pixel (``None`` when the slide's µm/px is unknown).
    slide, slide_shape
        Name and level-0 ``(height, width)`` of the slide.
    tissue, entropy
        Optional per-patch tissue fraction and grey-level entropy (bits), when computed.
    """

    coords: np.ndarray
    index: np.ndarray
    grid_shape: tuple[int, int]
    origin: tuple[int, int]
    patch_size: int
    stride: int
    downsample: float
    level: int | None
    mpp: float | None
    slide: str
    slide_shape: tuple[int, int]
    tissue: np.ndarray | None = None
    entropy: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.index = np.asarray(self.index, dtype=np.int64).reshape(-1, 2)
        if len(self.coords) != len(self.index):
            raise ValueError("coords and index must have the same length")
        self.grid_shape = (int(self.grid_shape[0]), int(self.grid_shape[1]))
        self.origin = (int(self.origin[0]), int(self.origin[1]))
        self.slide_shape = (int(self.slide_shape[0]), int(self.slide_shape[1]))

    def __len__(self) -> int:
        return len(self.coords)

    def __repr__(self) -> str:
        res = f"level={self.level}" if self.level is not None else f"mpp={self.mpp}"
        return (f"<PatchGrid {self.slide!r} {len(self)} patches of {self.patch_size}px "
                f"stride {self.stride} {res} grid={self.grid_shape[0]}x{self.grid_shape[1]}>")

    # -- geometry ------------------------------------------------------------------------
    @property
    def size0(self) -> float:
        """Patch side in level-0 pixels."""
        return self.patch_size * self.downsample

    @property
    def stride0(self) -> float:
        """Stride in level-0 pixels."""
        return self.stride * self.downsample

    @property
    def slide_mpp(self) -> float | None:
        return None if self.mpp is None else self.mpp / self.downsample

    def frame(self) -> SlideFrame:
        """Frame of a heatmap with one cell per grid position (``grid_shape``).

        Cells are ``stride`` read pixels wide (``downsample = stride * downsample``) and
        centred on their patch, so with overlapping patches each value sits on the
        centre of the patch it came from.
        """
        off = (self.size0 - self.stride0) / 2
        return SlideFrame(downsample=float(self.stride0),
                          origin=(self.origin[0] + off, self.origin[1] + off),
                          slide_mpp=self.slide_mpp, slide=self.slide, slide_shape=self.slide_shape)

    def to_heatmap(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-patch ``values`` (``(N,)`` or ``(N, C)``) into a ``grid_shape`` array."""
        values = np.asarray(values)
        if len(values) != len(self):
            raise ValueError(f"{len(values)} values for {len(self)} patches")
        dtype = np.result_type(values.dtype, np.float32) if np.isnan(fill) else values.dtype
        out = np.full(self.grid_shape + values.shape[1:], fill, dtype=dtype)
        out[self.index[:, 0], self.index[:, 1]] = values
        return out

    def centers(self) -> np.ndarray:
        """``(N, 2)`` float level-0 ``(row, col)`` of the patch centres."""
        return self.coords + (self.size0 - 1) / 2

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays into :attr:`coords`, ``batch_size`` at a time (the last may be short)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))

    def subset(self, idx: np.ndarray) -> PatchGrid:
        """A grid with only the patches ``idx`` (indices or a bool mask)."""
        idx = np.asarray(idx)
        return PatchGrid(coords=self.coords[idx], index=self.index[idx],
                         grid_shape=self.grid_shape, origin=self.origin,
                         patch_size=self.patch_size, stride=self.stride,
                         downsample=self.downsample, level=self.level, mpp=self.mpp,
                         slide=self.slide, slide_shape=self.slide_shape,
                         tissue=None if self.tissue is None else self.tissue[idx],
                         entropy=None if self.entropy is None else self.entropy[idx],
                         params=dict(self.params))

    # -- napari data (plain arrays; the widget adds the layer) ------------------------
    def points_data(self) -> np.ndarray:
        """Patch centres in level-0 pixels, for a Points layer with ``scale=(mpp0, mpp0)``."""
        return self.centers()

    def shapes_data(self) -> np.ndarray:
        """``(N, 4, 2)`` rectangle corners in level-0 pixels, for a Shapes layer."""
        s = self.size0
        c = self.coords.astype(np.float64) - 0.5  # pixel edges, since layers are centred
        corners = np.array([[0, 0], [0, s], [s, s], [s, 0]], dtype=np.float64)
        return c[:, None, :] + corners[None]

    def layer_kwargs(self) -> dict[str, Any]:
        """``scale``/``units``/metadata that put level-0 pixel data on the slide layer."""
        m0 = self.slide_mpp
        kw: dict[str, Any] = {"scale": (m0, m0) if m0 else (1.0, 1.0),
                              "metadata": {"lnmeta": {"grid": self.meta()}}}
        if m0:
            kw["units"] = ("µm", "µm")
        return kw

    # -- persistence -----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"format": GRID_FORMAT, "version": GRID_VERSION,
                "grid_shape": list(self.grid_shape), "origin": list(self.origin),
                "patch_size": self.patch_size, "stride": self.stride,
                "downsample": float(self.downsample), "level": self.level,
                "mpp": self.mpp, "slide": self.slide, "slide_shape": list(self.slide_shape),
                "params": self.params}

    def save(self, path: str | Path, *, overwrite: bool = False,
             inputs: Sequence[str | Path] = ()) -> Path:
        """Write ``.npz`` (arrays + JSON metadata, no pickles), atomically."""
        from ..io.atomic import atomic_path

        path = Path(path)
        arrays = {"coords": self.coords, "index": self.index,
                  "meta": np.array(jsonio.dumps(self.meta()))}
        if self.tissue is not None:
            arrays["tissue"] = np.asarray(self.tissue, dtype=np.float32)
        if self.entropy is not None:
            arrays["entropy"] = np.asarray(self.entropy, dtype=np.float32)
        with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchGrid:
        """Read a grid written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such patch-grid file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                coords, index = z["coords"], z["index"]
                tissue = z["tissue"] if "tissue" in z.files else None
                entropy = z["entropy"] if "entropy" in z.files else None
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a patch-grid file ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != GRID_FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise InputError(f"{path}: not a patch-grid file (format {fmt!r})")
        try:
            grid = cls(coords=coords, index=index, grid_shape=tuple(meta["grid_shape"]),
                       origin=tuple(meta["origin"]), patch_size=int(meta["patch_size"]),
                       stride=int(meta["stride"]), downsample=float(meta["downsample"]),
                       level=meta["level"], mpp=meta["mpp"], slide=meta["slide"],
                       slide_shape=tuple(meta["slide_shape"]), tissue=tissue, entropy=entropy,
                       params=meta.get("params", {}))
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise InputError(f"{path}: malformed patch-grid metadata ({what})") from e
        ok = (grid.patch_size > 0 and grid.stride > 0 and math.isfinite(grid.downsample)
              and grid.downsample > 0 and len(grid.grid_shape) == 2
              and grid.coords.ndim == 2 and grid.coords.shape[1:] == (2,)
              and grid.index.shape == grid.coords.shape)
        if not ok:
            raise InputError(f"{path}: malformed patch-grid metadata (sizes, downsample or "
                             "array shapes do not fit)")
        if grid.mpp is not None:
            grid.mpp = check_mpp(grid.mpp, what="'mpp'", path=path)
        return grid


# ------------------------------------------------------------------------------------------
# ROI rectangles, masks and polygons
# ------------------------------------------------------------------------------------------
def _box_overlap(coords: np.ndarray, size0: float, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each patch covered by the union of axis-aligned boxes (y0, x0, y1, x1).

    Exact for non-overlapping boxes; overlapping boxes are capped at 1.
    """
    frac = np.zeros(len(coords), dtype=np.float64)
    y0, x0 = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    for by0, bx0, by1, bx1 in boxes:
        oy = np.clip(np.minimum(y0 + size0, by1) - np.maximum(y0, by0), 0, None)
        ox = np.clip(np.minimum(x0 + size0, bx1) - np.maximum(x0, bx0), 0, None)
        frac += oy * ox
    return np.minimum(frac / (size0 * size0), 1.0)


def rasterize_polygons(polygons: Sequence[np.ndarray], slide_shape: tuple[int, int],
                       downsample: float) -> np.ndarray:
    """Bool mask at ``downsample`` of polygons given in level-0 ``(row, col)``."""
    from skimage.draw import polygon as draw_polygon

    h = max(1, math.ceil(slide_shape[0] / downsample))
    w = max(1, math.ceil(slide_shape[1] / downsample))
    out = np.zeros((h, w), dtype=bool)
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3:
            raise InputError(f"a polygon must be an (N >= 3, 2) array of (row, col), "
                             f"got shape {p.shape}")
        # vertex coordinates are pixel centres at level 0; mask pixel i spans
        # [i*d, (i+1)*d), so its centre is at (i + 0.5) * d - 0.5 in level-0 centres
        rr, cc = draw_polygon((p[:, 0] + 0.5) / downsample - 0.5,
                              (p[:, 1] + 0.5) / downsample - 0.5, shape=(h, w))
        out[rr, cc] = True
    return out


def _region_fractions(mask: Any, coords: np.ndarray, size0: float, slide: Slide,
                      stride0: float) -> np.ndarray:
    """Fraction of each patch inside ``mask`` (see :func:`make_grid`)."""
    if isinstance(mask, TissueMask):
        return mask.fractions(coords, size0)
    if isinstance(mask, tuple) and len(mask) == 2 and isinstance(mask[1], SlideFrame):
        arr, fr = np.asarray(mask[0]) > 0, mask[1]
        return box_fractions(integral_image(arr), coords, size0, downsample=fr.downsample,
                             origin=fr.origin)
    if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.dtype != object:
        arr = mask > 0
        ds = (slide.shape[0] / arr.shape[0] + slide.shape[1] / arr.shape[1]) / 2
        return box_fractions(integral_image(arr), coords, size0, downsample=ds)
    if isinstance(mask, (list, tuple)):
        # polygons: rasterise at a quarter stride (at most 8192 px a side)
        ds = max(stride0 / 4, max(slide.shape) / 8192, 1.0)
        arr = rasterize_polygons(list(mask), slide.shape, ds)
        return box_fractions(integral_image(arr), coords, size0, downsample=ds)
    raise InputError(f"mask must be a TissueMask, a (array, SlideFrame) pair, a bool array or "
                     f"a list of (N, 2) polygons, got {type(mask).__name__}")


# ------------------------------------------------------------------------------------------
# Entropy
# ------------------------------------------------------------------------------------------
def grey_entropy(patches: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits, 0–8) of the 256-level grey histogram of each patch.

    ``patches`` is ``(B, H, W, 3)`` or ``(H, W, 3)`` uint8; grey is ITU-R 709 luma
    (skimage's ``rgb2gray`` weights), rounded to 8 bits.
    """
    p = np.asarray(patches)
    single = p.ndim == 3
    if single:
        p = p[None]
    grey = (p[..., 0] * 0.2125 + p[..., 1] * 0.7154 + p[..., 2] * 0.0721 + 0.5).astype(np.uint8)
    grey = grey.reshape(len(p), -1)
    out = np.empty(len(p), dtype=np.float64)
    for i, g in enumerate(grey):
        counts = np.bincount(g, minlength=256)
        pr = counts[counts > 0] / g.size
        out[i] = float(-(pr * np.log2(pr)).sum()) if g.size else 0.0
    return out[0] if single else out


# ------------------------------------------------------------------------------------------
# Grid construction
# ------------------------------------------------------------------------------------------
def _read_resolution(slide: Slide, mpp: float | None,
                     level: int | None) -> tuple[float, int | None, float | None]:
    """(downsample, level, read mpp) for a request by µm/px, level, or neither (level 0)."""
    if mpp is not None and level is not None:
        raise InputError("give a patch µm/px or a level, not both")
    if mpp is not None:
        if not mpp > 0:
            raise InputError(f"patch µm/px must be positive, got {mpp}")
        ds = mpp / slide.require_mpp()
        if ds < 1 - 1e-6:
            raise InputError(f"{slide.name}: {mpp} µm/px is finer than level 0 "
                             f"({slide.mpp:.4g} µm/px); patches are never upsampled")
        for i, d in enumerate(slide.level_downsamples):
            if abs(d - ds) / ds < 1e-3:  # an existing level: no resampling
                return d, i, float(mpp)
        return ds, None, float(mpp)
    lvl = 0 if level is None else int(level)
    if not 0 <= lvl < slide.level_count:
        raise InputError(f"{slide.name}: level {lvl} out of range 0..{slide.level_count - 1}")
    return slide.level_downsamples[lvl], lvl, slide.level_mpp(lvl)


def make_grid_job(slide: Slide, *, patch_size: int = 256, stride: int | None = None,
                  mpp: float | None = None, level: int | None = None,
                  tissue: TissueMask | None = None, min_tissue: float = 0.5,
                  entropy_min: float | None = None, rois: Any = None, mask: Any = None,
                  min_region: float = 0.5, origin: tuple[int, int] = (0, 0),
                  batch_size: int = 64) -> Job[PatchGrid]:
    """:func:`make_grid` as a progress generator (only the entropy filter takes time)."""
    if int(patch_size) < 1:
        raise InputError(f"patch size must be >= 1 px, got {patch_size}")
    patch_size = int(patch_size)
    stride = patch_size if stride is None else int(stride)
    if stride < 1:
        raise InputError(f"stride must be >= 1 px, got {stride}")
    if not 0 <= min_tissue <= 1:
        raise InputError(f"min_tissue must be in [0, 1], got {min_tissue}")
    ds, lvl, read_mpp = _read_resolution(slide, mpp, level)
    size0, stride0 = patch_size * ds, stride * ds
    h0, w0 = slide.shape
    oy, ox = int(origin[0]), int(origin[1])
    nr = max(1, math.ceil((h0 - oy - size0) / stride0) + 1)
    nc = max(1, math.ceil((w0 - ox - size0) / stride0) + 1)
    yield Progress(0, 1, "building grid")
    ii, jj = np.meshgrid(np.arange(nr, dtype=np.int64), np.arange(nc, dtype=np.int64),
                         indexing="ij")
    index = np.stack([ii.ravel(), jj.ravel()], axis=1)
    coords = np.stack([np.floor(oy + index[:, 0] * stride0),
                       np.floor(ox + index[:, 1] * stride0)], axis=1).astype(np.int64)
    keep = np.ones(len(coords), dtype=bool)
    tissue_frac = None
    if tissue is not None:
        if tissue.slide_shape is not None and tuple(tissue.slide_shape) != (h0, w0):
            raise InputError(f"{slide.name}: the tissue mask was made on a slide of "
                             f"{tissue.slide_shape[1]}x{tissue.slide_shape[0]} px, this one is "
                             f"{w0}x{h0}")
        tissue_frac = tissue.fractions(coords, size0)
        keep &= tissue_frac >= min_tissue - 1e-9
    if rois is not None:
        boxes = read_roi_csv(rois, slide=slide.name) if isinstance(rois, (str, Path)) \
            else np.asarray(rois, dtype=np.float64).reshape(-1, 4)
        keep &= _box_overlap(coords, size0, boxes) >= min_region - 1e-9
    if mask is not None:
        keep &= _region_fractions(mask, coords, size0, slide, stride0) >= min_region - 1e-9
    coords, index = coords[keep], index[keep]
    if tissue_frac is not None:
        tissue_frac = tissue_frac[keep].astype(np.float32)
    params = {"min_tissue": min_tissue if tissue is not None else None,
              "entropy_min": entropy_min, "min_region": min_region,
              "rois": str(rois) if isinstance(rois, (str, Path)) else (
                  None if rois is None else "array"),
              "mask": None if mask is None else type(mask).__name__,
              "tissue_method": tissue.method if tissue is not None else None}
    grid = PatchGrid(coords=coords, index=index, grid_shape=(nr, nc), origin=(oy, ox),
                     patch_size=patch_size, stride=stride, downsample=float(ds), level=lvl,
                     mpp=read_mpp, slide=slide.name, slide_shape=(h0, w0), tissue=tissue_frac,
                     params=params)
    if entropy_min is None:
        yield Progress(1, 1, "grid ready")
        return grid
    ent = np.empty(len(grid), dtype=np.float64)
    n = len(grid)
    for k, idx in enumerate(grid.batches(batch_size)):
        ent[idx] = grey_entropy(read_patches(slide, grid, idx))
        yield Progress(min((k + 1) * batch_size, n), n, "patch entropy")
    sub = grid.subset(ent >= entropy_min)
    sub.entropy = ent[ent >= entropy_min].astype(np.float32)
    return sub


def make_grid(slide: Slide, *, patch_size: int = 256, stride: int | None = None,
              mpp: float | None = None, level: int | None = None,
              tissue: TissueMask | None = None, min_tissue: float = 0.5,
              entropy_min: float | None = None, rois: Any = None, mask: Any = None,
              min_region: float = 0.5, origin: tuple[int, int] = (0, 0)) -> PatchGrid:
    """A regular patch grid over ``slide``, keeping patches that pass the filters.

    Parameters
    ----------
    slide
        An open slide.
    patch_size, stride
        Pixels at the read resolution (``stride`` defaults to ``patch_size``).
    mpp, level
        Read resolution: µm/px (resampled from the nearest finer level unless a level
        matches) or a pyramid level; neither means level 0.
    tissue, min_tissue
        Keep patches whose tissue fraction is at least ``min_tissue``.
    entropy_min
        Keep patches whose grey-level Shannon entropy (bits) is at least this (seed 003).
    rois
        ROI rectangles: a CSV path (:func:`~napari_lnmeta.io.annotations.read_roi_csv`) or ``(K, 4)`` level-0
        ``(y0, x0, y1, x1)`` boxes.
    mask
        A restriction: :class:`TissueMask`, ``(array, SlideFrame)``, a bool array
        covering the slide, or a list of ``(N, 2)`` level-0 ``(row, col)`` polygons.
    min_region
        Minimum fraction of a patch inside ``rois`` / ``mask``.
    origin
        Level-0 ``(row, col)`` of grid cell ``(0, 0)``.

    Returns
    -------
    PatchGrid
    """
    return run(make_grid_job(slide, patch_size=patch_size, stride=stride, mpp=mpp, level=level,
                             tissue=tissue, min_tissue=min_tissue, entropy_min=entropy_min,
                             rois=rois, mask=mask, min_region=min_region, origin=origin))


def read_patches(slide: Slide, grid: PatchGrid, idx: np.ndarray | Sequence[int] | slice,
                 *, workers: int | None = None) -> np.ndarray:
    """Read patches ``idx`` of ``grid`` as a ``(B, S, S, 3)`` uint8 array.

    Outside the slide reads as white. Patches are decoded in a small thread pool
    (slides are thread-safe), which overlaps JPEG decoding.
    """
    coords = grid.coords[idx] if not isinstance(idx, slice) else grid.coords[idx]
    coords = np.asarray(coords).reshape(-1, 2)
    s = grid.patch_size
    out = np.empty((len(coords), s, s, 3), dtype=np.uint8)
    if len(coords) == 0:
        return out

    def one(k: int) -> None:
        loc = (int(coords[k, 0]), int(coords[k, 1]))
        if grid.level is not None:
            out[k] = slide.read_region(loc, (s, s), level=grid.level)
        else:
            out[k] = slide.read_region(loc, (s, s), mpp=grid.mpp)

    n_workers = min(4, len(coords)) if workers is None else max(1, int(workers))
    if n_workers <= 1:
        for k in range(len(coords)):
            one(k)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n_workers) as ex:
            list(ex.map(one, range(len(coords))))
    return out
