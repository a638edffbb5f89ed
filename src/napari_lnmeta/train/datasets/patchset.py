"""The patch set: per patch its slide, level-0 corner, class and tumour fraction; per
slide how to read it. Pixels are read on demand (:meth:`PatchSet.read`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import InputError
from ...io import jsonio
from ...progress import Job, Progress, run

if TYPE_CHECKING:
    from ...io.slide import Slide

PATCHSET_FORMAT = "lnmeta-patch-set"
PATCHSET_VERSION = 1


# --------------------------------------------------------------------------------------
# The patch set
# --------------------------------------------------------------------------------------
@dataclass
class SlideEntry:
    """One slide of a patch set and how its patches are read."""

    path: str
    name: str
    patch_size: int
    level: int | None
    mpp: float | None          # read µm/px (None when reading a level)
    downsample: float          # level-0 px per read px
    slide_mpp: float | None    # level-0 µm/px used (override or file)
    mpp_override: float | None = None
    source: str = "default"    # dataset source, for mixing (e.g. "local", "camelyon16")

    def open(self) -> Slide:
        from ...io.slide import open_slide

        return open_slide(self.path, mpp=self.mpp_override)


class PatchSet:
    """Labelled patches over one or more slides (see module docstring).

    Attributes
    ----------
    slides
        :class:`SlideEntry` per slide.
    slide_index, coords, labels, fractions
        Per patch: index into ``slides``, level-0 ``(row, col)``, class index, and the
        fraction of the patch covered by positive classes.
    classes
        Class names, negative first.
    """

    def __init__(self, slides: Sequence[SlideEntry], slide_index, coords, labels, fractions=None,
                 classes: Sequence[str] = ("normal", "tumour"), meta: dict | None = None):
        self.slides = list(slides)
        self.slide_index = np.asarray(slide_index, dtype=np.int32).reshape(-1)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = len(self.labels)
        self.fractions = (np.zeros(n, np.float32) if fractions is None
                          else np.asarray(fractions, dtype=np.float32).reshape(-1))
        self.classes = [str(c) for c in classes]
        self.meta = dict(meta or {})
        if not (len(self.slide_index) == len(self.coords) == n == len(self.fractions)):
            raise ValueError("slide_index, coords, labels and fractions differ in length")
        sizes = {s.patch_size for s in self.slides}
        if len(sizes) > 1:
            raise InputError(f"slides of one patch set must share a patch size, got {sorted(sizes)}")
        self._pixels: np.ndarray | None = None
        self._cache = None
        self._handles: dict[int, Slide] = {}
        self._lock = threading.Lock()

    # -- basics -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}={n}" for c, n in zip(self.classes, self.counts(), strict=True))
        return f"<PatchSet {len(self)} patches ({counts}) from {len(self.slides)} slide(s)>"

    @property
    def patch_size(self) -> int:
        return self.slides[0].patch_size if self.slides else 0

    @property
    def read_mpp(self) -> float | None:
        """µm/px of the patches (the first slide's; ``None`` when unknown)."""
        if not self.slides:
            return None
        s = self.slides[0]
        return s.mpp if s.mpp is not None else (
            None if s.slide_mpp is None else s.slide_mpp * s.downsample)

    def counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def slide_names(self) -> list[str]:
        return [s.name for s in self.slides]

    def sources(self) -> np.ndarray:
        """Source name of every patch."""
        names = np.array([s.source for s in self.slides] or [""], dtype=object)
        return names[self.slide_index] if len(self) else np.array([], dtype=object)

    def subset(self, idx) -> PatchSet:
        """The patches ``idx`` (indices or a bool mask); unused slides are dropped."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        used = np.unique(self.slide_index[idx])
        remap = np.full(len(self.slides), -1, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        out = PatchSet([self.slides[i] for i in used], remap[self.slide_index[idx]],
                       self.coords[idx], self.labels[idx], self.fractions[idx], self.classes,
                       self.meta)
        if self._pixels is not None:
            out._pixels = self._pixels[idx]
        return out

    @classmethod
    def concat(cls, sets: Sequence[PatchSet]) -> PatchSet:
        """Join patch sets (same classes and patch size); identical slides are merged."""
        sets = [s for s in sets if s is not None]
        if not sets:
            raise InputError("no patch sets to join")
        classes = sets[0].classes
        for s in sets[1:]:
            if s.classes != classes:
                raise InputError(f"patch sets have different classes: {classes} vs {s.classes}")
        slides: list[SlideEntry] = []
        keys: dict[tuple, int] = {}
        si, co, la, fr = [], [], [], []
        for s in sets:
            remap = []
            for e in s.slides:
                k = (e.path, e.level, e.mpp, e.patch_size, e.source, e.mpp_override)
                if k not in keys:
                    keys[k] = len(slides)
                    slides.append(e)
                remap.append(keys[k])
            remap_a = np.asarray(remap, dtype=np.int32)
            si.append(remap_a[s.slide_index] if len(s) else s.slide_index)
            co.append(s.coords)
            la.append(s.labels)
            fr.append(s.fractions)
        out = cls(slides, np.concatenate(si), np.concatenate(co), np.concatenate(la),
                  np.concatenate(fr), classes, sets[0].meta)
        if all(s._pixels is not None for s in sets):
            out._pixels = np.concatenate([s._pixels for s in sets])
        return out

    # -- reading --------------------------------------------------------------------------
    def _slide(self, i: int) -> Slide:
        with self._lock:
            if i not in self._handles:
                self._handles[i] = self.slides[i].open()
            return self._handles[i]

    def read_one(self, k: int) -> np.ndarray:
        """Patch ``k`` as ``(S, S, 3)`` uint8."""
        if self._pixels is not None:
            return self._pixels[k]
        if self._cache is not None:
            return np.asarray(self._cache[k])
        e = self.slides[int(self.slide_index[k])]
        slide = self._slide(int(self.slide_index[k]))
        loc = (int(self.coords[k, 0]), int(self.coords[k, 1]))
        s = e.patch_size
        if e.level is not None:
            return slide.read_region(loc, (s, s), level=e.level)
        return slide.read_region(loc, (s, s), mpp=e.mpp)

    def read(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches ``idx`` as ``(B, S, S, 3)`` uint8 (from memory, cache or slides)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self._pixels is not None:
            return self._pixels[idx]
        if self._cache is not None:
            order = np.argsort(idx)
            out = np.empty((len(idx), self.patch_size, self.patch_size, 3), np.uint8)
            out[order] = self._cache.get_orthogonal_selection((idx[order],)) \
                if hasattr(self._cache, "get_orthogonal_selection") else self._cache[idx[order]]
            return out
        s = self.patch_size
        out = np.empty((len(idx), s, s, 3), np.uint8)
        for j, k in enumerate(idx):
            out[j] = self.read_one(int(k))
        return out

    def read_blocked(self, idx: Sequence[int] | np.ndarray, *, block: int = 1024) -> np.ndarray:
        """Like :meth:`read`, but neighbouring patches share one region read.

        Patches read from a pyramid level are grouped by ``block`` x ``block`` level
        pixels; each group is read as one region and cut into patches, which is much
        faster than one ``read_region`` per patch when patches overlap or are dense
        (building a cache, loading a set into memory, evaluating a whole region).
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        s = self.patch_size
        out = np.empty((len(idx), s, s, 3), np.uint8)
        if self._pixels is not None or self._cache is not None:
            return self.read(idx)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for j, k in enumerate(idx):
            si = int(self.slide_index[k])
            e = self.slides[si]
            if e.level is None:
                out[j] = self.read_one(int(k))
                continue
            ly = math.floor(self.coords[k, 0] / e.downsample)
            lx = math.floor(self.coords[k, 1] / e.downsample)
            groups.setdefault((si, ly // block, lx // block), []).append(j)
        for (si, _, _), js in groups.items():
            e = self.slides[si]
            slide = self._slide(si)
            ks = idx[js]
            ly = np.floor(self.coords[ks, 0] / e.downsample).astype(np.int64)
            lx = np.floor(self.coords[ks, 1] / e.downsample).astype(np.int64)
            y0, x0 = int(ly.min()), int(lx.min())
            h, w = int(ly.max()) - y0 + s, int(lx.max()) - x0 + s
            lds = slide.level_downsamples[e.level]
            region = slide.read_region((int(round(y0 * lds)), int(round(x0 * lds))), (h, w),
                                       level=e.level)
            for j, yy, xx in zip(js, ly - y0, lx - x0, strict=True):
                out[j] = region[yy:yy + s, xx:xx + s]
        return out

    def load_pixels(self, *, workers: int = 2) -> np.ndarray:
        """Read every patch into memory once (``N * S * S * 3`` bytes); later reads are free."""
        return run(self.load_pixels_job(workers=workers))

    def spatial_order(self, block: int = 1024) -> np.ndarray:
        """Patch indices sorted by slide and ``block``-sized tile (for blocked reads)."""
        ds = np.array([e.downsample for e in self.slides] or [1.0])[self.slide_index]
        by = (self.coords[:, 0] / ds // block).astype(np.int64)
        bx = (self.coords[:, 1] / ds // block).astype(np.int64)
        return np.lexsort((self.coords[:, 1], bx, by, self.slide_index))

    def load_pixels_job(self, *, workers: int = 2, chunk: int = 2048) -> Job[np.ndarray]:
        if self._pixels is not None:
            return self._pixels
        n, s = len(self), self.patch_size
        out = np.empty((n, s, s, 3), np.uint8)
        order = self.spatial_order()
        chunks = [order[i:i + chunk] for i in range(0, n, chunk)]
        with ThreadPoolExecutor(max(1, workers)) as ex:
            for k, (idx, arr) in enumerate(zip(chunks, ex.map(self.read_blocked, chunks),
                                               strict=True)):
                out[idx] = arr
                yield Progress(k + 1, len(chunks), "reading patches")
        self._pixels = out
        return out

    def attach_cache(self, path: str | Path) -> None:
        """Read patches from a zarr cache written by :func:`cache_patches_job`."""
        import zarr

        path = Path(path)
        try:
            root = zarr.open_group(str(path), mode="r")
            arr = root["patches"]
        except Exception as e:  # zarr raises several types for a missing / foreign store
            raise InputError(f"{path}: not a patch cache ({type(e).__name__}: {e})") from e
        if root.attrs.get("fingerprint") != self.fingerprint():
            raise InputError(f"{path}: the patch cache was made for another patch set")
        self._cache = arr

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha1()
        h.update(self.coords.tobytes())
        h.update(self.slide_index.tobytes())
        h.update(json.dumps([(e.path, e.level, e.mpp, e.patch_size) for e in self.slides]).encode())
        return h.hexdigest()

    def close(self) -> None:
        for s in self._handles.values():
            s.close()
        self._handles.clear()

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """``.npz`` with arrays and JSON metadata (no pickles), atomically."""
        from ...io.atomic import atomic_path

        meta = {"format": PATCHSET_FORMAT, "version": PATCHSET_VERSION, "classes": self.classes,
                "slides": [asdict(e) for e in self.slides], "meta": self.meta}
        with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, slide_index=self.slide_index, coords=self.coords,
                                labels=self.labels, fractions=self.fractions,
                                meta=np.array(jsonio.dumps(meta)))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PatchSet:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such patch-set file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("slide_index", "coords", "labels", "fractions")}
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise InputError(f"{path}: not a patch-set file ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != PATCHSET_FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise InputError(f"{path}: not a patch-set file (format {fmt!r})")
        try:
            return cls._from_file(path, meta, arrays)
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise InputError(f"{path}: malformed patch-set metadata ({what})") from e

    @classmethod
    def _from_file(cls, path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> PatchSet:
        """Validate the metadata and arrays of a patch-set file (see :meth:`load`)."""
        from ...io.validate import check_mpp

        def bad(problem: str) -> InputError:
            return InputError(f"{path}: malformed patch-set metadata: {problem}")

        if not isinstance(meta["slides"], list):
            raise bad("'slides' is not a list")
        classes = meta["classes"]
        if not isinstance(classes, list) or len(classes) < 2 or not all(
                isinstance(c, str) for c in classes):
            raise bad(f"'classes' {classes!r} is not a list of >= 2 names")
        if meta.get("meta") is not None and not isinstance(meta["meta"], dict):
            raise bad("'meta' is not an object")
        known = set(SlideEntry.__dataclass_fields__)
        slides = []
        for i, e in enumerate(meta["slides"]):
            if not isinstance(e, dict) or not {"path", "name", "patch_size", "level", "mpp",
                                               "downsample", "slide_mpp"} <= set(e):
                raise bad(f"slide {i} is not a complete slide entry")
            if set(e) - known:
                raise bad(f"slide {i} has unknown keys {sorted(set(e) - known)}")
            if not isinstance(e["path"], str) or not isinstance(e["name"], str):
                raise bad(f"slide {i}: 'path' and 'name' must be strings")
            ps = e["patch_size"]
            if isinstance(ps, bool) or not isinstance(ps, int) or not (1 <= ps <= 8192):
                raise bad(f"slide {i}: patch_size {ps!r} is not a whole number of pixels")
            if e["level"] is not None and (isinstance(e["level"], bool)
                                           or not isinstance(e["level"], int) or e["level"] < 0):
                raise bad(f"slide {i}: level {e['level']!r} is not a level number")
            ds = e["downsample"]
            if isinstance(ds, bool) or not isinstance(ds, (int, float)) or not (
                    math.isfinite(ds) and ds > 0):
                raise bad(f"slide {i}: downsample {ds!r} is not a finite number > 0")
            for k in ("mpp", "slide_mpp", "mpp_override"):
                if e.get(k) is not None:
                    e[k] = check_mpp(e[k], what=f"slide {i} '{k}'", path=path)
            slides.append(SlideEntry(**e))
        si, labels = arrays["slide_index"], arrays["labels"]
        coords, fr = arrays["coords"], arrays["fractions"]
        for name, a in arrays.items():
            if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.isfinite(a).all()):
                raise bad(f"array '{name}' is not finite numbers ({a.dtype})")
        n = len(labels)
        if labels.ndim != 1 or si.shape != (n,) or coords.shape != (n, 2) or fr.shape != (n,):
            raise bad(f"arrays differ in length or shape (labels {labels.shape}, slide_index "
                      f"{si.shape}, coords {coords.shape}, fractions {fr.shape})")
        if n and (si.min() < 0 or si.max() >= len(slides)):
            raise bad(f"slide_index outside 0..{len(slides) - 1}")
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise bad(f"labels outside 0..{len(classes) - 1}")
        return cls(slides, si, coords, labels, fr, classes, meta.get("meta"))
