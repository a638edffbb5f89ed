"""Labelled patch sets from slides + label masks, read on the fly (no PNG export).

A :class:`PatchSet` is small: for each patch, which slide it comes from, the level-0
``(row, col)`` of its top-left corner, its class and its tumour fraction; plus, per
slide, the path and how to read it (patch size and µm/px or level). Pixels are read
from the slides when a batch is needed (:meth:`PatchSet.read`), through
:meth:`~napari_lnmeta.io.slide.Slide.read_region`, or from an optional zarr cache
(:func:`cache_patches_job`) or an in-memory copy (:meth:`PatchSet.load_pixels`).

Labelling follows seed 000: a patch is **positive** when more than ``positive_min``
(20 %) of it is tumour, **negative** when at most ``negative_max`` (0 %) is, and is left
out otherwise; negatives are subsampled to balance the classes. Fibrosis can count as
tumour (seed 000's "Tumor + FIB"). With several tumour classes (seed 001: negative /
breast metastasis / lymphoma) a patch takes the class that covers the largest share of
it, when that share is above ``positive_min``.

Splits are by slide (:func:`split_by_slide`) or by region of a slide
(:func:`split_by_region`), never by patch: overlapping patches of one region must not
end up on both sides.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, SlideError
from ..io import jsonio
from ..io.annotations import NEGATIVE_NAMES, LabelMask, load_labels
from ..progress import Job, Progress, run

if TYPE_CHECKING:
    from ..io.slide import Slide

PATCHSET_FORMAT = "lnmeta-patch-set"
PATCHSET_VERSION = 1
TUMOUR_SYNONYMS = frozenset({"tumour", "tumor", "metastasis", "metastases", "cancer",
                             "carcinoma", "positive", "breast metastasis"})
FIBROSIS_NAMES = frozenset({"fibrosis", "fib", "tumour fibrosis", "tumor fibrosis",
                            "tumour-associated fibrosis", "desmoplasia"})


@dataclass
class PatchConfig:
    """How patches are cut and labelled (one object from CLI / widget to the core).

    Attributes
    ----------
    patch_size
        Patch side in pixels at the read resolution (seed 000: 90).
    mpp, level
        Read resolution: µm/px (resampled from the nearest finer level) or a pyramid
        level; with neither, level 0.
    stride
        Grid step in read pixels (default: ``patch_size``, non-overlapping).
    classes
        Class names, negative class first (default ``["normal", "tumour"]``).
    positive_min
        A patch is of a positive class when that class covers *more* than this share.
    negative_max
        A patch is negative when all positive classes together cover at most this.
    min_tissue
        Minimum tissue fraction (Otsu tissue mask) of every kept patch.
    fibrosis_as_tumour
        Count fibrosis labels as tumour (seed 000 "Tumor + FIB").
    negatives
        ``"tissue"``: any tissue patch without tumour is negative (masks transferred
        from IHC, CAMELYON); ``"annotated"``: only patches inside regions labelled as
        normal (sparse drawn annotations).
    balance, neg_ratio
        Subsample negatives to ``neg_ratio`` x the number of positives.
    max_per_class
        Cap on patches per class per slide (after balancing), for quick runs.
    class_map
        Extra label-name -> class-name mapping (case-insensitive).
    require_mpp
        Refuse slides without a known µm/px (the model must know its resolution).
    seed
        Random seed of the subsampling.
    """

    patch_size: int = 90
    mpp: float | None = None
    level: int | None = None
    stride: int | None = None
    classes: list[str] = field(default_factory=lambda: ["normal", "tumour"])
    positive_min: float = 0.2
    negative_max: float = 0.0
    min_tissue: float = 0.5
    tissue_method: str = "otsu"
    fibrosis_as_tumour: bool = False
    negatives: str = "tissue"
    balance: bool = True
    neg_ratio: float = 1.0
    max_per_class: int | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    require_mpp: bool = True
    seed: int = 0

    def __post_init__(self):
        if int(self.patch_size) < 8:
            raise InputError(f"patch size must be at least 8 px, got {self.patch_size}")
        if not 0 <= self.negative_max < self.positive_min < 1 + 1e-9:
            raise InputError(f"need 0 <= negative_max ({self.negative_max}) < positive_min "
                             f"({self.positive_min}) <= 1")
        if len(self.classes) < 2:
            raise InputError(f"need at least 2 classes, got {self.classes}")
        if self.negatives not in ("tissue", "annotated"):
            raise InputError(f"negatives must be 'tissue' or 'annotated', got {self.negatives!r}")
        self.patch_size = int(self.patch_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
        from ..io.slide import open_slide

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
        from ..io.atomic import atomic_path

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
        from ..io.validate import check_mpp

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


# --------------------------------------------------------------------------------------
# Building patch sets
# --------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def class_values(labels: LabelMask, config: PatchConfig) -> tuple[dict[int, list[int]], list[int]]:
    """Which raster values count for each positive class, and which are negative.

    Returns ``({class index: [values]}, [negative values])``.
    """
    cls_norm = {_norm(c): i for i, c in enumerate(config.classes)}
    extra = {_norm(k): _norm(v) for k, v in config.class_map.items()}
    binary_tumour = len(config.classes) == 2
    pos: dict[int, list[int]] = {i: [] for i in range(1, len(config.classes))}
    neg: list[int] = []
    for value, name in labels.names.items():
        n = extra.get(_norm(name), _norm(name))
        if n in cls_norm:
            k = cls_norm[n]
            (neg.append(value) if k == 0 else pos[k].append(value))
        elif n in FIBROSIS_NAMES:
            if config.fibrosis_as_tumour:
                tum = next((i for c, i in cls_norm.items() if c in TUMOUR_SYNONYMS), 1)
                pos[tum].append(value)
            else:
                neg.append(value)
        elif n in TUMOUR_SYNONYMS and (binary_tumour or any(c in TUMOUR_SYNONYMS for c in cls_norm)):
            tum = next((i for c, i in cls_norm.items() if c in TUMOUR_SYNONYMS), 1)
            pos[tum].append(value)
        elif n in NEGATIVE_NAMES:
            neg.append(value)
        elif binary_tumour and n.startswith("class "):
            pos[1].append(value)  # an unnamed label in a binary task: tumour
        else:
            raise InputError(f"{labels.source or 'labels'}: label {value} ({name!r}) is not one "
                             f"of the classes {config.classes}; map it with class_map / "
                             "--class-map NAME=CLASS")
    return pos, neg


def fractions_of(labels: LabelMask, values: Sequence[int], coords: np.ndarray,
                 size0: float) -> np.ndarray:
    """Fraction of each square patch (top-left ``coords``, side ``size0`` level-0 px)
    covered by the label ``values`` of ``labels``."""
    from ..core.tissue import box_fractions, integral_image

    if not values:
        return np.zeros(len(coords), dtype=np.float64)
    m = np.isin(labels.labels, list(values))
    return box_fractions(integral_image(m), coords, size0, downsample=labels.frame.downsample,
                         origin=labels.frame.origin)


def patches_from_slide_job(slide: Slide | str | Path, labels: Any, config: PatchConfig, *,
                           source: str = "default", label_scale: float = 1.0,
                           mpp: float | None = None, tissue=None,
                           rng: np.random.Generator | None = None) -> Job[PatchSet]:
    """Cut the labelled patches of one slide (a progress generator returning a PatchSet).

    Parameters
    ----------
    slide
        An open slide or its path.
    labels
        Any source :func:`~napari_lnmeta.io.annotations.load_labels` accepts (a file,
        a :class:`LabelMask`, polygons, an array covering the slide).
    config
        Patch size, resolution and labelling rule.
    source
        Dataset source name (for :func:`mix`).
    label_scale
        Slide pixels per label-file pixel (polygon files made for another resolution).
    mpp
        Level-0 µm/px override for a slide file that does not state it.
    tissue
        A precomputed :class:`~napari_lnmeta.core.tissue.TissueMask` (else detected).

    Raises
    ------
    InputError
        Empty labels, labels outside the tissue, a label raster that does not fit the
        slide, a class without patches, a slide without µm/px.
    """
    from ..core.tiling import make_grid
    from ..core.tissue import tissue_mask
    from ..io.slide import open_slide

    sl = open_slide(slide, mpp=mpp) if isinstance(slide, (str, Path)) else slide
    if config.require_mpp and sl.mpp is None:
        raise SlideError(sl.path, "the physical pixel size (µm/px) is unknown; pass --mpp "
                         "(or mpp=...) so the model knows the resolution it is trained at")
    rng = rng or np.random.default_rng(config.seed)
    yield Progress(0, 4, f"{sl.name}: labels")
    lm = load_labels(labels, slide_shape=sl.shape, slide_mpp=sl.mpp, slide=sl.name,
                     scale=label_scale)
    lm.check_fits(sl.shape, sl.name)
    pos_values, neg_values = class_values(lm, config)
    present = set(lm.present())
    all_pos = [v for vs in pos_values.values() for v in vs]
    if not present:
        raise InputError(f"{lm.source or 'labels'}: the label layer is empty (no labelled pixels)")
    if not (present & set(all_pos)) and config.negatives == "tissue":
        raise InputError(f"{lm.source or 'labels'}: no pixel is labelled as "
                         f"{', '.join(config.classes[1:])} (values present: {sorted(present)})")
    yield Progress(1, 4, f"{sl.name}: tissue")
    if tissue is None:
        # coarse enough to be quick, fine enough that a patch spans >= ~8 mask pixels
        read_mpp = config.mpp or (sl.level_mpp(config.level or 0) if sl.mpp else None)
        target = 10.0 if read_mpp is None else min(32.0, max(8.0, read_mpp * config.patch_size / 8))
        tissue = tissue_mask(sl, target_mpp=target, method=config.tissue_method)
    tm = tissue
    yield Progress(2, 4, f"{sl.name}: grid")
    grid = make_grid(sl, patch_size=config.patch_size, stride=config.stride, mpp=config.mpp,
                     level=config.level, tissue=tm, min_tissue=config.min_tissue)
    if len(grid) == 0:
        raise InputError(f"{sl.name}: no patch of {config.patch_size} px has "
                         f">= {config.min_tissue:.0%} tissue")
    size0 = grid.size0
    fr = np.stack([fractions_of(lm, pos_values[k], grid.coords, size0)
                   for k in range(1, len(config.classes))], axis=1)
    total = fr.sum(axis=1)
    best = fr.argmax(axis=1) + 1
    best_frac = fr.max(axis=1)
    label = np.full(len(grid), -1, dtype=np.int64)
    label[best_frac > config.positive_min] = best[best_frac > config.positive_min]
    if config.negatives == "tissue":
        negmask = total <= config.negative_max + 1e-9
    else:
        nf = fractions_of(lm, neg_values, grid.coords, size0)
        negmask = (total <= config.negative_max + 1e-9) & (nf >= config.min_tissue)
    label[negmask & (label < 0)] = 0
    yield Progress(3, 4, f"{sl.name}: labelling")
    if all_pos and (present & set(all_pos)) and not np.any(total > 0):
        raise InputError(f"{lm.source or 'labels'}: the labels do not overlap the tissue of "
                         f"{sl.name} (no tissue patch contains a labelled pixel; check the label "
                         "scale / that they belong to this slide)")
    keep = np.flatnonzero(label >= 0)
    pos_n = int((label > 0).sum())
    neg_idx = np.flatnonzero(label == 0)
    if config.balance and pos_n and len(neg_idx) > config.neg_ratio * pos_n:
        n_keep = max(1, int(round(config.neg_ratio * pos_n)))
        chosen = rng.choice(neg_idx, n_keep, replace=False)
        keep = np.sort(np.r_[np.flatnonzero(label > 0), chosen])
    if config.max_per_class:
        parts = []
        for c in range(len(config.classes)):
            ci = keep[label[keep] == c]
            if len(ci) > config.max_per_class:
                ci = np.sort(rng.choice(ci, config.max_per_class, replace=False))
            parts.append(ci)
        keep = np.sort(np.concatenate(parts))
    entry = SlideEntry(path=str(sl.path), name=sl.name, patch_size=config.patch_size,
                       level=grid.level, mpp=grid.mpp if grid.level is None else None,
                       downsample=float(grid.downsample), slide_mpp=sl.mpp,
                       mpp_override=sl._mpp_override, source=source)
    ps = PatchSet([entry], np.zeros(len(keep), np.int32), grid.coords[keep], label[keep],
                  total[keep].astype(np.float32), config.classes,
                  meta={"config": config.to_json(), "read_mpp": grid.mpp,
                        "candidates": {"positive": pos_n, "negative": int(len(neg_idx)),
                                       "excluded": int((label < 0).sum()),
                                       "grid": int(len(grid))}})
    yield Progress(4, 4, f"{sl.name}: {len(ps)} patches")
    return ps


def build_patchset_job(items: Sequence[tuple[Any, Any]], config: PatchConfig, *,
                       sources: Sequence[str] | None = None,
                       label_scales: Sequence[float] | None = None,
                       mpps: Sequence[float | None] | None = None,
                       check_classes: bool = True) -> Job[PatchSet]:
    """Patch sets of several ``(slide, labels)`` pairs, joined.

    With ``check_classes`` a class that ends up without any patch is an error (naming
    the class and the slides).
    """
    if not items:
        raise InputError("no slides given")
    rng = np.random.default_rng(config.seed)
    sets = []
    n = len(items)
    for i, (slide, labels) in enumerate(items):
        job = patches_from_slide_job(
            slide, labels, config, source=(sources[i] if sources else "default"),
            label_scale=(label_scales[i] if label_scales else 1.0),
            mpp=(mpps[i] if mpps else None), rng=rng)
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                sets.append(stop.value)
                break
            yield Progress(i * 4 + p.done, n * 4, p.message)
    ps = PatchSet.concat(sets)
    if check_classes:
        check_class_counts(ps, what=", ".join(Path(str(s)).name for s, _ in items))
    return ps


def build_patchset(items, config: PatchConfig, **kw) -> PatchSet:
    """:func:`build_patchset_job`, run to completion."""
    return run(build_patchset_job(items, config, **kw))


def check_class_counts(ps: PatchSet, what: str = "the patch set") -> None:
    """InputError naming every class that has no patch."""
    counts = ps.counts()
    empty = [c for c, n in zip(ps.classes, counts, strict=True) if n == 0]
    if empty:
        raise InputError(f"{what}: no patches of class {', '.join(repr(c) for c in empty)} "
                         f"(counts: {dict(zip(ps.classes, counts.tolist(), strict=True))}); "
                         "label more of it, lower the positive threshold or the patch size")


# --------------------------------------------------------------------------------------
# Splits and mixing
# --------------------------------------------------------------------------------------
def split_by_slide(ps: PatchSet, *, test: Sequence[str] | None = None, test_fraction: float = 0.3,
                   seed: int = 0) -> tuple[PatchSet, PatchSet]:
    """Train / test split by whole slides (names or paths in ``test``, else a fraction)."""
    names = ps.slide_names()
    if test is None:
        if len(names) < 2:
            raise InputError("a split by slide needs at least 2 slides; use split_by_region "
                             "(--holdout-region) for a single slide")
        rng = np.random.default_rng(seed)
        k = min(len(names) - 1, max(1, int(round(test_fraction * len(names)))))
        test_idx = set(rng.choice(len(names), k, replace=False).tolist())
    else:
        wanted = {Path(t).name for t in test}
        test_idx = {i for i, e in enumerate(ps.slides) if e.name in wanted or e.path in set(test)}
        unknown = wanted - {ps.slides[i].name for i in test_idx}
        if unknown:
            raise InputError(f"test slides not in the patch set: {sorted(unknown)}")
    is_test = np.isin(ps.slide_index, list(test_idx))
    return ps.subset(~is_test), ps.subset(is_test)


def split_by_region(ps: PatchSet, box: Sequence[float], *, slide: str | None = None,
                    margin: float = 0.0) -> tuple[PatchSet, PatchSet]:
    """Train / test split by a level-0 rectangle ``(row0, col0, row1, col1)``.

    Test patches lie entirely inside the box; training patches entirely outside it
    grown by ``margin`` level-0 pixels; patches across the border are dropped from
    both, so no pixel is in both sets. ``slide`` restricts the box to one slide (other
    slides go to training).
    """
    outside, inside = region_masks(ps, box, slide=slide, margin=margin)
    return ps.subset(outside), ps.subset(inside)


def region_masks(ps: PatchSet, box: Sequence[float], *, slide: str | None = None,
                 margin: float = 0.0, what: str = "patch set") -> tuple[np.ndarray, np.ndarray]:
    """``(outside, inside)`` masks of :func:`split_by_region`'s rule over ``ps``'s patches."""
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (y1 > y0 and x1 > x0):
        raise InputError(f"hold-out region must be (row0, col0, row1, col1) with row1 > row0 "
                         f"and col1 > col0, got {tuple(box)}")
    size0 = np.array([e.patch_size * e.downsample for e in ps.slides])[ps.slide_index] \
        if len(ps) else np.zeros(0)
    r, c = ps.coords[:, 0].astype(np.float64), ps.coords[:, 1].astype(np.float64)
    inside = (r >= y0) & (c >= x0) & (r + size0 <= y1) & (c + size0 <= x1)
    m = float(margin)
    outside = (r + size0 <= y0 - m) | (r >= y1 + m) | (c + size0 <= x0 - m) | (c >= x1 + m)
    if slide is not None:
        on = np.array([e.name == Path(slide).name or e.path == str(slide) for e in ps.slides])
        if not on.any():
            raise InputError(f"slide {slide} is not in the {what}")
        on_p = on[ps.slide_index]
        inside &= on_p
        outside |= ~on_p
    return outside, inside


def mix(sets: dict[str, PatchSet], proportions: dict[str, float], *, total: int | None = None,
        seed: int = 0, stratify: bool = True) -> PatchSet:
    """Mix sources in given proportions (seed 000's "Interhospital": 50 % local, 50 % CAMELYON16).

    Samples without replacement; ``total`` defaults to the largest size every source
    can supply. With ``stratify`` each source keeps its own class balance.
    """
    if set(sets) != set(proportions):
        raise InputError(f"proportions {sorted(proportions)} do not match sources {sorted(sets)}")
    w = np.array([float(proportions[k]) for k in sets])
    if np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"proportions must be non-negative and not all zero: {proportions}")
    w = w / w.sum()
    sizes = np.array([len(s) for s in sets.values()])
    cap = int(np.floor(np.min(np.where(w > 0, sizes / np.where(w > 0, w, 1), np.inf))))
    total = cap if total is None else int(total)
    if total > cap:
        raise InputError(f"cannot draw {total} patches in proportions {proportions} "
                         f"(the sources supply at most {cap})")
    rng = np.random.default_rng(seed)
    parts = []
    for (name, ps), wi in zip(sets.items(), w, strict=True):
        k = int(round(total * wi))
        if k == 0:
            continue
        if stratify:
            counts = ps.counts().astype(np.float64)
            per = np.floor(counts / counts.sum() * k).astype(int)
            per[np.argmax(counts)] += k - per.sum()
            idx = np.concatenate([rng.choice(np.flatnonzero(ps.labels == c), per[c], replace=False)
                                  for c in range(len(ps.classes)) if per[c] > 0])
        else:
            idx = rng.choice(len(ps), k, replace=False)
        sub = ps.subset(np.sort(idx))
        for e in sub.slides:
            e.source = name
        parts.append(sub)
    return PatchSet.concat(parts)


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

    from ..io.atomic import atomic_path

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


__all__ = ["BatchLoader", "PatchConfig", "PatchSet", "SlideEntry", "TorchPatchDataset",
           "build_patchset", "build_patchset_job", "cache_patches_job", "check_class_counts",
           "class_values", "epoch_indices", "mix", "patches_from_slide_job", "split_by_region",
           "split_by_slide"]
