"""One lazy, thread-safe slide abstraction over OpenSlide, tifffile, zarr and plain images.

Conventions (see ``docs/formats.md``):

* coordinates are ``(row, col) = (y, x)`` in **level-0 pixels**; sizes are
  ``(height, width)`` in pixels of the level that is read;
* pixels are RGB ``uint8``; anything outside the slide reads as white (255);
* ``mpp`` is the physical pixel size of level 0 in micrometres per pixel, or ``None``
  when the file does not say and the user did not give one.

Opening a slide reads metadata only. :meth:`Slide.pyramid` returns lazy dask arrays
chunked in square tiles whatever the file's own tiling; pixels are decoded when a
chunk is computed, with one file handle per thread so chunks decode in parallel.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, LnmetaWarning, SlideError
from ._tiles import (
    CorruptTileError,
    TileCache,
    _jpeg_check_enabled,
    _TileDecoder,
    tiff_direct_enabled,
)
from ._tiles import jpeg_problem as jpeg_problem  # part of this module's API
from .validate import MPP_MAX, MPP_MIN, check_mpp, mpp_problem

if TYPE_CHECKING:
    import dask.array as da

#: Suffixes of the vendor formats OpenSlide reads (the format itself is decided by content).
OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu",
                      ".bif", ".svslide", ".dcm")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".qptiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
#: The one list of file names taken for slides when a folder is scanned (cohorts, batch).
#: Only a hint for finding files: what a file is, is decided by its content (:func:`sniff`).
SLIDE_SUFFIXES = tuple(dict.fromkeys(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES
                                     + ZARR_SUFFIXES))

DEFAULT_TILE = 1024
#: Synthetic levels are added until the coarsest is at most this many pixels wide/high.
MIN_PYRAMID_SIZE = 1024
#: Largest level 0 accepted (pixels, width x height): 10^11, beyond any scanner's slide
#: (a 25 x 75 mm area at 0.25 µm/px is 3 x 10^10). ``LNMETA_MAX_SLIDE_PIXELS`` changes it.
MAX_SLIDE_PIXELS = 10**11
#: Largest strip or tile accepted (pixels): reading any window decodes a whole one.
MAX_CHUNK_PIXELS = 2**28
#: Synthetic levels (2x, 4x, ... below the coarsest level of the file) are built once per
#: open and kept in memory from the first one with at most this many pixels down to a
#: few pixels; ``LNMETA_SYNTHETIC_LEVEL_PIXELS`` changes it.
SYNTHETIC_LEVEL_PIXELS = 32 * 2**20
#: Side (pixels of the file level) of the blocks a synthetic level is built from.
_BUILD_BLOCK = 2048


def max_slide_pixels() -> int:
    """The level-0 size limit in force (:data:`MAX_SLIDE_PIXELS` or the environment's)."""
    return int(float(os.environ.get("LNMETA_MAX_SLIDE_PIXELS", MAX_SLIDE_PIXELS)))


class MppWarning(LnmetaWarning):
    """The slide has no physical pixel size; it is shown in pixel units."""


# --------------------------------------------------------------------------------------
# Level readers: the only thing a backend has to provide.
# --------------------------------------------------------------------------------------
class _LevelArray:
    """A numpy-sliceable view of one level that dask can chunk.

    ``__getitem__`` takes a ``(slice, slice, slice)`` and decodes just that window.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide: Slide, level: int):
        self.slide = slide
        self.level = level
        h, w = slide.level_shapes[level]
        self.shape = (h, w, 3)

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = self.slide._read_level(self.level, y0, x0, y1 - y0, x1 - x0)
        if len(key) > 2:
            out = out[:, :, key[2]]
        return out


class Slide:
    """Base class: metadata, region reads and the lazy pyramid.

    Subclasses fill the metadata attributes in ``__init__`` and implement
    :meth:`_read_level`, which reads an in-bounds window of one level.
    """

    #: e.g. ``"openslide:aperio"``, ``"ome-tiff"``, ``"tiff"``, ``"ome-zarr"``, ``"image"``
    format: str = "unknown"

    def __init__(self, path: str | Path, *, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_override = (None if mpp is None else
                              check_mpp(mpp, what="--mpp", path=self.path, error=SlideError))
        self.level_shapes: list[tuple[int, int]] = []  # (height, width) per level
        self.properties: dict[str, Any] = {}
        self.vendor: str | None = None
        self.objective_power: float | None = None
        self._file_mpp: float | None = None
        self._file_mpp_source: str | None = None

    # -- metadata ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """``(width, height)`` per level, as OpenSlide reports them."""
        return [(w, h) for h, w in self.level_shapes]

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return self.level_shapes[0]

    @property
    def level_downsamples(self) -> list[float]:
        h0, w0 = self.level_shapes[0]
        return [(h0 / h + w0 / w) / 2 for h, w in self.level_shapes]

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel: the user's override, else the file's, else ``None``."""
        return self._mpp_override if self._mpp_override is not None else self._file_mpp

    @property
    def mpp_source(self) -> str | None:
        if self._mpp_override is not None:
            return "user"
        return self._file_mpp_source

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def require_mpp(self) -> float:
        """The level-0 µm/px, or a clear error telling the user to pass ``--mpp``."""
        if self.mpp is None:
            raise SlideError(self.path, "the physical pixel size (µm/px) is unknown; "
                             "pass --mpp (or mpp=...) to set it")
        return self.mpp

    @cached_property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro, thumbnail... as RGB arrays, where the file has them."""
        return {}

    def info(self) -> dict[str, Any]:
        """Everything ``lnmeta info`` prints, as plain JSON-able values."""
        return {
            "path": str(self.path),
            "format": self.format,
            "vendor": self.vendor,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": sorted(self.associated_images),
        }

    # -- reading -----------------------------------------------------------------------
    def _read_level(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read an in-bounds ``(h, w, 3)`` window at ``(y, x)`` in *level* pixels."""
        raise NotImplementedError

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (never upsample)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_region(self, location: tuple[int, int], size: tuple[int, int], *,
                    level: int | None = None, mpp: float | None = None) -> np.ndarray:
        """Read an RGB region.

        Parameters
        ----------
        location
            ``(row, col)`` of the top-left corner in level-0 pixels.
        size
            ``(height, width)`` of the output in pixels of the requested resolution.
        level
            Pyramid level to read (default 0).
        mpp
            Read at this µm/px instead: the nearest finer level is read and resized.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` uint8; outside the slide is white.
        """
        if level is not None and mpp is not None:
            raise ValueError("give level or mpp, not both")
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {size}")
        y0, x0 = int(location[0]), int(location[1])
        if mpp is not None:
            target_ds = mpp / self.require_mpp()
            lvl = self.best_level_for_downsample(target_ds)
            lds = self.level_downsamples[lvl]
            if abs(lds - target_ds) / target_ds < 1e-3:
                return self.read_region((y0, x0), (h, w), level=lvl)
            src_h = max(1, round(h * target_ds / lds))
            src_w = max(1, round(w * target_ds / lds))
            src = self.read_region((y0, x0), (src_h, src_w), level=lvl)
            return _resize(src, (h, w))
        level = 0 if level is None else int(level)
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        ds = self.level_downsamples[level]
        ly, lx = math.floor(y0 / ds), math.floor(x0 / ds)
        return self._read_padded(level, ly, lx, h, w)

    def _read_padded(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        lh, lw = self.level_shapes[level]
        cy0, cx0 = max(y, 0), max(x, 0)
        cy1, cx1 = min(y + h, lh), min(x + w, lw)
        if cy0 == y and cx0 == x and cy1 == y + h and cx1 == x + w:
            return self._read_level(level, y, x, h, w)
        out = np.full((h, w, 3), 255, np.uint8)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = self._read_level(
                level, cy0, cx0, cy1 - cy0, cx1 - cx0)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level in memory: only for small (low-resolution) levels."""
        h, w = self.level_shapes[level]
        if h * w > 64_000_000:
            raise SlideError(self.path, f"level {level} ({w}x{h}) is too large to load whole")
        return self._read_level(level, 0, 0, h, w)

    # -- lazy pyramid ------------------------------------------------------------------
    def pyramid(self, tile: int = DEFAULT_TILE, *,
                min_size: int = MIN_PYRAMID_SIZE) -> list[da.Array]:
        """Lazy RGB levels, level 0 first, chunked ``tile`` x ``tile``.

        When the file's coarsest level is still larger than ``min_size``, coarser levels
        are added (2x2 means, see :meth:`synthetic_shapes`) so a viewer never has to
        touch level 0 to show the whole slide. Those small enough are built once per
        open, in one tile-by-tile pass over the file's coarsest level, the first time
        any of them is read, and kept (:meth:`synthetic_level`); larger ones stay lazy.
        """
        import dask.array as da

        def wrap(arr, name):
            return da.from_array(arr, chunks=(tile, tile, 3), asarray=False, fancy=False,
                                 lock=False, meta=np.empty((0, 0, 0), np.uint8),
                                 name=f"lnmeta-{self.path.name}-{id(self):x}-{name}-{tile}")

        levels = [wrap(_LevelArray(self, i), f"L{i}") for i in range(self.level_count)]
        shapes = self.synthetic_shapes()
        kept = self._first_kept_synthetic()
        k = 0
        while max(levels[-1].shape[:2]) > min_size:
            k += 1
            if kept <= k <= len(shapes):
                levels.append(wrap(_SyntheticLevelArray(self, k), f"S{k}"))
            else:
                levels.append(downsample2x(levels[-1], tile))
        return levels

    # -- synthetic levels --------------------------------------------------------------
    def synthetic_shapes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of the synthetic levels 1, 2, ...: level ``k`` is the file's
        coarsest level reduced ``2**k`` times by 2x2 means (odd edges averaged with
        themselves), down to one no larger than 16 px on its long side. None when that
        level is already small (at most :data:`MIN_PYRAMID_SIZE` px)."""
        h, w = self.level_shapes[-1]
        out: list[tuple[int, int]] = []
        if max(h, w) <= MIN_PYRAMID_SIZE:
            return out
        while max(h, w) > 16:
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
        return out

    def _first_kept_synthetic(self) -> int:
        """The finest synthetic level small enough to be kept in memory (1-based)."""
        limit = int(float(os.environ.get("LNMETA_SYNTHETIC_LEVEL_PIXELS",
                                         SYNTHETIC_LEVEL_PIXELS)))
        shapes = self.synthetic_shapes()
        return next((k + 1 for k, (h, w) in enumerate(shapes) if h * w <= limit),
                    len(shapes) + 1)

    def synthetic_level(self, k: int) -> np.ndarray:
        """Synthetic level ``k`` (see :meth:`synthetic_shapes`) as an in-memory array.

        All kept levels are built together on the first call, by one pass over the
        file's coarsest level in blocks of 2048 px (read in parallel threads; memory:
        the kept levels plus one block per thread), and cached on this slide: every
        later call (tissue detection, a viewer, an overview) is a lookup.
        """
        shapes = self.synthetic_shapes()
        first = self._first_kept_synthetic()
        if not first <= k <= len(shapes):
            raise ValueError(f"synthetic level {k} is not kept in memory "
                             f"(kept: {first}..{len(shapes)})")
        with _SYNTH_LOCK:
            lock = _SYNTH_BUILD_LOCKS.setdefault(self, threading.Lock())
        with lock:
            cache = _SYNTH_CACHE.get(self)
            if cache is None:
                cache = self._build_synthetic(first, len(shapes))
                _SYNTH_CACHE[self] = cache
        return cache[k]

    def _build_synthetic(self, first: int, last: int) -> dict[int, np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        src = self.level_count - 1
        lh, lw = self.level_shapes[src]
        f = 2 ** first
        step = f * max(1, -(-_BUILD_BLOCK // f))  # a multiple of 2**first: blocks align
        sh, sw = self.synthetic_shapes()[first - 1]
        out = np.empty((sh, sw, 3), np.uint8)

        def one(yx):
            y, x = yx
            block = self._read_level(src, y, x, min(step, lh - y), min(step, lw - x))
            for _ in range(first):
                block = half(block)
            out[y // f:y // f + block.shape[0], x // f:x // f + block.shape[1]] = block

        blocks = [(y, x) for y in range(0, lh, step) for x in range(0, lw, step)]
        workers = max(1, min(4, os.cpu_count() or 1, len(blocks)))
        with ThreadPoolExecutor(workers) as ex:
            for _ in ex.map(one, blocks):
                pass
        levels = {first: out}
        for k in range(first + 1, last + 1):
            levels[k] = half(levels[k - 1])
        return levels

    def low_res(self, target_mpp: float | None = 8.0, *,
                max_size: int = 4096) -> tuple[np.ndarray, float]:
        """A whole-slide image near ``target_mpp`` (coarser is preferred).

        Returns the RGB array and its downsample relative to level 0 (so its µm/px is
        ``downsample * slide.mpp``). The candidates are the file's levels and the
        synthetic 2x levels below its coarsest (:meth:`synthetic_level`, built once per
        open, tile by tile): level 0 is never read whole to get a small image. Without
        a known µm/px the level whose longest side is at most ``max_size`` is used.
        Memory is bounded by that level (at most 64 Mpx for a file level).
        """
        shapes = list(self.level_shapes)
        n_file = len(shapes)
        shapes += self.synthetic_shapes()
        h0, w0 = self.shape
        dss = [(h0 / h + w0 / w) / 2 for h, w in shapes]
        dss[:n_file] = [float(d) for d in self.level_downsamples]
        first = self._first_kept_synthetic()

        def usable(i):
            h, w = shapes[i]
            return (i < n_file and h * w <= 64_000_000) or i >= n_file + first - 1

        if target_mpp is not None and self.mpp is not None:
            want = target_mpp / self.mpp
            idx = min(range(len(shapes)), key=lambda i: abs(math.log(dss[i] / want)))
        else:
            idx = next((i for i, s in enumerate(shapes) if max(s) <= max_size), len(shapes) - 1)
        while (max(shapes[idx]) > max_size * 2 or not usable(idx)) and idx + 1 < len(shapes):
            idx += 1
        arr = self.read_level(idx) if idx < n_file else self.synthetic_level(idx - n_file + 1)
        return np.ascontiguousarray(arr), float(dss[idx])

    # -- decoded-tile cache ------------------------------------------------------------
    def tile_shape(self, level: int) -> tuple[int, int] | None:
        """``(rows, cols)`` of the stored tiles of ``level``; None if unknown or untiled."""
        return None

    def reserve_tile_cache(self, nbytes: int) -> None:  # noqa: B027 - optional hook
        """Keep up to ``nbytes`` of decoded tiles: a hint from a job that knows how many
        tiles its reads share (see :func:`napari_lnmeta.core.inference.tile_working_set`)."""

    def jpeg_tiles(self, level: int):
        """A reader of the level's tiles as JPEG streams, where it has plain YCbCr JPEG
        tiles (TIFF/OME-TIFF); None otherwise."""
        return None

    # -- lifecycle ---------------------------------------------------------------------
    def unchecked_reads(self):
        """A context in which large region reads skip the JPEG tile checks (damaged tiles
        are decoded as the decoder repairs them); reads that fail to decode still raise.
        Used where a damaged tile may only blur a low-resolution overview (tissue
        detection while skipping corrupt tiles)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            old = self.__dict__.get("_check_reads", True)
            self._check_reads = False
            try:
                yield self
            finally:
                self._check_reads = old

        return ctx()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles (they are re-opened on demand)."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        h, w = self.shape
        return f"<{type(self).__name__} {self.path.name!r} {w}x{h} levels={self.level_count} mpp={self.mpp}>"


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))


def downsample2x(level: da.Array, tile: int = DEFAULT_TILE) -> da.Array:
    """Lazy 2x2 mean of an RGB dask array (odd edges are averaged with themselves)."""
    import dask.array as da

    h, w = level.shape[:2]
    if h % 2 or w % 2:
        level = da.pad(level, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    level = level.rechunk((2 * tile, 2 * tile, 3))
    out = da.coarsen(np.mean, level.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
    return (out + 0.5).astype(np.uint8).rechunk((tile, tile, 3))


def half(img: np.ndarray) -> np.ndarray:
    """2x2 mean of an ``(h, w, 3)`` uint8 image, rounded like :func:`downsample2x`
    (odd edges are averaged with themselves), so cached and lazy levels agree."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = img[0::2, 0::2].astype(np.uint16)
    s += img[1::2, 0::2]
    s += img[0::2, 1::2]
    s += img[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


class _SyntheticLevelArray:
    """A numpy-sliceable view of a kept synthetic level (built on first access)."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide: Slide, k: int):
        self.slide = slide
        self.k = k
        h, w = slide.synthetic_shapes()[k - 1]
        self.shape = (h, w, 3)

    def __getitem__(self, key):
        return self.slide.synthetic_level(self.k)[key]


#: kept synthetic levels per open slide (outside the object: never pickled to workers)
_SYNTH_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SYNTH_BUILD_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SYNTH_LOCK = threading.Lock()
#: guards the creation of OpenSlide levels' tile readers (OpenSlideSlide._tiff_level)
_DECODER_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------
# OpenSlide
# --------------------------------------------------------------------------------------
class OpenSlideSlide(Slide):
    """Vendor formats and DICOM through OpenSlide (thread-safe C library; one handle is
    enough). ``path`` may be a folder holding a DICOM series."""

    @property
    def _openslide_path(self) -> Path:
        if self.path.is_dir():
            f = dicom_series_file(self.path)
            if f is None:
                raise SlideError(self.path, "a folder without DICOM files")
            return f
        return self.path

    def __init__(self, path, *, mpp=None):
        super().__init__(path, mpp=mpp)
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(self._openslide_path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            head = _head(self._openslide_path, 4)
            if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                raise SlideError(self.path, "TIFF header present but the file cannot be parsed: "
                                 "truncated or corrupt") from e
            raise SlideError(self.path, "not a format OpenSlide supports") from e
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"OpenSlide cannot read it ({e})") from e
        self._cache = TileCache.from_env()  # tiles of the levels read directly (_direct)
        props = dict(self._osr.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor")
        self.format = f"openslide:{self.vendor or 'unknown'}"
        self.level_shapes = [(h, w) for w, h in self._osr.level_dimensions]
        self._downsamples = list(self._osr.level_downsamples)
        mx, my = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        if mx and my:
            self._file_mpp = (_stored_mpp(mx) + _stored_mpp(my)) / 2
            self._file_mpp_source = "openslide.mpp"
        elif props.get("aperio.MPP"):  # stored, but OpenSlide could not read it as a number
            self._file_mpp, self._file_mpp_source = _stored_mpp(props["aperio.MPP"]), "aperio.MPP"
        if self._file_mpp is None:
            self._file_mpp, self._file_mpp_source = _tiff_resolution_mpp(self.path)
        try:
            obj = props.get("openslide.objective-power")
            self.objective_power = float(obj) if obj else None
        except ValueError:
            self.objective_power = None
        # levels of these TIFF-based formats may be read through their tiles (_direct)
        self._tiles_ok = self.vendor in ("aperio", "generic-tiff") and tiff_direct_enabled()
        # bounds of the scanned area (MRXS, SCN): reported so tissue detection can ignore padding
        try:
            self.bounds = tuple(int(props[f"openslide.bounds-{k}"]) for k in ("y", "x", "height", "width"))
        except KeyError:
            self.bounds = None

    @property
    def level_downsamples(self) -> list[float]:
        return self._downsamples

    @cached_property
    def associated_images(self) -> dict[str, np.ndarray]:
        out = {}
        for k, img in self._osr.associated_images.items():
            out[k] = np.asarray(img.convert("RGB"))
        return out

    def _tiff_level(self, level: int) -> _TileDecoder | None:
        """For a TIFF-based file (generic tiled TIFF, Aperio SVS...), a reader of the JPEG
        tiles behind OpenSlide's level ``level``; None for other formats or layouts."""
        cache = self.__dict__.setdefault("_tiff_levels", {})
        if level not in cache:
            with _DECODER_LOCK:
                if level not in cache:
                    try:
                        dec = _TileDecoder.for_openslide_level(self.path, self.level_shapes,
                                                               level)
                    except Exception:  # noqa: BLE001 - not a TIFF we can map: OpenSlide alone
                        dec = None
                    cache[level] = dec
        return cache[level]

    def _direct(self, level: int) -> _TileDecoder | None:
        """The level's tile reader when reading through it gives OpenSlide's pixels.

        Aperio SVS and generic tiled TIFF store each level as one tiled JPEG page that
        OpenSlide paints tile by tile without resampling; decoding those tiles directly
        (imagecodecs, libjpeg-turbo, in the reader threads) gives the same pixels several
        times faster than OpenSlide's read_region and its RGBA conversion. Checked once
        per level: the level's first tile must equal OpenSlide's read of it bit for bit,
        or OpenSlide keeps reading the level. ``LNMETA_TIFF_DIRECT=0`` turns it off.
        """
        direct = self.__dict__.setdefault("_direct_levels", {})
        if level in direct:
            return direct[level]
        dec = None
        if self._tiles_ok:
            dec = self._tiff_level(level)
            if dec is not None and (dec.spp != 3 or not dec.counts or not dec.counts[0]):
                dec = None
        if dec is not None:
            rows, cols = min(dec.th, dec.h), min(dec.tw, dec.w)
            try:
                ours = dec.tile(0, 0, check=False)
                img = self._osr.read_region((0, 0), level, (cols, rows))
                same = np.array_equal(ours, _rgba_to_rgb(np.asarray(img)))
            except Exception:  # noqa: BLE001 - OpenSlide alone decides what this level is
                same = False
            dec = dec if same else None
            if dec is not None:
                dec.fill = 255  # a tile left out is transparent in OpenSlide: white here
        direct[level] = dec
        return dec

    def _verify(self, level: int, y: int, x: int, h: int, w: int) -> None:
        if not self.__dict__.get("_check_reads", True):
            return
        if _jpeg_check_enabled() == "off":  # no TIFF to open for checks
            return
        dec = self._tiff_level(level)
        if dec is not None:
            dec.verify_region(y, x, h, w)

    def _read_level(self, level, y, x, h, w):
        dec = self._direct(level)
        if dec is not None:
            return _read_decoded(self, dec, y, x, h, w)
        ds = self._downsamples[level]
        self._verify(level, y, x, h, w)
        try:
            img = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except Exception as e:  # openslide raises OpenSlideError with the C message
            raise SlideError(self.path, f"cannot read region at level {level} ({e})") from e
        return _rgba_to_rgb(np.asarray(img))

    def read_region(self, location, size, *, level=None, mpp=None):
        if mpp is None and level is not None and 0 <= level < self.level_count:
            # Exact OpenSlide semantics: location is level-0, the read is at `level`.
            y0, x0 = int(location[0]), int(location[1])
            h, w = int(size[0]), int(size[1])
            ds = self._downsamples[level]
            ly, lx = y0 / ds, x0 / ds
            if (self._direct(level) is not None and ly == math.floor(ly)
                    and lx == math.floor(lx) and h > 0 and w > 0):
                # on whole level pixels OpenSlide does not resample: the same pixels
                return self._read_padded(level, int(ly), int(lx), h, w)
            self._verify(level, math.floor(ly), math.floor(lx), h, w)
            try:
                img = self._osr.read_region((x0, y0), level, (w, h))
            except Exception as e:
                raise SlideError(self.path, f"cannot read region ({e})") from e
            return _rgba_to_rgb(np.asarray(img))
        return super().read_region(location, size, level=level, mpp=mpp)

    def tile_shape(self, level):
        try:
            return (int(self.properties[f"openslide.level[{level}].tile-height"]),
                    int(self.properties[f"openslide.level[{level}].tile-width"]))
        except (KeyError, ValueError):
            return None

    def reserve_tile_cache(self, nbytes):
        import openslide

        self._cache.reserve(nbytes)  # levels read through their tiles (_direct)
        # OpenSlide caches decoded tiles as 4-byte RGBA (default 32 MiB per slide)
        want = int(nbytes * 4 / 3)
        if hasattr(openslide, "OpenSlideCache") and want > getattr(self, "_cache_bytes", 32 << 20):
            try:
                self._osr.set_cache(openslide.OpenSlideCache(want))
                self._cache_bytes = want
            except Exception:  # an OpenSlide without settable caches: keep its own
                pass

    def close(self):
        self._osr.close()
        for dec in self.__dict__.pop("_tiff_levels", {}).values():
            if dec is not None:
                dec.close()
        self.__dict__.pop("_direct_levels", None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_osr", None)
        state.pop("associated_images", None)
        state.pop("_cache_bytes", None)  # the new handle starts with OpenSlide's own cache
        for k in ("_tiff_levels", "_direct_levels", "_cache"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        import openslide

        self.__dict__.update(state)
        self._cache = TileCache.from_env()
        self._osr = openslide.OpenSlide(str(self._openslide_path))


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA to RGB on white (transparent = outside the scan)."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = rgb.astype(np.uint16) + (255 - a)
    return np.minimum(out, 255).astype(np.uint8)


def _region_workers() -> int:
    """Threads that decode the tiles of one large region read (``LNMETA_REGION_THREADS``;
    default up to 4)."""
    try:
        n = int(os.environ.get("LNMETA_REGION_THREADS", "0"))
    except ValueError:
        n = 0
    return n if n > 0 else max(1, min(4, os.cpu_count() or 1))


def _read_decoded(slide: Slide, dec: _TileDecoder, y: int, x: int, h: int, w: int) -> np.ndarray:
    """An in-bounds level window through a direct tile reader: small reads (patches)
    through the slide's tile cache, large ones (overviews, synthetic levels, tissue)
    decoded tile by tile in parallel threads straight into the output (no cache). JPEG tiles are
    checked once each, unless the slide is in :meth:`Slide.unchecked_reads`."""
    small = h * w <= 16 * dec.th * dec.tw  # up to ~4 x 4 tiles: patches, shared tiles
    check = slide.__dict__.get("_check_reads", True)
    # tiles decoded unchecked never enter the cache that checked reads are served from
    return dec.read(y, x, h, w, cache=slide._cache if small and check else None,
                    check=check, workers=1 if small else _region_workers())


def _tiff_resolution_mpp(path: Path) -> tuple[float | None, str | None]:
    """µm/px from TIFF XResolution/ResolutionUnit, when it is plausible for a slide."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            unit = page.tags.get("ResolutionUnit")
            xres = page.tags.get("XResolution")
            if unit is None or xres is None:
                return None, None
            num, den = xres.value
            if not num or not den:
                return None, None
            ppu = num / den
            factor = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if factor is None or ppu <= 0:
                return None, None
            mpp = factor / ppu
            if 0.05 <= mpp <= 100:
                return mpp, "tiff.resolution"
    except Exception:
        pass
    return None, None


# --------------------------------------------------------------------------------------
# tifffile: OME-TIFF and generic pyramidal TIFF (SubIFDs or pages)
# --------------------------------------------------------------------------------------
class TiffSlide(Slide):
    """OME-TIFF and pyramidal TIFF through tifffile's zarr store (decodes only needed tiles)."""

    def __init__(self, path, *, mpp=None):
        super().__init__(path, mpp=mpp)
        import tifffile

        try:
            tf = tifffile.TiffFile(self.path)
        except Exception as e:
            raise SlideError(self.path, f"not a readable TIFF ({e})") from e
        try:
            if not tf.series:
                raise SlideError(self.path, "the TIFF holds no image series")
            series = max(tf.series, key=lambda s: np.prod(s.shape))
            self._series_index = tf.series.index(series)
            self.format = "ome-tiff" if tf.is_ome else "tiff"
            self._axes = series.axes
            levels = series.levels
            shapes = []
            for lv in levels:
                shp = dict(zip(lv.axes, lv.shape, strict=True))
                shapes.append((shp["Y"], shp["X"]))
                if lv.dtype != np.uint8:
                    raise SlideError(self.path, f"pixel type {lv.dtype} is not 8-bit RGB")
            if "S" not in series.axes and "C" not in series.axes:
                self._gray = True
            else:
                ch = dict(zip(series.axes, series.shape, strict=True)).get("S") or \
                    dict(zip(series.axes, series.shape, strict=True)).get("C")
                if ch not in (3, 4):
                    raise SlideError(self.path, f"{ch} channels; an RGB slide has 3")
                self._gray = False
            self.level_shapes = shapes
            desc = tf.pages[0].description or ""
            self.properties = {"tiff.ImageDescription": desc[:2000]}
            self._read_ome_metadata(tf)
            if self._file_mpp is None:
                self._file_mpp, self._file_mpp_source = _aperio_desc_mpp(desc)
            if self._file_mpp is None:
                self._file_mpp, self._file_mpp_source = _tiff_resolution_mpp(self.path)
        except SlideError:
            tf.close()
            raise
        except Exception as e:
            tf.close()
            raise SlideError(self.path, f"unsupported TIFF layout ({e})") from e
        tf.close()
        self._local = threading.local()
        self._cache = TileCache.from_env()
        self._decoders: dict[int, _TileDecoder | None] = {}
        self._decoders_lock = threading.Lock()

    def _read_ome_metadata(self, tf) -> None:
        if not tf.is_ome:
            return
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tf.ome_metadata)
        except ET.ParseError:
            return
        for el in root.iter():
            if el.tag.endswith("}Pixels") or el.tag == "Pixels":
                px, py = el.get("PhysicalSizeX"), el.get("PhysicalSizeY")
                unit = el.get("PhysicalSizeXUnit", "µm")
                scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit)
                if px and py and scale:
                    self._file_mpp = (_stored_mpp(px) + _stored_mpp(py)) / 2 * scale
                    self._file_mpp_source = "ome.PhysicalSize"
                break
        for el in root.iter():
            if el.tag.endswith("}Objective"):
                mag = el.get("NominalMagnification")
                if mag:
                    self.objective_power = float(mag)
            if el.tag.endswith("}Instrument"):
                pass

    def _zarr_levels(self):
        loc = self._local
        if getattr(loc, "levels", None) is None:
            import tifffile
            import zarr

            loc.tf = tifffile.TiffFile(self.path)
            store = loc.tf.series[self._series_index].aszarr()
            z = zarr.open(store, mode="r")
            loc.levels = [z] if isinstance(z, zarr.Array) else [z[str(i)] for i in range(self.level_count)]
        return loc.levels

    def tile_shape(self, level):
        dec = self._tile_decoder(level)
        if dec is not None:
            return dec.th, dec.tw
        return self._tile_shape(self._zarr_levels()[level])

    def reserve_tile_cache(self, nbytes):
        self._cache.reserve(nbytes)

    def jpeg_tiles(self, level: int) -> _TileDecoder | None:
        """The level's tile reader when its tiles are plain YCbCr JPEG (whole tiles can be
        decoded on a GPU: see :class:`napari_lnmeta.core.inference.DeviceTileReader`)."""
        dec = self._tile_decoder(level)
        return dec if dec is not None and dec.jpeg_ycbcr else None

    def _tile_decoder(self, level: int) -> _TileDecoder | None:
        """The level's direct tile reader, or None where only the zarr store can read it."""
        if level not in self._decoders:
            with self._decoders_lock:
                if level not in self._decoders:
                    self._decoders[level] = _TileDecoder.for_level(
                        self.path, self._series_index, level)
        return self._decoders[level]

    def _read_level(self, level, y, x, h, w):
        dec = self._tile_decoder(level)
        if dec is not None:
            return _read_decoded(self, dec, y, x, h, w)
        arr = self._zarr_levels()[level]
        tile = self._tile_shape(arr)
        if tile is not None and self._cache.capacity and h * w <= 4 * tile[0] * tile[1]:
            return self._read_cached(level, arr, tile, y, x, h, w)
        return self._read_direct(arr, level, y, x, h, w)

    def _tile_shape(self, arr) -> tuple[int, int] | None:
        """The (rows, cols) of the level's TIFF tiles or strips, as its zarr chunks."""
        chunks = getattr(arr, "chunks", None)
        if not chunks or len(chunks) != len(self._axes):
            return None
        c = dict(zip(self._axes, chunks, strict=True))
        return int(c["Y"]), int(c["X"])

    def _read_cached(self, level, arr, tile, y, x, h, w):
        """Small reads of a level without a direct tile reader, assembled from tiles.

        Neighbouring and overlapping patches share tiles; like OpenSlide's tile cache, a
        bounded LRU of decoded tiles (``LNMETA_TILE_CACHE_MB``, default 64 MB per slide,
        shared by the reading threads) saves decoding the same tile again. Missing
        tiles come from one zarr read, so the store decodes them concurrently.
        """
        th, tw = tile
        lh, lw = self.level_shapes[level]
        keys = [(level, ty, tx) for ty in range(y // th, (y + h - 1) // th + 1)
                for tx in range(x // tw, (x + w - 1) // tw + 1)]
        tiles = {k: self._cache.get(k) for k in keys}
        missing = [k for k, t in tiles.items() if t is None]
        if missing:
            ty0, ty1 = min(k[1] for k in missing), max(k[1] for k in missing) + 1
            tx0, tx1 = min(k[2] for k in missing), max(k[2] for k in missing) + 1
            by, bx = ty0 * th, tx0 * tw
            block = self._read_direct(arr, level, by, bx, min(ty1 * th, lh) - by,
                                      min(tx1 * tw, lw) - bx)
            for k in missing:
                t = np.ascontiguousarray(block[k[1] * th - by:(k[1] + 1) * th - by,
                                               k[2] * tw - bx:(k[2] + 1) * tw - bx])
                self._cache.put(k, t)
                tiles[k] = t
        out = np.empty((h, w, 3), np.uint8)
        for (_, ty, tx), t in tiles.items():
            y0, x0 = max(y, ty * th), max(x, tx * tw)
            y1, x1 = min(y + h, ty * th + t.shape[0]), min(x + w, tx * tw + t.shape[1])
            out[y0 - y:y1 - y, x0 - x:x1 - x] = t[y0 - ty * th:y1 - ty * th,
                                                  x0 - tx * tw:x1 - tx * tw]
        return out

    def _read_direct(self, arr, level, y, x, h, w):
        ax = self._axes
        idx = []
        for a in ax:
            if a == "Y":
                idx.append(slice(y, y + h))
            elif a == "X":
                idx.append(slice(x, x + w))
            elif a in "SC":
                idx.append(slice(None))
            else:
                idx.append(0)
        dec = self._tile_decoder(level)
        if dec is not None and self.__dict__.get("_check_reads", True):
            dec.verify_region(y, x, h, w)  # the zarr store repairs damaged JPEG silently
        try:
            out = np.asarray(arr[tuple(idx)])
        except Exception as e:
            self._find_corrupt_tile(level, y, x, h, w, e)
            raise SlideError(self.path, f"cannot decode level {level} at ({y}, {x}): {e}") from e
        kept = [a for a in ax if a in "YXSC"]
        if self._gray:
            out = np.repeat(out[..., None], 3, axis=-1)
        else:
            if kept.index("Y") > kept.index("S" if "S" in kept else "C"):
                out = np.moveaxis(out, 0, -1)
            out = out[..., :3]
        return np.ascontiguousarray(out)

    def _find_corrupt_tile(self, level, y, x, h, w, err: Exception) -> None:
        """After a failed region read, raise the :class:`CorruptTileError` of the first
        tile in the region that does not decode (when the level has a tile reader)."""
        dec = self._tile_decoder(level)
        if dec is None:
            return
        for ty in range(y // dec.th, (y + h - 1) // dec.th + 1):
            for tx in range(x // dec.tw, (x + w - 1) // dec.tw + 1):
                dec.tile(ty, tx)  # raises CorruptTileError for the damaged one

    def close(self):
        with self._decoders_lock:
            for dec in self._decoders.values():
                if dec is not None:
                    dec.close()
            self._decoders.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_local", "_cache", "_decoders", "_decoders_lock"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()
        self._cache = TileCache.from_env()
        self._decoders = {}
        self._decoders_lock = threading.Lock()


def _stored_mpp(value) -> float:
    """A pixel size as stored in a file, as a float (NaN when it is not a number): the
    one rule (:mod:`napari_lnmeta.io.validate`) is applied once the slide is open, so a
    correct ``--mpp`` still overrides a broken stored value."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _aperio_desc_mpp(desc: str) -> tuple[float | None, str | None]:
    for part in desc.split("|"):
        k, _, v = part.partition("=")
        if k.strip() == "MPP":
            return _stored_mpp(v), "aperio.MPP"
    return None, None


# --------------------------------------------------------------------------------------
# zarr / OME-Zarr (NGFF multiscales)
# --------------------------------------------------------------------------------------
class ZarrSlide(Slide):
    """An RGB OME-Zarr (NGFF 0.4/0.5 multiscales, axes y,x,c or c,y,x) or a plain zarr array."""

    format = "ome-zarr"

    def __init__(self, path, *, mpp=None):
        super().__init__(path, mpp=mpp)
        import zarr

        try:
            node = zarr.open(str(self.path), mode="r")
        except Exception as e:
            raise SlideError(self.path, f"not a zarr store ({e})") from e
        if isinstance(node, zarr.Array):
            arrays, axes, scale0 = [node], None, None
            self.format = "zarr"
        else:
            attrs = dict(node.attrs)
            ome = attrs.get("ome")
            ms = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict)
                                              else None)
            if not ms:
                raise SlideError(self.path, "zarr group without OME-NGFF 'multiscales' metadata")
            try:
                arrays, axes, scale0 = self._read_multiscales(node, ms)
            except SlideError:
                raise
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                raise SlideError(self.path, "malformed OME-NGFF 'multiscales' metadata "
                                 f"({type(e).__name__}: {e})") from e
            self.properties = {"zarr.attrs": {k: v for k, v in attrs.items() if k != "multiscales"}}
        if axes is None:
            axes = ["y", "x", "c"] if arrays[0].ndim == 3 and arrays[0].shape[-1] in (3, 4) else \
                ["c", "y", "x"] if arrays[0].ndim == 3 else ["y", "x"]
        self._axes = axes
        if "y" not in axes or "x" not in axes:
            raise SlideError(self.path, f"axes {axes} have no y and x")
        if arrays[0].dtype != np.uint8:
            raise SlideError(self.path, f"pixel type {arrays[0].dtype} is not 8-bit RGB")
        self._arrays = arrays
        self.level_shapes = [(a.shape[axes.index("y")], a.shape[axes.index("x")]) for a in arrays]

    def _read_multiscales(self, node, ms):
        """Arrays, axis names and level-0 scale of an NGFF ``multiscales`` list."""
        if not isinstance(ms, list) or not isinstance(ms[0], dict):
            raise SlideError(self.path, "OME-NGFF 'multiscales' is not a list of objects")
        ms0 = ms[0]
        axes = [a["name"] if isinstance(a, dict) else a for a in ms0.get("axes", [])] or None
        if axes is not None and not all(isinstance(a, str) for a in axes):
            raise SlideError(self.path, f"OME-NGFF axes {axes!r} are not names")
        datasets = ms0["datasets"]
        if not isinstance(datasets, list) or not datasets:
            raise SlideError(self.path, "OME-NGFF 'multiscales' lists no datasets")
        arrays = []
        for d in datasets:
            a = node.get(str(d["path"])) if isinstance(d, dict) else None
            if a is None or not hasattr(a, "shape"):
                raise SlideError(self.path, f"OME-NGFF dataset {d!r} is not an array in the store")
            arrays.append(a)
        if axes is not None and (any(a.ndim != len(axes) for a in arrays) or "x" not in axes
                                 or "y" not in axes):
            raise SlideError(self.path, f"OME-NGFF axes {axes} do not fit the level-0 array "
                             f"of shape {tuple(arrays[0].shape)}")
        scale0 = None
        for t in datasets[0].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale0 = t["scale"]
        unit = None
        for a in ms0.get("axes", []):
            if isinstance(a, dict) and a.get("name") == "x":
                unit = a.get("unit")
        if scale0 is not None and axes is not None and unit in ("micrometer", "µm", "um"):
            if not isinstance(scale0, list) or len(scale0) != len(axes):
                raise SlideError(self.path, f"NGFF scale {scale0!r} does not match the "
                                 f"axes {axes}")
            sx = _stored_mpp(scale0[axes.index("x")])
            sy = _stored_mpp(scale0[axes.index("y")])
            self._file_mpp, self._file_mpp_source = (sx + sy) / 2, "ngff.scale"
        return arrays, axes, scale0

    def _index(self, y, x, h, w):
        return tuple(slice(y, y + h) if a == "y" else slice(x, x + w) if a == "x"
                     else slice(None) if a == "c" else 0 for a in self._axes)

    def _read_level(self, level, y, x, h, w):
        arr = self._arrays[level]
        try:
            out = np.asarray(arr[self._index(y, x, h, w)])
        except Exception as e:  # noqa: BLE001 - codecs raise many types for a damaged chunk
            raise self._corrupt_chunk(level, y, x, h, w, e) from e
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if "c" not in kept:
            out = np.repeat(out[..., None], 3, axis=-1)
        elif kept.index("c") == 0:
            out = np.moveaxis(out, 0, -1)
        if out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        return np.ascontiguousarray(out[..., :3])


    def _corrupt_chunk(self, level, y, x, h, w, err: Exception) -> SlideError:
        """The :class:`CorruptTileError` of the first chunk under the read that fails to
        decode (chunks are this format's tiles), else a SlideError for the region."""
        arr = self._arrays[level]
        ch = dict(zip(self._axes, arr.chunks, strict=False))
        th, tw = int(ch["y"]), int(ch["x"])
        lh, lw = self.level_shapes[level]
        ds = self.level_downsamples[level]
        for ty in range(max(y, 0) // th, (min(y + h, lh) - 1) // th + 1):
            for tx in range(max(x, 0) // tw, (min(x + w, lw) - 1) // tw + 1):
                try:
                    np.asarray(arr[self._index(ty * th, tx * tw, th, tw)])
                except Exception as e:  # noqa: BLE001
                    r0, c0 = ty * th, tx * tw
                    region = (round(r0 * ds), round(c0 * ds), round(min(r0 + th, lh) * ds),
                              round(min(c0 + tw, lw) * ds))
                    return CorruptTileError(self.path, level, (ty, tx), region,
                                            f"cannot decode the chunk ({type(e).__name__}: {e})")
        return SlideError(self.path, f"cannot read level {level} at ({y}, {x}): "
                                     f"{type(err).__name__}: {err}")


# --------------------------------------------------------------------------------------
# Plain images (png, jpg): one level in memory, coarser levels built lazily.
# --------------------------------------------------------------------------------------
class ImageSlide(Slide):
    format = "image"

    def __init__(self, path, *, mpp=None):
        super().__init__(path, mpp=mpp)
        from PIL import Image

        try:
            with Image.open(self.path) as im:
                im.load()
                self.properties = {f"image.{k}": str(v) for k, v in im.info.items()
                                   if isinstance(v, (str, int, float, tuple))}
                dpi = im.info.get("dpi")
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise SlideError(self.path, f"not a readable image ({type(e).__name__}: {e})") from e
        self._img = arr
        self.level_shapes = [arr.shape[:2]]
        if dpi and dpi[0] and dpi[0] > 1000:  # only a microscope-like density is a pixel size
            self._file_mpp, self._file_mpp_source = 25400.0 / float(dpi[0]), "image.dpi"

    def _read_level(self, level, y, x, h, w):
        return np.ascontiguousarray(self._img[y:y + h, x:x + w])


# --------------------------------------------------------------------------------------
# In-memory arrays (a napari layer, a test image)
# --------------------------------------------------------------------------------------
class ArraySlide(Slide):
    format = "array"

    def __init__(self, rgb: np.ndarray, *, mpp: float | None = None, name: str = "image"):
        super().__init__(Path(name), mpp=mpp)
        self._img = rgb
        self.level_shapes = [rgb.shape[:2]]

    def _read_level(self, level, y, x, h, w):
        return np.ascontiguousarray(self._img[y:y + h, x:x + w])


def array_slide(rgb: np.ndarray, *, mpp: float | None = None, name: str = "image") -> Slide:
    """Wrap an in-memory RGB array (a napari layer, a test image) as a :class:`Slide`."""
    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise InputError(f"{name}: expected an RGB image, got shape {arr.shape}")
    arr = np.ascontiguousarray(np.clip(arr[..., :3], 0, 255).astype(np.uint8))
    return ArraySlide(arr, mpp=mpp, name=name)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------
def _is_zarr_dir(p: Path) -> bool:
    return p.is_dir() and any((p / n).exists() for n in (".zgroup", ".zarray", "zarr.json"))


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _head(p: Path, n: int = 132) -> bytes:
    try:
        with open(p, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _is_dicom(p: Path) -> bool:
    """A DICOM Part-10 file: 128-byte preamble then ``DICM``."""
    return _head(p)[128:132] == b"DICM"


def dicom_series_file(folder: Path) -> Path | None:
    """The file OpenSlide is given for a DICOM series folder: the largest DICOM file
    (the full-resolution level); OpenSlide finds the other levels of the same series
    beside it. None when the folder holds no DICOM file."""
    try:
        files = [f for f in folder.iterdir() if f.is_file() and _is_dicom(f)]
    except OSError:
        return None
    if not files:
        return None
    return max(files, key=lambda f: (f.stat().st_size, f.name))


def _openslide_format(p: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(p))
    except Exception:
        return None


def sniff(path: str | Path) -> str | None:
    """Which backend would open ``path`` ('openslide', 'tiff', 'zarr', 'image'), or None.

    Decided by content, never by the name: the directory layout (zarr store, DICOM
    series), the first bytes (DICOM, TIFF, PNG/JPEG/BMP) and OpenSlide's format
    detection for everything else (MIRAX, Hamamatsu VMS/VMU...). No pixels are read.
    """
    p = Path(path)
    if p.is_dir():
        if _is_zarr_dir(p):
            return "zarr"
        return "openslide" if dicom_series_file(p) is not None else None
    if not p.is_file():
        return None
    head = _head(p)
    if head[128:132] == b"DICM":
        return "openslide"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"  # OpenSlide or tifffile: decided by _open_tiff
    if _openslide_format(p) is not None:
        return "openslide"
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM")):
        return "image"
    return None


def open_slide(path: str | Path, *, mpp: float | None = None,
               backend: str | None = None) -> Slide:
    """Open a slide, choosing the backend from its content (see :func:`sniff`).

    DICOM (a ``.dcm`` file or a folder holding a series) and vendor formats go to
    OpenSlide; OME-TIFF and SubIFD pyramids to tifffile (OpenSlide sees only their first
    level); other TIFFs to OpenSlide when it recognises them, else to tifffile; zarr
    stores and PNG/JPEG/BMP to their own readers. A level 0 larger than
    :func:`max_slide_pixels` is refused before anything is read.

    Raises
    ------
    SlideError
        One line naming the file and the problem (missing, empty, truncated,
        unsupported, not a zarr store, too large...).
    """
    p = Path(path)
    if not p.exists():
        raise SlideError(p, "no such file or directory")
    if p.is_file() and p.stat().st_size == 0:
        raise SlideError(p, "the file is empty")
    if p.is_dir() and not _is_zarr_dir(p) and dicom_series_file(p) is None:
        raise SlideError(p, "a directory that is not a zarr store (no .zgroup/.zarray/"
                         "zarr.json) nor a DICOM series (no DICOM file)")
    kind = backend or sniff(p)
    if kind is None:
        if p.is_file():
            head = _head(p)
            if head[128:132] == b"DICM":
                raise SlideError(p, "a DICOM file that is not a whole-slide image OpenSlide "
                                 "can read (VL Whole Slide Microscopy, TILED_FULL)")
            if p.name.lower().endswith(TIFF_SUFFIXES):
                raise SlideError(p, "not a TIFF file (bad magic bytes)")
        raise SlideError(p, "unsupported file type (expected a whole-slide image, DICOM, "
                         "OME-TIFF, OME-Zarr or PNG/JPEG)")
    if kind == "zarr":
        slide: Slide = ZarrSlide(p, mpp=mpp)
    elif kind == "image":
        slide = ImageSlide(p, mpp=mpp)
    elif kind == "openslide":
        if p.is_file() and _is_dicom(p) and _openslide_format(p) is None:
            raise SlideError(p, "a DICOM file that is not a whole-slide image OpenSlide "
                             "can read (VL Whole Slide Microscopy, TILED_FULL)")
        slide = OpenSlideSlide(p, mpp=mpp)
    elif kind == "tiff":
        slide = _open_tiff(p, mpp)
    else:
        raise ValueError(f"unknown backend {kind!r}")
    _check_size(slide)
    if slide._mpp_override is None and slide._file_mpp is not None:
        problem = mpp_problem(slide._file_mpp)
        if problem is not None:
            slide.close()
            raise SlideError(p, f"stored pixel size ({slide._file_mpp_source}): {problem}; "
                             f"a pixel size must be finite and within [{MPP_MIN:g}, "
                             f"{MPP_MAX:g}] µm/px (pass --mpp to give the right one)")
    if slide.mpp is None:
        warnings.warn(f"{p}: physical pixel size unknown; showing pixel units "
                      "(pass --mpp / mpp=... to set it)", MppWarning, stacklevel=2)
    return slide


def _check_size(slide: Slide) -> None:
    """Refuse an empty level or a level 0 beyond :func:`max_slide_pixels`."""
    if not slide.level_shapes or min(min(s) for s in slide.level_shapes) < 1:
        slide.close()
        raise SlideError(slide.path, f"declares an empty level ({slide.level_dimensions})")
    h, w = slide.shape
    limit = max_slide_pixels()
    if h * w > limit:
        slide.close()
        raise SlideError(slide.path, f"declares {w} x {h} px ({h * w:.3g} px), beyond the "
                         f"limit of {limit:.3g} px for one slide (LNMETA_MAX_SLIDE_PIXELS)")
    for level, tile in enumerate(_tiff_chunks(slide)):
        if tile[0] * tile[1] > MAX_CHUNK_PIXELS:
            slide.close()
            raise SlideError(slide.path, f"level {level} is stored as one piece of "
                             f"{tile[1]} x {tile[0]} px (a strip or tile beyond "
                             f"{MAX_CHUNK_PIXELS:.3g} px): it cannot be read in bounded "
                             "memory; convert it to a tiled TIFF")


def _tiff_chunks(slide: Slide) -> list[tuple[int, int]]:
    """``(rows, cols)`` of the strips or tiles of each level of a tifffile slide (any
    read decodes at least one whole); empty for other backends (OpenSlide and zarr read
    tiles of bounded size)."""
    if not isinstance(slide, TiffSlide):
        return []
    import tifffile

    try:
        with tifffile.TiffFile(slide.path) as tf:
            out = []
            for lv in tf.series[slide._series_index].levels:
                k = lv.keyframe
                if k.is_tiled:
                    out.append((int(k.tilelength), int(k.tilewidth)))
                else:
                    rows = int(k.rowsperstrip or k.imagelength)
                    out.append((min(rows, int(k.imagelength)), int(k.imagewidth)))
            return out
    except Exception:  # a layout tifffile cannot describe: its reads will say why
        return []


def _open_tiff(p: Path, mpp: float | None) -> Slide:
    fmt = _openslide_format(p)
    if fmt is not None and fmt != "generic-tiff":
        return OpenSlideSlide(p, mpp=mpp)  # a vendor TIFF (Aperio, Philips, Ventana...)
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            is_ome = tf.is_ome
            has_subifds = bool(tf.pages[0].subifds)
    except Exception as e:
        raise SlideError(p, "TIFF header present but the file cannot be parsed: truncated "
                         f"or corrupt ({type(e).__name__}: {e})") from e
    if fmt is not None and not is_ome and not has_subifds:
        try:
            return OpenSlideSlide(p, mpp=mpp)
        except SlideError:
            pass
    return TiffSlide(p, mpp=mpp)
