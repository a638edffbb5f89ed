"""Parallel patch reads ahead of the model: :class:`BatchReader` (a thread pool and a
prefetch queue) and :class:`DeviceTileReader` (JPEG tiles decoded on the GPU), chosen by
:func:`make_reader`; the tile working set of a run.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from ...io.slide import Slide
    from ..tiling import PatchGrid

# --------------------------------------------------------------------------------------
# Parallel reads with a prefetch queue
# --------------------------------------------------------------------------------------
def context_grid(grid: PatchGrid, k: int) -> PatchGrid:
    """The grid of ``k x k``-patch windows centred on ``grid``'s patches (same order).

    A spatial-context model (seed 004, :mod:`napari_lnmeta.models.spatial`) reads each
    patch with its neighbours: a ``(k·p) x (k·p)`` window whose centre cell is the patch.
    The heatmap stays on ``grid`` (one cell per patch); only the reads use this grid.
    Windows reaching past the slide edge read white there, as patches do.
    """
    if k == 1:
        return grid
    from ...models.spatial import window_offset
    from ..tiling import PatchGrid

    off = window_offset(grid.size0, k)
    return PatchGrid(coords=grid.coords - off, index=grid.index, grid_shape=grid.grid_shape,
                     origin=(grid.origin[0] - off, grid.origin[1] - off),
                     patch_size=grid.patch_size * k, stride=grid.stride,
                     downsample=grid.downsample, level=grid.level, mpp=grid.mpp,
                     slide=grid.slide, slide_shape=grid.slide_shape,
                     params={**grid.params, "context": k})


def read_patches_into(out: np.ndarray, slide: Slide, grid: PatchGrid, idx: np.ndarray, *,
                      max_width: int = 4096) -> np.ndarray:
    """Read patches ``idx`` of ``grid`` into ``out`` (``(len(idx), S, S, 3)`` uint8).

    The same pixels as :func:`~napari_lnmeta.core.tiling.read_patches`, faster: when the
    grid reads a pyramid level (no resampling), neighbouring patches of one grid row are
    read as one region and sliced, so each tile is decoded once per row run instead of
    once per patch (with a stride of half a patch, pixels would otherwise be decoded four
    times). Runs are only merged where the level-0 positions are exact multiples of the
    stride, which makes the slices identical to single-patch reads; everything else goes
    through ``read_patches``.
    """
    from ..tiling import read_patches

    idx = np.asarray(idx)
    n = len(idx)
    if n == 0:
        return out
    if grid.level is None:
        out[:n] = read_patches(slide, grid, idx, workers=1)
        return out
    s, st, ds = grid.patch_size, grid.stride, float(grid.downsample)
    rows, cols = grid.index[idx, 0], grid.index[idx, 1]
    coords = grid.coords[idx]
    per_run = max(1, (max_width - s) // st + 1)
    brk = np.flatnonzero((rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [n]])
    for a0, b0 in zip(starts, ends, strict=True):
        for a in range(int(a0), int(b0), per_run):
            b = min(int(b0), a + per_run)
            m = np.arange(b - a)
            exact = (np.all(coords[a:b, 0] == coords[a, 0])
                     and np.array_equal(coords[a:b, 1] - coords[a, 1], m * st * ds))
            if b - a == 1 or not exact:
                out[a:b] = read_patches(slide, grid, idx[a:b], workers=1)
                continue
            loc = (int(coords[a, 0]), int(coords[a, 1]))
            region = slide.read_region(loc, (s, (b - a - 1) * st + s), level=grid.level)
            for k in range(b - a):
                out[a + k] = region[:, k * st:k * st + s]
    return out


def level_origins(grid: PatchGrid, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``(rows, cols)`` of patches ``idx`` in pixels of the grid's read level
    (as :meth:`Slide.read_region` maps level-0 locations)."""
    ds = float(grid.downsample)
    return (np.floor(grid.coords[idx, 0] / ds).astype(np.int64),
            np.floor(grid.coords[idx, 1] / ds).astype(np.int64))


def tile_working_set(slide: Slide, grid: PatchGrid, batches: list[np.ndarray],
                     window: int) -> int:
    """Bytes of decoded tiles that ``window`` consecutive batches share, or 0.

    Patches smaller than a tile, or a stride below the patch size, read the same stored
    tile several times; reader threads work on ``window`` batches at once, so the tile
    cache must hold their tiles or it decodes them again (up to ~3x the work with eight
    threads). Returns 0 when reads do not share tiles (nothing to gain from caching) or
    the tile layout is unknown. A few windows along the slide are sampled.
    """
    if grid.level is None or not batches:
        return 0
    ts = slide.tile_shape(grid.level)
    if not ts:
        return 0
    th, tw = ts
    s = grid.patch_size
    starts = sorted({0, max(0, len(batches) // 2 - window // 2), max(0, len(batches) - window)})
    need, touches, unique = 0, 0, 0
    for a in starts:
        ly, lx = level_origins(grid, np.concatenate(batches[a:a + window]))
        ty0, ty1 = ly // th, (ly + s - 1) // th
        tx0, tx1 = lx // tw, (lx + s - 1) // tw
        keys = []
        for dy in range(int((ty1 - ty0).max()) + 1):
            for dx in range(int((tx1 - tx0).max()) + 1):
                ok = (ty0 + dy <= ty1) & (tx0 + dx <= tx1)
                keys.append(((ty0 + dy)[ok] << 32) | (tx0 + dx)[ok])
        keys = np.concatenate(keys)
        n = len(np.unique(keys))
        touches, unique = touches + len(keys), unique + n
        need = max(need, n)
    if touches < 1.2 * unique:  # each tile read about once: a cache would not help
        return 0
    return int(need * th * tw * 3 * 1.25)


class BatchReader:
    """Reads batches of grid patches in a thread pool, ``depth`` batches ahead.

    Each batch is split over the threads and written straight into a reusable buffer
    (page-locked when ``pin``), so the model never waits on I/O when reading is faster
    than the forward pass. Iterating yields ``(indices, buffer_view, slot)``; give the
    slot back with :meth:`release` once the buffer's data is no longer needed.
    """

    def __init__(self, slide: Slide, grid: PatchGrid, batches: list[np.ndarray], *,
                 batch_size: int, workers: int = 0, depth: int = 3, pin: bool = False,
                 on_corrupt_tile: str = "fail"):
        import torch

        self.on_corrupt_tile = on_corrupt_tile
        #: grid patch index -> CorruptTileError, for patches left blank (``"skip"``)
        self.corrupt: dict[int, Exception] = {}
        self._corrupt_lock = threading.Lock()

        self.slide, self.grid, self.batches = slide, grid, batches
        self.workers = workers or self.default_workers()
        self.depth = max(1, int(depth))
        s = grid.patch_size
        self.slots: list[torch.Tensor] = []
        for _ in range(self.depth + 2):
            t = torch.empty((batch_size, s, s, 3), dtype=torch.uint8)
            self.slots.append(t.pin_memory() if pin else t)
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.slots)):
            self.free.put(i)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lnmeta-read")
        self.pending: deque = deque()
        self.next = 0
        self.wait_s = 0.0
        self._stop = threading.Event()

    @staticmethod
    def default_workers() -> int:
        """Reader threads when none are asked for: one per core, at most 16.

        JPEG decoding releases the GIL but the per-patch Python around it does not, so
        threads help less than cores: on a 16-core GPU host 16 threads read 1.3-1.7x as
        fast as 8 (docs/inference.md)."""
        return min(16, os.cpu_count() or 1)

    def _fill(self, slot: int, idx: np.ndarray, part: slice) -> None:
        if self._stop.is_set():
            return
        from ...io.slide import CorruptTileError

        buf = self.slots[slot].numpy()
        try:
            read_patches_into(buf[part], self.slide, self.grid, idx[part])
        except CorruptTileError:
            if self.on_corrupt_tile != "skip":
                raise
            for k in range(part.start, part.stop):  # patch by patch: find the damaged ones
                try:
                    read_patches_into(buf[k:k + 1], self.slide, self.grid, idx[k:k + 1])
                except CorruptTileError as e:
                    buf[k] = 0
                    with self._corrupt_lock:
                        self.corrupt[int(idx[k])] = e

    def _submit(self) -> None:
        idx = self.batches[self.next]
        self.next += 1
        slot = self.free.get()
        n = len(idx)
        parts = max(1, min(self.workers, n // 4 or 1))
        edges = np.linspace(0, n, parts + 1).astype(int)
        futs = [self.pool.submit(self._fill, slot, idx, slice(a, b))
                for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
        self.pending.append((idx, slot, futs))

    def __iter__(self):
        while self.next < len(self.batches) and len(self.pending) < self.depth:
            self._submit()
        while self.pending:
            idx, slot, futs = self.pending.popleft()
            t0 = time.perf_counter()
            for f in futs:
                f.result()  # re-raises read errors here, in the consumer
            self.wait_s += time.perf_counter() - t0
            if self.next < len(self.batches):
                self._submit()
            yield idx, self.slots[slot][:len(idx)], slot

    def release(self, slot: int) -> None:
        self.free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


class DeviceTileReader:
    """Reads batches as compressed JPEG tiles and decodes them on the device (nvJPEG).

    On a GPU the model can outrun the CPU cores decoding JPEG (a resnet18 at 224 px takes
    ~42 000 patches/s on an H100; 16 reader threads decode ~16 000). For slides whose
    level is tiled in plain YCbCr JPEG, this reader only reads the tiles' bytes on the
    CPU; one thread decodes each batch's tiles with ``torchvision.io.decode_jpeg`` on the
    device, on its own CUDA stream, ``depth`` batches ahead, and cuts the patches out
    with one gather (pixels outside the level are white, like every read). Tiles shared
    with the previous batch are kept. Iterating yields ``(indices, patches on the
    device, slot)`` like :class:`BatchReader`.

    The decoder is checked against the CPU decoder on the first tiles (:meth:`check`;
    nvJPEG's chroma upsampling differs from libjpeg-turbo's by ~2 grey levels on
    average); the engine falls back to :class:`BatchReader` when it differs by more than
    4 (e.g. a colour space read wrongly) or fails.

    Measured on an H100 with 16 cores (docs/inference.md): decoding alone reaches 36 600
    patches/s of 224 px against 13 100 for 16 reader threads, but decoding then shares
    the GPU with the model, so the resnet18 pipeline went only from 17 300 to 19 900
    patches/s and the resnet50 one dropped from 11 700 to 9 800. Hence opt-in.
    """

    def __init__(self, slide: Slide, grid: PatchGrid, batches: list[np.ndarray], *,
                 device: torch.device, tiles, depth: int = 3):
        import torch

        self.slide, self.grid, self.batches = slide, grid, batches
        self.device = device
        self.tiles = tiles
        self.depth = max(1, int(depth))
        self.level_shape = slide.level_shapes[grid.level]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lnmeta-jpeg")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: deque = deque()
        self.next = 0
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._prev: tuple[dict, torch.Tensor] | None = None  # last batch's tiles

    # -- decoding ------------------------------------------------------------------------
    def _decode(self, keys: list[tuple[int, int]]):
        """Tiles ``keys`` as one ``(n, th, tw, 3)`` uint8 tensor on the device."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        th, tw = self.tiles.th, self.tiles.tw
        out = torch.empty((len(keys), th, tw, 3), dtype=torch.uint8, device=self.device)
        prev_pos, prev_t = self._prev if self._prev is not None else ({}, None)
        todo, data = [], []
        for i, k in enumerate(keys):
            if k in prev_pos:
                out[i] = prev_t[prev_pos[k]]
                continue
            b = self.tiles.jpeg(*k)
            if b is None:  # a tile left out of the file: tifffile's fill value
                out[i] = 0
                continue
            todo.append(i)
            data.append(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        if data:
            with warnings.catch_warnings():
                # torchvision 0.29 announces TorchCodec as its successor; the call stays
                warnings.simplefilter("ignore", DeprecationWarning)
                imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            for i, img in zip(todo, imgs, strict=True):
                if img.shape[1:] != (th, tw):
                    raise ValueError(f"a JPEG tile decoded to {tuple(img.shape[1:])}, "
                                     f"not the TIFF's {th}x{tw}")
                out[i] = img.permute(1, 2, 0)
        self._prev = ({k: i for i, k in enumerate(keys)}, out)
        return out

    def _patches(self, idx: np.ndarray):
        """The batch's patches ``(B, S, S, 3)`` uint8 on the device."""
        import torch

        g = self.grid
        th, tw = self.tiles.th, self.tiles.tw
        lh, lw = self.level_shape
        s = g.patch_size
        ly, lx = level_origins(g, idx)
        ty0 = np.clip(ly, 0, lh - 1) // th
        ty1 = np.clip(ly + s - 1, 0, lh - 1) // th
        tx0 = np.clip(lx, 0, lw - 1) // tw
        tx1 = np.clip(lx + s - 1, 0, lw - 1) // tw
        ymin, xmin = int(ty0.min()), int(tx0.min())
        lut = np.full((int(ty1.max()) - ymin + 1, int(tx1.max()) - xmin + 1), -1, np.int64)
        keys: list[tuple[int, int]] = []
        for a, b, c, d in zip(ty0, ty1, tx0, tx1, strict=True):
            for ty in range(int(a), int(b) + 1):
                for tx in range(int(c), int(d) + 1):
                    if lut[ty - ymin, tx - xmin] < 0:
                        lut[ty - ymin, tx - xmin] = len(keys)
                        keys.append((ty, tx))
        tiles = self._decode(keys).reshape(-1, 3)  # (n*th*tw, 3)
        dev = self.device
        r = torch.arange(s, device=dev)
        rows = torch.as_tensor(ly, device=dev)[:, None] + r  # (B, S)
        cols = torch.as_tensor(lx, device=dev)[:, None] + r
        inside = (((rows >= 0) & (rows < lh))[:, :, None]
                  & ((cols >= 0) & (cols < lw))[:, None, :])
        rows, cols = rows.clamp(0, lh - 1), cols.clamp(0, lw - 1)
        lut_t = torch.as_tensor(lut, device=dev)
        out = torch.empty((len(idx), s, s, 3), dtype=torch.uint8, device=dev)
        step = max(1, (1 << 24) // (s * s))  # bound the index tensors (~128 MB)
        for a in range(0, len(idx), step):
            rr, cc = rows[a:a + step], cols[a:a + step]
            tid = lut_t[(rr // th - ymin)[:, :, None], (cc // tw - xmin)[:, None, :]]
            flat = (tid * th + (rr % th)[:, :, None]) * tw + (cc % tw)[:, None, :]
            out[a:a + step] = tiles[flat]
        if not bool(inside.all()):
            out[~inside] = 255
        return out

    def _prepare(self, idx: np.ndarray):
        import torch

        if self._stop.is_set():
            return None
        if self.stream is None:
            return self._patches(idx), None
        with torch.cuda.stream(self.stream):
            x = self._patches(idx)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return x, ev

    def check(self) -> float:
        """Largest mean absolute difference of the device decoder against the CPU one,
        over a few tiles of the first batch (0 when they agree exactly)."""
        import torch

        th, tw = self.tiles.th, self.tiles.tw
        ly, lx = level_origins(self.grid, self.batches[0][:4])
        keys = sorted({(int(y), int(x)) for y, x in
                       zip(np.clip(ly, 0, self.level_shape[0] - 1) // th,
                           np.clip(lx, 0, self.level_shape[1] - 1) // tw, strict=True)})
        self._prev = None
        dev = self._decode(keys).cpu().numpy()
        worst = 0.0
        for k, d in zip(keys, dev, strict=True):
            cpu = self.tiles.tile(*k)  # a missing tile is zeros on both sides
            h, w = cpu.shape[:2]
            diff = np.abs(d[:h, :w].astype(np.int16) - cpu.astype(np.int16)).mean()
            worst = max(worst, float(diff))
        self._prev = None
        if self.stream is not None:
            torch.cuda.synchronize(self.device)
        return worst

    # -- the BatchReader interface -------------------------------------------------------
    def _submit(self) -> None:
        idx = self.batches[self.next]
        self.next += 1
        self.pending.append((idx, self.pool.submit(self._prepare, idx)))

    def __iter__(self):
        import torch

        while self.next < len(self.batches) and len(self.pending) < self.depth:
            self._submit()
        while self.pending:
            idx, fut = self.pending.popleft()
            t0 = time.perf_counter()
            x, ev = fut.result()
            if ev is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(ev)
                x.record_stream(main)  # the allocator must not reuse it under the model
            self.wait_s += time.perf_counter() - t0
            if self.next < len(self.batches):
                self._submit()
            yield idx, x, -1

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_reader(slide: Slide, grid: PatchGrid, batches: list[np.ndarray], *,
                batch_size: int, device: torch.device, workers: int = 0, depth: int = 3,
                decode: str = "cpu", on_corrupt_tile: str = "fail") -> tuple[Any, str]:
    """The reader for a run and its name: with ``decode="device"`` whole JPEG tiles
    decoded on the device where the level allows it and the decoder agrees with the
    CPU's, else (and with ``"cpu"``) the reader threads."""
    if decode not in ("cpu", "device"):
        raise ValueError(f"decode must be cpu or device, not {decode!r}")
    want = decode == "device"
    tiles = slide.jpeg_tiles(grid.level) if want and grid.level is not None else None
    if tiles is not None and batches:
        reader = DeviceTileReader(slide, grid, batches, device=device, tiles=tiles,
                                  depth=depth)
        try:
            diff = reader.check()
        except Exception as e:  # no nvJPEG, an unusual JPEG: the threads read instead
            reader.close()
            warnings.warn(f"{slide.path}: decoding JPEG tiles on {device} failed ({e}); "
                          "decoding on the CPU", RuntimeWarning, stacklevel=2)
        else:
            if diff <= 4.0:
                return reader, f"jpeg-{device.type}"
            reader.close()
            warnings.warn(f"{slide.path}: the {device} JPEG decoder differs from the CPU's "
                          f"by {diff:.1f} grey levels on average; decoding on the CPU",
                          RuntimeWarning, stacklevel=2)
    reader = BatchReader(slide, grid, batches, batch_size=batch_size, workers=workers,
                         depth=depth, pin=device.type == "cuda", on_corrupt_tile=on_corrupt_tile)
    return reader, "threads"
