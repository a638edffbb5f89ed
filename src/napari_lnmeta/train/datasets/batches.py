"""Batches from patch sets: epoch order, the threaded :class:`BatchLoader`, the zarr
patch cache and a torch ``Dataset`` view.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...progress import Job, Progress
from .patchset import PatchSet


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------
def epoch_indices(ps: PatchSet, *, sampler: str = "shuffle", rng: np.random.Generator,
                  epoch_size: int | None = None) -> np.ndarray:
    """Patch order for one epoch.

    ``"shuffle"``: every patch once. ``"balanced"``: the same number from every class
    (``epoch_size / n_classes``, default the largest class; smaller classes are drawn
    with replacement), i.e. negatives are re-subsampled every epoch. ``"sequential"``:
    in order (evaluation).
    """
    n = len(ps)
    if sampler == "sequential":
        return np.arange(n)
    if sampler == "shuffle":
        idx = rng.permutation(n)
        return idx[:epoch_size] if epoch_size else idx
    if sampler == "balanced":
        counts = ps.counts()
        present = [c for c in range(len(counts)) if counts[c] > 0]
        per = (epoch_size // len(present)) if epoch_size else int(counts.max())
        parts = []
        for c in present:
            members = np.flatnonzero(ps.labels == c)
            parts.append(rng.choice(members, per, replace=len(members) < per))
        return rng.permutation(np.concatenate(parts))
    raise InputError(f"unknown sampler {sampler!r} (shuffle, balanced, sequential)")


class BatchLoader:
    """Batches of ``(patches uint8 (B, S, S, 3), labels (B,))`` read ahead in threads.

    Slide decoding (JPEG/JPEG-2000 in C) releases the GIL, so a few reader threads keep
    a training step on the CPU or GPU fed without copying slides into processes.
    """

    def __init__(self, ps: PatchSet, batch_size: int, *, sampler: str = "shuffle",
                 seed: int = 0, epoch_size: int | None = None, workers: int = 2,
                 prefetch: int = 4, drop_last: bool = False):
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        if len(ps) == 0:
            raise InputError("the patch set is empty")
        self.ps = ps
        self.batch_size = int(batch_size)
        self.sampler = sampler
        self.rng = np.random.default_rng(seed)
        self.epoch_size = epoch_size
        self.workers = max(1, int(workers))
        self.prefetch = max(1, int(prefetch))
        self.drop_last = drop_last
        self._order: np.ndarray | None = None
        self._skip = 0
        #: the sampler's random state just before the current epoch's order was drawn
        self.epoch_state: dict | None = None

    def _new_order(self) -> np.ndarray:
        self.epoch_state = self.rng.bit_generator.state
        return epoch_indices(self.ps, sampler=self.sampler, rng=self.rng,
                             epoch_size=self.epoch_size)

    def set_state(self, state: dict) -> None:
        """Continue from a saved sampler state at an epoch boundary."""
        self.rng.bit_generator.state = state
        self._order, self._skip = None, 0

    def resume_epoch(self, epoch_state: dict, skip: int) -> None:
        """Redraw an epoch's order from the state before it and start at batch ``skip``.

        The next iteration yields exactly the batches ``skip, skip + 1, ...`` an
        uninterrupted epoch would have yielded (the skipped ones are not read).
        """
        self.rng.bit_generator.state = epoch_state
        self._order = self._new_order()
        self._skip = max(0, int(skip))

    def __len__(self) -> int:
        if self._order is None:
            self._order = self._new_order()
        n = len(self._order)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = self._order if self._order is not None else self._new_order()
        self._order = None
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        chunks, self._skip = chunks[self._skip:], 0
        if self.ps._pixels is not None or self.workers <= 1:
            for c in chunks:
                yield self.ps.read(c), self.ps.labels[c]
            return
        with ThreadPoolExecutor(self.workers) as ex:
            futures = [ex.submit(self.ps.read, c) for c in chunks[:self.prefetch]]
            nxt = len(futures)
            try:
                for i, c in enumerate(chunks):
                    arr = futures[i].result()
                    if nxt < len(chunks):
                        futures.append(ex.submit(self.ps.read, chunks[nxt]))
                        nxt += 1
                    futures[i] = None
                    yield arr, self.ps.labels[c]
            finally:
                for f in futures:
                    if f is not None:
                        f.cancel()


def cache_patches_job(ps: PatchSet, path: str | Path, *, overwrite: bool = False,
                      chunk: int = 256) -> Job[Path]:
    """Write every patch of ``ps`` into a zarr store (``patches``: ``(N, S, S, 3)`` uint8)."""
    import zarr

    from ...io.atomic import atomic_path

    n, s = len(ps), ps.patch_size
    with atomic_path(path, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        root.attrs.update({"format": "lnmeta-patch-cache", "fingerprint": ps.fingerprint(),
                           "classes": ps.classes})
        arr = root.create_array("patches", shape=(n, s, s, 3), dtype="uint8",
                                chunks=(min(chunk, max(n, 1)), s, s, 3))
        for k, start in enumerate(range(0, n, chunk)):
            idx = np.arange(start, min(start + chunk, n))
            arr[start:start + len(idx)] = ps.read_blocked(idx)
            yield Progress(k + 1, math.ceil(n / chunk), "caching patches")
    return Path(path)


class TorchPatchDataset:
    """A ``torch.utils.data.Dataset``-compatible view: ``(uint8 (3, S, S) tensor, label)``.

    For users who prefer a ``DataLoader`` with worker processes; slides are reopened
    in each worker (handles are not pickled).
    """

    def __init__(self, ps: PatchSet, transform=None):
        self.ps = ps
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ps)

    def __getitem__(self, k: int):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(self.ps.read_one(int(k)))).permute(2, 0, 1)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.ps.labels[k])

    def __getstate__(self):
        d = dict(self.__dict__)
        ps = d["ps"]
        clone = PatchSet(ps.slides, ps.slide_index, ps.coords, ps.labels, ps.fractions,
                         ps.classes, ps.meta)
        clone._pixels = ps._pixels
        d["ps"] = clone
        return d
