"""Per-slide patch features for MIL, computed once on the device and cached on disk.

A feature cache is a zarr (format 2) group, ``<name>.features.zarr``::

    features   (N, D) float32 | float16   one row per patch, chunked (chunk, D)
    coords     (N, 2) int64               level-0 (row, col) of each patch's top-left corner
    index      (N, 2) int64               (row, col) of each patch in its regular grid
    entropy    (N,)   float32             grey entropy (bits), when the grid has it
    done       (K,)   uint8               1 for each finished chunk of rows (resuming)
    .zattrs["lnmeta"] = {"format": "lnmeta-features", "version": 1, "complete": bool,
                         "backbone": BackboneInfo.to_json(), "grid": PatchGrid.meta(),
                         "key": ..., "slide_path": ..., "slide_mpp": ..., "n": N, "dim": D}

so the features, where they come from on the slide (level-0 coordinates, µm/px, patch
size) and which backbone made them travel together. :meth:`FeatureCache.grid` rebuilds
the :class:`~napari_lnmeta.core.tiling.PatchGrid`, whose :meth:`~PatchGrid.frame` places
per-patch values (attention) on the slide.

Writing is resumable and atomic: rows are written chunk by chunk into
``.<name>.partial`` beside the target, each finished chunk is marked in ``done``; a
cancelled or crashed run leaves the partial store, and the next run with the same
backbone and grid continues where it stopped. The finished store is renamed to its
final name in one step, so a ``*.features.zarr`` is always complete.

:func:`slide_features_job` is the high-level entry: it derives a cache key from the
slide file and every parameter that changes the features, and returns the existing
cache without reading a pixel (not even for tissue detection) when it is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, ModelError, OutputExistsError
from ..progress import Job, Progress
from .tiling import PatchGrid

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.slide import Slide
    from ..models.extractor import BackboneInfo

FEATURES_FORMAT = "lnmeta-features"
FEATURES_VERSION = 1
SUFFIX = ".features.zarr"


@dataclass
class FeatureConfig:
    """How to turn a slide into patch features (one object from widget/CLI to core).

    Parameters
    ----------
    backbone
        Registry architecture name or a trained patch-model ``.safetensors`` file.
    init
        Weights for a registry backbone (safetensors); ``None``: random from ``seed``.
    seed
        Seed of a random initialisation (ignored with ``init`` or a model file).
    patch_size, stride
        Pixels at the read resolution; ``patch_size`` defaults to the model file's, or 256.
    patch_mpp, level
        Read resolution of the patches (µm/px, or a pyramid level); defaults to the model
        file's µm/px, else level 0. Stored as ``mpp`` in the cache key and, before this
        field was named ``patch_mpp``, in the feature store's ``config`` attribute.
    min_tissue
        Minimum tissue fraction of a patch (seed 003: patches from all tissue).
    entropy_min
        Drop patches whose grey Shannon entropy is below this (bits; seed 003).
    tissue_mpp
        µm/px at which tissue is detected.
    batch_size, device, amp
        Patches per forward pass, ``"auto"``/``"cpu"``/``"cuda"``, float16 autocast on CUDA.
    dtype
        ``"float32"`` or ``"float16"`` storage of the features.
    chunk
        Rows per zarr chunk, which is also the unit of resuming.
    """

    backbone: str = "resnet18"
    init: str | None = None
    seed: int = 0
    patch_size: int | None = None
    stride: int | None = None
    patch_mpp: float | None = None
    level: int | None = None
    min_tissue: float = 0.5
    entropy_min: float | None = None
    tissue_mpp: float = 10.0
    batch_size: int = 64
    device: str = "auto"
    amp: bool = False
    dtype: str = "float32"
    chunk: int = 1024

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
class FeatureCache:
    """A finished (or partial) feature store on disk; arrays are read on demand."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such feature cache")
        try:
            self._root = zarr.open_group(str(self.path), mode="r")
        except Exception as e:  # zarr raises several types for "not a group"
            raise InputError(f"{self.path}: not a feature cache ({e})") from e
        self.attrs: dict[str, Any] = dict(self._root.attrs).get("lnmeta", {})
        if self.attrs.get("format") != FEATURES_FORMAT:
            raise InputError(f"{self.path}: not a napari-lnmeta feature cache "
                             f"(format {self.attrs.get('format')!r})")
        if int(self.attrs.get("version", 0)) > FEATURES_VERSION:
            raise InputError(f"{self.path}: feature cache version {self.attrs['version']} is "
                             f"newer than this napari-lnmeta understands ({FEATURES_VERSION})")

    @classmethod
    def open(cls, path: str | Path) -> FeatureCache:
        """Open a store (same as the constructor)."""
        return cls(path)

    def __len__(self) -> int:
        return int(self.attrs["n"])

    def __repr__(self) -> str:
        return (f"<FeatureCache {self.path.name} {len(self)} x {self.dim} "
                f"backbone={self.backbone.id}{'' if self.complete else ' (partial)'}>")

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def backbone(self) -> BackboneInfo:
        from ..models.extractor import BackboneInfo

        return BackboneInfo.from_json(self.attrs["backbone"])

    @property
    def slide_name(self) -> str:
        return str(self.attrs["grid"]["slide"])

    @property
    def slide_path(self) -> str | None:
        return self.attrs.get("slide_path")

    @property
    def features(self):
        """The lazy ``(N, D)`` zarr array."""
        return self._root["features"]

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self._root["coords"][:], dtype=np.int64)

    @property
    def grid(self) -> PatchGrid:
        """The :class:`PatchGrid` the features were computed on."""
        m = self.attrs["grid"]
        entropy = self._root["entropy"][:] if "entropy" in self._root else None
        return PatchGrid(coords=self._root["coords"][:], index=self._root["index"][:],
                         grid_shape=tuple(m["grid_shape"]), origin=tuple(m["origin"]),
                         patch_size=int(m["patch_size"]), stride=int(m["stride"]),
                         downsample=float(m["downsample"]), level=m["level"], mpp=m["mpp"],
                         slide=m["slide"], slide_shape=tuple(m["slide_shape"]),
                         entropy=entropy, params=m.get("params", {}))

    def load(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Features as float32 numpy: all rows, or rows ``idx`` (any order)."""
        if not self.complete:
            raise InputError(f"{self.path}: the feature cache is incomplete (an interrupted "
                             "extraction); run the extraction again to finish it")
        arr = self.features
        if idx is None:
            return np.asarray(arr[:], dtype=np.float32)
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        rows = np.asarray(arr.get_orthogonal_selection((idx[order], slice(None))),
                          dtype=np.float32)
        out = np.empty_like(rows)
        out[order] = rows
        return out

    def check_backbone(self, expected: str | dict, *, what: str = "the model") -> None:
        """Raise :class:`ModelError` unless these features come from ``expected``.

        ``expected`` is a backbone id (``"resnet18:random-seed0"``) or a
        :meth:`BackboneInfo.to_json` dict.
        """
        from ..models.extractor import BackboneInfo

        exp = expected["id"] if isinstance(expected, dict) else str(expected)
        have = self.backbone.id
        if exp != have:
            raise ModelError(self.path, f"features come from backbone {have!r} but {what} "
                             f"expects {exp!r}; extract the features again with that backbone "
                             f"(lnmeta extract-features --backbone ...)")
        if isinstance(expected, dict):
            want = BackboneInfo.from_json(expected)
            if want.features_key() != self.backbone.features_key():
                raise ModelError(self.path, f"features come from {self.backbone.describe()} "
                                 f"but {what} expects {want.describe()}; extract the features "
                                 "again with the same input size and normalisation")


def open_features(path: str | Path) -> FeatureCache:
    """Open a ``*.features.zarr`` store (see module docstring)."""
    return FeatureCache(path)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _coords_digest(grid: PatchGrid) -> str:
    h = hashlib.sha1(np.ascontiguousarray(grid.coords).tobytes())
    h.update(json.dumps(grid.meta(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _create_store(tmp: Path, grid: PatchGrid, info: BackboneInfo, *, dtype: str, chunk: int,
                  attrs: dict[str, Any]):
    import zarr

    n, d = len(grid), int(info.feature_dim)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
    enc = {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    root.create_array("features", shape=(n, d), dtype=dtype, chunks=(max(1, min(chunk, n)), d),
                      fill_value=0, **enc)
    root.create_array("coords", data=np.asarray(grid.coords, np.int64), **enc)
    root.create_array("index", data=np.asarray(grid.index, np.int64), **enc)
    if grid.entropy is not None:
        root.create_array("entropy", data=np.asarray(grid.entropy, np.float32), **enc)
    n_chunks = max(1, -(-n // chunk))
    root.create_array("done", shape=(n_chunks,), dtype="uint8", chunks=(n_chunks,),
                      fill_value=0, **enc)
    root.attrs["lnmeta"] = attrs
    return root


def _finish(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.exists():
        if not overwrite:
            raise OutputExistsError(path)
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def make_preprocessor(info: BackboneInfo, device: Any) -> Any:
    """The extractor's :class:`~napari_lnmeta.models.extractor.Preprocessor` for ``info``,
    with the on-device stain normaliser a trained patch model asks for."""
    from ..models.extractor import Preprocessor
    from .stain import torch_normaliser

    stain = torch_normaliser(info.normalisation, device=device) if info.normalisation else None
    return Preprocessor(info, device, stain=stain)


def extract_features_job(slide: Slide, grid: PatchGrid, path: str | Path, *,
                         extractor: tuple[nn.Module, BackboneInfo],
                         batch_size: int = 64, device: str | torch.device = "auto",
                         amp: bool = False, dtype: str = "float32", chunk: int = 1024,
                         overwrite: bool = False, key: str | None = None,
                         extra_attrs: dict[str, Any] | None = None) -> Job[FeatureCache]:
    """Compute the features of every patch of ``grid`` into ``path`` (progress generator).

    Parameters
    ----------
    slide, grid
        The open slide and the patches to describe.
    path
        Target ``*.features.zarr``. A finished store with the same backbone and grid is
        returned as it is; a partial one (``.<name>.partial``) is resumed.
    extractor
        ``(module, info)`` from :func:`napari_lnmeta.models.extractor.load_extractor`.
    batch_size, device, amp
        Forward passes of ``batch_size`` patches (``0``: as many as fit the free memory
        of the GPU, :func:`~napari_lnmeta.models.extractor.auto_batch_size`) on
        ``device`` (``"auto"``: CUDA when
        available); ``amp`` autocasts to float16 on CUDA. Reading the next batch overlaps
        the forward pass of the current one.
    dtype, chunk
        Storage type and rows per chunk (the resume unit).
    overwrite
        Replace a finished store that does not match (backbone or grid differ).

    Returns
    -------
    FeatureCache
    """
    from ..io.atomic import output_lock

    with output_lock(path):  # one writer per output
        return (yield from _extract_features_job_locked(slide, grid, path, extractor=extractor, batch_size=batch_size, device=device, amp=amp, dtype=dtype, chunk=chunk, overwrite=overwrite, key=key, extra_attrs=extra_attrs))


def _extract_features_job_locked(slide: Slide, grid: PatchGrid, path: str | Path, *,
                                 extractor: tuple[nn.Module, BackboneInfo],
                                 batch_size: int = 64, device: str | torch.device = "auto",
                                 amp: bool = False, dtype: str = "float32", chunk: int = 1024,
                                 overwrite: bool = False, key: str | None = None,
                                 extra_attrs: dict[str, Any] | None = None) -> Job[FeatureCache]:
    import torch

    from ..models.io import resolve_device

    path = Path(path)
    model, info = extractor
    if dtype not in ("float32", "float16"):
        raise InputError(f"feature dtype must be float32 or float16, got {dtype!r}")
    if len(grid) == 0:
        raise InputError(f"{grid.slide}: no patches to extract features from (no tissue "
                         "passed the filters; lower --min-tissue / --entropy-min)")
    chunk = max(1, int(chunk))
    digest = _coords_digest(grid)
    attrs = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "complete": False,
             "backbone": info.to_json(), "grid": grid.meta(), "coords_digest": digest,
             "key": key, "slide_path": str(getattr(slide, "path", "")),
             "slide_mpp": getattr(slide, "mpp", None), "n": len(grid),
             "dim": int(info.feature_dim), "dtype": dtype, "chunk": chunk,
             **(extra_attrs or {})}

    def matches(a: dict[str, Any]) -> bool:
        return (a.get("format") == FEATURES_FORMAT
                and a.get("backbone", {}).get("id") == info.id
                and a.get("coords_digest") == digest and a.get("dtype") == dtype
                and int(a.get("chunk", -1)) == chunk)

    if path.exists():
        cache = FeatureCache(path)
        if cache.complete and matches(cache.attrs):
            yield Progress(len(grid), len(grid), "features cached")
            return cache
        if not overwrite:
            raise InputError(f"{path}: holds features of another backbone or patch grid "
                             f"({cache.backbone.id}, {len(cache)} patches); pass "
                             "overwrite=True (--overwrite) or choose another cache folder")

    import zarr

    tmp = _partial_path(path)
    root = None
    if tmp.exists():
        try:
            old = zarr.open_group(str(tmp), mode="r+")
            if matches(dict(old.attrs).get("lnmeta", {})):
                root = old
        except Exception:  # an unreadable partial store is simply rebuilt
            root = None
        if root is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if root is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        root = _create_store(tmp, grid, info, dtype=dtype, chunk=chunk, attrs=attrs)

    dev = resolve_device(device)
    model.to(dev)
    model.eval()
    prep = make_preprocessor(info, dev)
    if int(batch_size) <= 0:  # as many patches as fit the free GPU memory (64 on CPU)
        from ..models.extractor import auto_batch_size

        batch_size = auto_batch_size(model, info, dev, requested=1024) \
            if dev.type == "cuda" else 64
    batch_size = int(batch_size)
    feats, done_arr = root["features"], root["done"]
    done = np.asarray(done_arr[:], dtype=bool)
    n = len(grid)
    todo = [k for k in range(len(done)) if not done[k]]
    finished = int(sum(min(chunk, n - k * chunk) for k in range(len(done)) if done[k]))
    yield Progress(finished, n, "features (resumed)" if finished else "features")

    from concurrent.futures import ThreadPoolExecutor

    from .tiling import read_patches

    def batches():
        for k in todo:
            lo, hi = k * chunk, min((k + 1) * chunk, n)
            for b0 in range(lo, hi, batch_size):
                yield k, lo, hi, np.arange(b0, min(b0 + batch_size, hi))

    use_amp = amp and dev.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as pool:
        it = batches()
        nxt = next(it, None)
        pending = pool.submit(read_patches, slide, grid, nxt[3]) if nxt else None
        buf: list[np.ndarray] = []
        while nxt is not None:
            k, lo, hi, idx = nxt
            patches = pending.result()
            nxt = next(it, None)
            pending = pool.submit(read_patches, slide, grid, nxt[3]) if nxt else None
            with torch.inference_mode():
                x = prep(patches)
                if use_amp:
                    with torch.autocast("cuda", dtype=torch.float16):
                        f = model(x)
                else:
                    f = model(x)
                buf.append(f.float().cpu().numpy())
            finished += len(idx)
            if idx[-1] == hi - 1:  # chunk complete: write it and mark it done
                feats[lo:hi] = np.concatenate(buf).astype(dtype, copy=False)
                buf = []
                done[k] = True
                done_arr[:] = done.astype(np.uint8)
            yield Progress(finished, n, "features")
    root.attrs["lnmeta"] = {**dict(root.attrs)["lnmeta"], "complete": True}
    _finish(tmp, path, overwrite)
    return FeatureCache(path)


# --------------------------------------------------------------------------------------
# High level: one slide, one config, a cache folder
# --------------------------------------------------------------------------------------
def _slide_fingerprint(slide: Slide) -> dict[str, Any]:
    p = Path(slide.path)
    fp: dict[str, Any] = {"name": p.name, "shape": list(slide.shape), "mpp": slide.mpp}
    try:
        st = p.stat()
        fp.update(size=st.st_size, mtime=int(st.st_mtime))
    except OSError:
        pass
    return fp


def cache_key(slide: Slide, config: FeatureConfig, info: BackboneInfo,
              regions: str | Path | None = None) -> str:
    """A digest of everything that changes a slide's features (slide file, backbone, grid)."""
    from ..models.extractor import file_digest

    d = {"slide": _slide_fingerprint(slide), "backbone": info.id,
         "patch_size": info.patch_size, "stride": config.stride, "mpp": config.patch_mpp,
         "level": config.level, "min_tissue": config.min_tissue,
         "entropy_min": config.entropy_min, "tissue_mpp": config.tissue_mpp,
         "regions": None if regions is None else file_digest(regions),
         "dtype": config.dtype, "chunk": config.chunk}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(cache_dir: str | Path, slide: Slide, config: FeatureConfig, info: BackboneInfo,
               regions: str | Path | None = None) -> Path:
    """``<cache_dir>/<slide stem>.<backbone>.<key>.features.zarr``."""
    stem = Path(slide.path).name.split(".")[0]
    return Path(cache_dir) / f"{stem}.{info.name}.{cache_key(slide, config, info, regions)}{SUFFIX}"


def resolve_read_resolution(config: FeatureConfig, info: BackboneInfo) -> tuple[float | None, int | None]:
    """(mpp, level) to read at: the config's, else the patch model's µm/px, else level 0."""
    if config.patch_mpp is not None or config.level is not None:
        return config.patch_mpp, config.level
    return info.mpp, None


def slide_grid_job(slide: Slide, config: FeatureConfig, info: BackboneInfo, *,
                   regions: str | Path | None = None, region_scale: float = 1.0,
                   tissue: Any = None) -> Job[PatchGrid]:
    """The patch grid features are computed on: tissue (and regions), entropy filter."""
    from ..io.annotations import read_polygons
    from .tiling import make_grid_job
    from .tissue import tissue_mask_job

    yield Progress(0, 1, "detecting tissue")
    if tissue is None:  # answers Cancel while it runs; re-uses a mask already computed
        tissue = yield from tissue_mask_job(slide, target_mpp=config.tissue_mpp)
    mask = None
    if regions is not None:
        polys = [p for p in read_polygons(regions, scale=region_scale)
                 if p.label.lower() not in _NEGATIVE]
        if not polys:
            raise InputError(f"{regions}: no (non-negative) region polygons to take patches from")
        mask = [p.vertices for p in polys]
    mpp, level = resolve_read_resolution(config, info)
    grid = yield from make_grid_job(slide, patch_size=info.patch_size, stride=config.stride,
                                    mpp=mpp, level=level, tissue=tissue,
                                    min_tissue=config.min_tissue,
                                    entropy_min=config.entropy_min, mask=mask)
    if len(grid) == 0:
        raise InputError(f"{slide.name}: no patch passed the tissue/region/entropy filters "
                         f"(min_tissue={config.min_tissue}, entropy_min={config.entropy_min})")
    return grid


_NEGATIVE = frozenset({"normal", "negative", "exclusion", "excluded", "background", "other"})


def slide_features_job(slide: Slide, config: FeatureConfig, *,
                       cache_dir: str | Path | None = None, out: str | Path | None = None,
                       regions: str | Path | None = None, region_scale: float = 1.0,
                       extractor: tuple[nn.Module, BackboneInfo] | None = None,
                       tissue: Any = None, overwrite: bool = False) -> Job[FeatureCache]:
    """Features of one slide with ``config``, reusing the cache when it exists.

    Parameters
    ----------
    slide
        An open slide.
    config
        Backbone, patch grid and device settings.
    cache_dir, out
        Where the store goes: ``out`` exactly, or :func:`cache_path` under ``cache_dir``.
    regions
        Annotation file (CAMELYON JSON, ASAP XML, GeoJSON, ROI CSV): take patches only
        inside its (non-negative) polygons (seed 002); ``None``: all tissue (seed 003).
    region_scale
        Slide pixels per annotation pixel (e.g. ``1/32`` for level-0 polygons on a
        level-5 image).
    extractor
        A prebuilt ``(module, info)`` (saves rebuilding it for every slide of a cohort).
    """
    from ..models.extractor import load_extractor

    if (cache_dir is None) == (out is None):
        raise InputError("give exactly one of cache_dir or out for the feature store")
    if extractor is None:
        extractor = load_extractor(config.backbone, init=config.init, seed=config.seed,
                                   patch_size=config.patch_size, device="cpu")
    info = extractor[1]
    if config.patch_size is not None and config.patch_size != info.patch_size:
        raise InputError(f"patch size {config.patch_size} differs from the extractor's "
                         f"{info.patch_size}")
    key = cache_key(slide, config, info, regions)
    path = Path(out) if out is not None else cache_path(cache_dir, slide, config, info, regions)
    if path.exists() and not overwrite:
        cache = FeatureCache(path)
        if cache.complete and cache.attrs.get("key") == key:
            yield Progress(len(cache), len(cache), "features cached")
            return cache
    grid = yield from slide_grid_job(slide, config, info, regions=regions,
                                     region_scale=region_scale, tissue=tissue)
    return (yield from extract_features_job(
        slide, grid, path, extractor=extractor, batch_size=config.batch_size,
        device=config.device, amp=config.amp, dtype=config.dtype, chunk=config.chunk,
        overwrite=overwrite, key=key,
        extra_attrs={"config": config.to_json(),
                     "regions": None if regions is None else str(regions)}))


__all__ = ["FEATURES_FORMAT", "SUFFIX", "FeatureCache", "FeatureConfig", "cache_key", "cache_path",
           "extract_features_job", "make_preprocessor", "open_features", "resolve_read_resolution",
           "slide_features_job", "slide_grid_job"]
