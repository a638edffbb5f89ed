"""Whole-slide patch inference: tissue-only grid -> parallel reads -> model -> heatmap grid.

The pipeline (one generator, the same in the CLI, the widget and the tests)::

    tissue mask (low resolution)  ->  PatchGrid over tissue only
      -> thread pool reading batches of patches ahead of the model (prefetch queue;
         page-locked buffers and non-blocking copies on CUDA)
      -> on the device: uint8 -> float, stain normalisation (when the model asks),
         mean/std, channels-last, AMP on CUDA, optional 8-direction TTA (seed 004)
      -> tumour probability per patch, written into a heatmap grid with one cell per
         stride (PatchGrid.frame(): cells centred on their patch, level-0 aligned).

Memory is bounded by the batch buffers and the heatmap grid (one value per stride):
nothing is ever held at slide resolution.

Resumable: with a ``checkpoint_dir``, the heatmap and a done-mask are written there as
zarr every ``checkpoint_seconds`` and when the run stops (cancel, error); a later run
with the same parameters restores them and only reads the patches left.

The batch size is chosen from free device memory (a probe forward measures the memory
per patch) and halves on out-of-memory errors; the run continues with the smaller size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, ModelError
from ..io import jsonio
from ..progress import Job, Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.omezarr import SlideFrame
    from ..io.slide import Slide
    from ..models.io import ModelMeta
    from .tiling import PatchGrid
    from .tissue import TissueMask

#: class names taken to mean "tumour" (case-insensitive), best first
TUMOUR_NAMES = ("tumour", "tumor", "metastasis", "metastases", "positive", "cancer",
                "malignant", "breast metastasis")
#: relative difference between asked and trained µm/px above which a warning is recorded
MPP_TOLERANCE = 0.05
CHECKPOINT_VERSION = 1


@dataclass
class InferenceConfig:
    """Everything a whole-slide inference run needs besides the slide.

    Parameters
    ----------
    model
        Path of a ``.safetensors`` model file; ``None`` uses the bundled default model.
    mpp
        Read resolution in µm/px (default: the model's). Needs the slide's µm/px.
    level
        Read this pyramid level instead of a µm/px.
    patch_size
        Patch side in read pixels (default: the model's; anything else is refused).
    stride
        Step between patches in read pixels (default: ``patch_size``); a smaller stride
        gives a finer heatmap (seed 004 uses 64).
    tta
        Average the probabilities of the 8 dihedral transforms (seed 004).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    batch_size
        Patches per forward pass; ``0`` chooses from free memory.
    amp
        Mixed precision (float16 autocast) on CUDA; ignored on CPU.
    channels_last
        Run convolutions in NHWC memory format.
    compile
        ``torch.compile`` the model (slow first batch; fixed batch shapes).
    workers
        Reader threads; ``0`` = one per CPU core (at most 16).
    decode
        Where JPEG tiles are decoded: ``"cpu"`` (the reader threads) or ``"device"``
        (whole tiles by nvJPEG on the GPU, for plain JPEG-tiled TIFF/OME-TIFF levels; see
        :class:`DeviceTileReader`). The GPU then decodes and runs the model in turn, so
        it pays only where the CPU cannot feed the GPU (few cores, a small model).
    prefetch
        Batches read ahead of the model.
    tissue_mpp, tissue_method, min_tissue
        Tissue detection resolution and method, and the tissue fraction a patch needs.
    tumour_class
        Name of the tumour class in the model's classes (default: recognised by name).
    heatmap_dtype
        Storage type of the written heatmap: ``"float16"`` or ``"uint8"``.
    lesion_threshold, lesion_radius_um, lesion_method
        Lesion candidates: ``"nms"``, non-maximum suppression with that radius (seed
        004), or ``"components"``, one per connected component above the threshold
        (the CAMELYON16 winner's rule).
    top_k
        Cells averaged for the top-k slide score.
    checkpoint_seconds
        How often progress is saved to the checkpoint folder.
    partial_seconds
        How often a copy of the filling heatmap is attached to a progress step.
    on_corrupt_tile
        What a stored tile that fails to decode or the JPEG checks does
        (:class:`~napari_lnmeta.io.slide.CorruptTileError`, docs/formats.md): ``"fail"``
        stops the run with an error naming the tile; ``"skip"`` marks the cells whose
        patches touch it as unknown (NaN in the heatmap, left out of lesions and score,
        counted in the summary). ``"skip"`` needs ``decode="cpu"``.
    """

    model: str | None = None
    mpp: float | None = None
    level: int | None = None
    patch_size: int | None = None
    stride: int | None = None
    tta: bool = False
    device: str = "auto"
    batch_size: int = 0
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    workers: int = 0
    decode: str = "cpu"
    prefetch: int = 3
    tissue_mpp: float = 10.0
    tissue_method: str = "otsu"
    min_tissue: float = 0.5
    tumour_class: str | None = None
    heatmap_dtype: str = "float16"
    lesion_threshold: float = 0.5
    lesion_radius_um: float = 200.0
    lesion_method: str = "nms"
    top_k: int = 10
    checkpoint_seconds: float = 10.0
    partial_seconds: float = 1.0
    max_batch_size: int = 1024
    on_corrupt_tile: str = "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InferenceConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PartialHeatmap:
    """What a progress step carries while the heatmap fills in (a copy, safe to keep)."""

    probability: np.ndarray
    scored: np.ndarray
    frame: SlideFrame


@dataclass
class InferenceResult:
    """A finished (or resumed-and-finished) whole-slide run.

    Attributes
    ----------
    probability
        ``grid_shape`` float32 tumour probability; 0 where nothing was analysed.
    scored
        ``grid_shape`` bool: the cells that were analysed (tissue patches).
    frame
        Where the heatmap sits on the slide (one cell per stride, centred on its patch).
    grid, tissue
        The patch grid and tissue mask used.
    meta
        The model's metadata.
    params
        Resolved parameters (read µm/px or level, patch size, stride, TTA, tumour class...).
    timing
        Seconds per stage, patches analysed in this run, patches/s, read stall time.
    warnings
        Things the user should know (µm/px mismatch, unknown slide µm/px...).
    unknown
        ``grid_shape`` bool: cells whose patch touched a corrupt tile (``on_corrupt_tile
        ="skip"``); their probability is NaN and they are not in ``scored``.
    corrupt_tiles
        The corrupt tiles met in this run (level, tile, level-0 region, problem).
    """

    probability: np.ndarray
    scored: np.ndarray
    frame: SlideFrame
    grid: PatchGrid
    tissue: TissueMask
    meta: ModelMeta
    params: dict[str, Any]
    timing: dict[str, Any]
    device: str
    batch_size: int
    slide_path: str
    model_path: str | None
    config: InferenceConfig
    warnings: list[str] = field(default_factory=list)
    resumed: int = 0
    unknown: np.ndarray | None = None
    corrupt_tiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def size0(self) -> float:
        """Patch side in level-0 pixels."""
        return float(self.grid.size0)


# --------------------------------------------------------------------------------------
# Model, device and parameters
# --------------------------------------------------------------------------------------
def resolve_device(device: str | None = "auto") -> torch.device:
    """``"auto"`` -> first CUDA device when available, else CPU; refuses missing CUDA."""
    import torch

    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but CUDA is not available here "
                             "(use --device auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    return dev


def tumour_index(meta: ModelMeta, name: str | None = None, *, model_path: str = "model") -> int:
    """Index of the tumour class in ``meta.classes`` (by ``name`` or recognised by name)."""
    classes = [c.lower() for c in meta.classes]
    if name is not None:
        if name.lower() in classes:
            return classes.index(name.lower())
        raise ModelError(model_path, f"has no class {name!r}; its classes are {meta.classes}")
    for want in TUMOUR_NAMES:
        if want in classes:
            return classes.index(want)
    hits = [i for i, c in enumerate(classes) if "tum" in c or "metast" in c]
    if len(hits) == 1:
        return hits[0]
    raise ModelError(model_path, f"cannot tell which of its classes {meta.classes} is tumour; "
                     "name it with tumour_class / --tumour-class")


def _model_identity(path: Path | None, net: nn.Module, meta: ModelMeta) -> str:
    """A content hash of the model (file bytes, or weights + metadata for in-memory models)."""
    h = hashlib.sha256()
    if path is not None:
        with _MODEL_CACHE_LOCK:
            for (key, _dev, _cl), entry in _MODEL_CACHE.items():
                if key == _file_key(path) and entry.get("identity"):
                    return entry["identity"]
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        ident = "sha256:" + h.hexdigest()
        with _MODEL_CACHE_LOCK:
            for (key, _dev, _cl), entry in _MODEL_CACHE.items():
                if key == _file_key(path):
                    entry["identity"] = ident
        return ident
    h.update(json.dumps(meta.to_json(), sort_keys=True).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------
# Warm model cache: one load per process (a Dask worker, the napari session)
# --------------------------------------------------------------------------------------
#: models kept loaded per process (least recently used dropped first); 0 disables it
MODEL_CACHE_SIZE = int(os.environ.get("LNMETA_MODEL_CACHE", "2"))
_MODEL_CACHE: dict[tuple, dict[str, Any]] = {}
_MODEL_CACHE_LOCK = threading.Lock()
_MODEL_CACHE_STATS = {"hits": 0, "misses": 0}


#: batch sizes probed per loaded network (dropped with the network)
_PROBED_BATCH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _file_key(path: Path) -> tuple:
    """A model file's identity without reading it: path, size, modification and change
    times, inode. Rewriting the file (even with the same size) changes it."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def model_cache_stats() -> dict[str, int]:
    """Hits, misses and entries of this process's model cache."""
    with _MODEL_CACHE_LOCK:
        return {**_MODEL_CACHE_STATS, "entries": len(_MODEL_CACHE)}


def clear_model_cache() -> None:
    """Drop the cached models (frees their host/device memory once unreferenced)."""
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE.clear()
        _MODEL_CACHE_STATS.update(hits=0, misses=0)


def load_inference_model(config: InferenceConfig, device: torch.device,
                         model: tuple[nn.Module, ModelMeta] | None = None, *,
                         info: dict[str, Any] | None = None
                         ) -> tuple[nn.Module, ModelMeta, Path | None]:
    """The network (on ``device``, eval mode), its metadata and its file (``None`` if given).

    A model file is loaded once per process and device: later runs (the next slide of a
    cohort on the same Dask worker, the next Detect run in napari) reuse the network,
    its CUDA context and its content hash. The key is the file's identity
    (:func:`_file_key`), the device and the channels-last layout (which
    :class:`PatchModel` applies in place); ``MODEL_CACHE_SIZE`` (environment
    ``LNMETA_MODEL_CACHE``) bounds the entries, ``0`` turns the cache off. ``info``
    receives ``model_cached``: whether this call reused a loaded network.
    """
    from ..models.io import default_model_path

    info = {} if info is None else info
    info["model_cached"] = False
    if model is not None:
        net, meta = model
        return net.to(device).eval(), meta, None
    path = Path(config.model) if config.model else default_model_path()
    if not config.model and not path.is_file():
        raise ModelError(path, "the bundled default model is not installed; pass a model file "
                         "(--model PATH)")
    net, meta, info["model_cached"] = _cached_load(path, device,
                                                   channels_last=bool(config.channels_last))
    return net, meta, path


def _cached_load(path: Path, device: torch.device, *, channels_last: bool
                 ) -> tuple[nn.Module, ModelMeta, bool]:
    """``load_model`` through the cache; the flag says whether it was a cache hit."""
    from ..models.io import load_model

    if MODEL_CACHE_SIZE <= 0 or not path.is_file():
        net, meta = load_model(path, device=device)  # (a missing file raises there)
        return net, meta, False
    key = (_file_key(path), str(device), channels_last)
    with _MODEL_CACHE_LOCK:
        entry = _MODEL_CACHE.pop(key, None)
        if entry is not None:
            _MODEL_CACHE[key] = entry  # most recently used last
            _MODEL_CACHE_STATS["hits"] += 1
            return entry["net"], entry["meta"], True
    net, meta = load_model(path, device=device)
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE_STATS["misses"] += 1
        _MODEL_CACHE[key] = {"net": net, "meta": meta}
        while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    return net, meta, False


def plan_read(slide: Slide, meta: ModelMeta, config: InferenceConfig, *,
              model_path: str = "model") -> tuple[dict[str, Any], list[str]]:
    """Resolve the read resolution, patch size, stride and tumour class; validate them.

    Returns
    -------
    (params, warnings)

    Raises
    ------
    ModelError
        The asked patch size differs from the model's, or the tumour class is unknown.
    InputError
        Bad stride, level, or a µm/px that needs the slide's (unknown) µm/px.
    """
    warnings: list[str] = []
    patch = int(config.patch_size) if config.patch_size else int(meta.patch_size)
    if patch != meta.patch_size:
        raise ModelError(model_path, f"was trained on {meta.patch_size} px patches, but "
                         f"{patch} px were asked for (leave the patch size at the model's)")
    stride = int(config.stride) if config.stride else patch
    if stride < 1:
        raise InputError(f"stride must be >= 1 px, got {stride}")
    if stride > patch:
        warnings.append(f"stride {stride} > patch size {patch}: parts of the tissue are "
                        "skipped")
    mpp, level = config.mpp, config.level
    if mpp is not None and level is not None:
        raise InputError("give a read µm/px or a level, not both")
    if level is None and mpp is None:
        mpp = meta.mpp
        if mpp is not None and slide.mpp is None:
            warnings.append(f"{slide.name}: µm/px unknown, so the model's {meta.mpp} µm/px "
                            "cannot be matched; reading level 0 (pass --mpp with the slide's "
                            "pixel size)")
            mpp, level = None, 0
    if mpp is not None and meta.mpp is not None and \
            abs(mpp - meta.mpp) / meta.mpp > MPP_TOLERANCE:
        warnings.append(f"reading at {mpp:g} µm/px, but the model was trained at "
                        f"{meta.mpp:g} µm/px")
    if mpp is None and level is None:
        level = 0
    if mpp is not None:
        slide.require_mpp()
    tidx = tumour_index(meta, config.tumour_class, model_path=model_path)
    params = {"patch_size": patch, "stride": stride, "mpp": mpp, "level": level,
              "tta": bool(config.tta), "tumour_class": meta.classes[tidx], "tumour_index": tidx,
              "min_tissue": float(config.min_tissue), "tissue_mpp": float(config.tissue_mpp),
              "tissue_method": config.tissue_method, "normalisation": meta.normalisation}
    return params, warnings


# --------------------------------------------------------------------------------------
# On-device preprocessing, TTA and the forward pass
# --------------------------------------------------------------------------------------
def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the 8 dihedral transforms of an NCHW batch (0 = identity).

    ``k % 4`` quarter turns, then a left-right flip when ``k >= 4`` (seed 004's eight
    directions: four rotations, flipped and not).
    """
    import torch

    y = torch.rot90(x, k % 4, dims=(2, 3)) if k % 4 else x
    return torch.flip(y, dims=(3,)) if k >= 4 else y


def stain_transform(normalisation: dict | None, device: torch.device, *,
                    model_path: str = "model"):
    """An on-device stain normaliser for float NCHW batches in [0, 1], or ``None``.

    Uses the torch normaliser of :mod:`napari_lnmeta.core.stain` when it provides one.
    """
    if not normalisation:
        return None
    from . import stain

    for name in ("torch_normaliser", "torch_normalizer", "make_torch_normaliser"):
        make = getattr(stain, name, None)
        if make is not None:
            return make(normalisation, device=device)
    method = normalisation.get("method", "?") if isinstance(normalisation, dict) else "?"
    raise ModelError(model_path, f"asks for {method} stain normalisation, but no on-device "
                     "stain normaliser is available in napari_lnmeta.core.stain")


def is_oom(err: BaseException) -> bool:
    """True for CUDA and CPU out-of-memory errors."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(err, oom_types):
        return True
    msg = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg
        or "cannot allocate memory" in msg or isinstance(err, MemoryError))


class PatchModel:
    """The model as the pipeline uses it: uint8 NHWC patches in, tumour probability out.

    Parameters
    ----------
    net, meta
        The network (on ``device``) and its metadata.
    device
        Where it runs.
    tumour
        Index of the tumour class.
    tta, amp, channels_last, stain
        See :class:`InferenceConfig`; ``stain`` is a callable from :func:`stain_transform`.
    """

    def __init__(self, net: nn.Module, meta: ModelMeta, device: torch.device, *, tumour: int,
                 tta: bool = False, amp: bool = True, channels_last: bool = True,
                 stain=None, compile: bool = False, model_path: str = "model"):
        import torch

        self.meta = meta
        self.device = device
        self.tumour = tumour
        self.tta = tta
        self.amp = bool(amp) and device.type == "cuda"
        self.channels_last = channels_last
        self.stain = stain
        self.model_path = model_path
        net = net.to(device).eval()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = torch.compile(net) if compile else net
        self.mean = torch.tensor(meta.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(meta.std, device=device,
                                          dtype=torch.float32).view(1, 3, 1, 1)
        self._checked = False

    def prepare(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` on the device -> normalised float NCHW."""
        import torch

        x = x_u8.permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)  # NHWC memory: channels-last
        if self.stain is not None:
            x = self.stain(x)
        x = (x - self.mean).mul_(self.inv_std)
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.amp:
            with torch.autocast("cuda", dtype=torch.float16):
                out = self.net(x)
        else:
            out = self.net(x)
        if not self._checked:
            want = self.meta.num_outputs
            if out.ndim != 2 or out.shape[1] != want:
                raise ModelError(self.model_path, f"gives outputs of shape {tuple(out.shape)}, "
                                 f"but its metadata lists {len(self.meta.classes)} classes "
                                 f"{self.meta.classes} ({want} outputs expected)")
            self._checked = True
        return out

    def probs(self, x_u8: torch.Tensor) -> torch.Tensor:
        """Tumour probability ``(B,)`` float32 on the device (averaged over TTA views)."""
        import torch

        from ..models.io import logits_to_probs

        with torch.inference_mode():
            x = self.prepare(x_u8)
            views = range(8) if self.tta else range(1)
            acc = None
            for k in views:
                xv = dihedral(x, k)
                if k and self.channels_last:
                    xv = xv.contiguous(memory_format=torch.channels_last)
                p = logits_to_probs(self.logits(xv), self.meta)[:, self.tumour]
                acc = p if acc is None else acc + p
            return acc / len(views)

    def bare_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network alone on an already prepared batch (for benchmarks)."""
        import torch

        with torch.inference_mode():
            return self.logits(x)


def auto_batch_size(pm: PatchModel, patch_size: int, *, max_batch: int = 1024,
                    device_fraction: float = 0.6) -> int:
    """A batch size from free memory: a probe forward measures memory per patch.

    On CUDA the probe runs 8 patches and reads the peak allocation; the batch uses
    ``device_fraction`` of the free memory. On CPU it is at most 32 (bigger CPU batches
    are not faster, and a Cancel waits for one batch) and smaller for very big patches.
    """
    import torch

    probe_n = 8
    dev = pm.device
    x = torch.full((probe_n, patch_size, patch_size, 3), 200, dtype=torch.uint8, device=dev)
    views = 8 if pm.tta else 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        pm.probs(x)
        torch.cuda.synchronize(dev)
        per = max((torch.cuda.max_memory_allocated(dev) - base) / probe_n, 1.0)
        free, _ = torch.cuda.mem_get_info(dev)
        n = int(device_fraction * free / per)
        # pinned host buffers: prefetch + 2 batches
        n = min(n, max_batch)
    else:
        pm.probs(x)  # also checks the output shape
        # activations of a CNN are a few tens of input-sized float maps per patch; keep a
        # batch well under ~2 GB even for big patches (out-of-memory still backs off)
        per = patch_size * patch_size * 3 * 4 * 40 * (1 if views == 1 else 2)
        n = min(int(2e9 / per), 32, max_batch)
    n = max(1, n)
    return 1 << int(math.floor(math.log2(n))) if n >= 8 else n


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
    from ..models.spatial import window_offset
    from .tiling import PatchGrid

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
    from .tiling import read_patches

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
        from ..io.slide import CorruptTileError

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


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
class Checkpoint:
    """Heatmap + done-mask saved as zarr in a folder, with the parameters they belong to.

    ``params.json`` is written first; ``state.zarr`` holds ``probability`` (float32) and
    ``done`` (uint8). Rows are written probability first, done-mask second, and zarr
    writes each chunk atomically, so a crash never marks a cell done without its value.
    """

    def __init__(self, root: str | Path, key: dict[str, Any]):
        self.root = Path(root)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self._arrays = None

    @property
    def params_path(self) -> Path:
        return self.root / "params.json"

    def stored_key(self) -> dict[str, Any] | None:
        if not self.params_path.is_file():
            return None
        try:
            return json.loads(self.params_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def matches(self) -> bool:
        return self.stored_key() == self.key

    def load(self, grid_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved heatmap and done-mask, or ``None`` when there is nothing to resume."""
        import zarr

        self.damaged = 0
        if not self.matches() or not (self.root / "state.zarr").exists():
            return None
        try:
            g = zarr.open_group(str(self.root / "state.zarr"), mode="r")
            zp, zd = g["probability"], g["done"]
        except (KeyError, ValueError, OSError, TypeError):
            return None
        if zp.shape != tuple(grid_shape) or zd.shape != tuple(grid_shape):
            return None
        prob = np.zeros(grid_shape, np.float32)
        done = np.zeros(grid_shape, bool)
        ch0, ch1 = zp.chunks[0], zp.chunks[1]
        for r0 in range(0, grid_shape[0], ch0):
            for c0 in range(0, grid_shape[1], ch1):
                sl = (slice(r0, r0 + ch0), slice(c0, c0 + ch1))
                try:  # a damaged chunk (a killed disk write, a flipped byte) is recomputed
                    p, d = np.asarray(zp[sl], np.float32), np.asarray(zd[sl]) > 0
                except (RuntimeError, ValueError, OSError) as e:
                    self.damaged += 1
                    warnings.warn(f"{self.root}: discarding a damaged checkpoint chunk at rows "
                                  f"{r0}.., columns {c0}.. ({type(e).__name__}); its patches "
                                  "are computed again", RuntimeWarning, stacklevel=2)
                    continue
                ok = d & np.isfinite(p)
                prob[sl] = np.where(ok, p, 0.0)
                done[sl] = ok
        return prob, done

    def start(self, grid_shape: tuple[int, int], prob: np.ndarray, done: np.ndarray) -> None:
        """Create (or reopen) the store for ``grid_shape``; write params if new."""
        import zarr

        from ..io.atomic import write_text_atomic

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "state.zarr"
        fresh = not self.matches() or not path.exists() or getattr(self, "damaged", 0) > 0
        if not fresh:
            try:
                g = zarr.open_group(str(path), mode="r")
                fresh = (g["probability"].shape != tuple(grid_shape)
                         or g["done"].shape != tuple(grid_shape))
            except (KeyError, ValueError, OSError, TypeError):
                fresh = True
        if fresh:
            import shutil

            if path.exists():
                shutil.rmtree(path)
            write_text_atomic(self.params_path, jsonio.dumps(self.key, indent=1, sort_keys=True),
                              overwrite=True)
            g = zarr.open_group(str(path), mode="w", zarr_format=2)
            ch = (min(256, grid_shape[0]), min(256, grid_shape[1]))
            g.create_array("probability", shape=grid_shape, dtype="float32", chunks=ch,
                           fill_value=0.0)
            g.create_array("done", shape=grid_shape, dtype="uint8", chunks=ch, fill_value=0)
            if done.any():  # what survived a damaged store
                g["probability"][:] = np.where(done, prob, 0.0).astype(np.float32)
                g["done"][:] = done.astype(np.uint8)
        g = zarr.open_group(str(path), mode="r+")
        self._arrays = (g["probability"], g["done"])

    def flush(self, prob: np.ndarray, done: np.ndarray, rows: tuple[int, int] | None = None):
        """Write rows ``[r0, r1)`` (all when ``None``): probability first, then done."""
        if self._arrays is None:
            return
        r0, r1 = rows if rows is not None else (0, prob.shape[0])
        if r1 <= r0:
            return
        zp, zd = self._arrays
        zp[r0:r1] = prob[r0:r1]
        zd[r0:r1] = done[r0:r1].astype(np.uint8)


def run_key(slide: Slide, model_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: slide, model and read parameters."""
    p = Path(slide.path)
    st = p.stat() if p.exists() else None
    return {"version": CHECKPOINT_VERSION,
            "slide": {"path": str(p.resolve()), "shape": list(slide.shape), "mpp": slide.mpp,
                      "bytes": st.st_size if st and p.is_file() else None,
                      "mtime_ns": st.st_mtime_ns if st and p.is_file() else None},
            "model": model_id,
            "params": {k: v for k, v in params.items()}}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def run_inference(slide: Slide, config: InferenceConfig | None = None, *,
                  model: tuple[nn.Module, ModelMeta] | None = None,
                  checkpoint_dir: str | Path | None = None,
                  tissue: TissueMask | None = None,
                  on_mismatch: str = "restart") -> Job[InferenceResult]:
    """Tumour probability heatmap of a slide, as a progress generator.

    Parameters
    ----------
    slide
        An open slide.
    config
        Run parameters (:class:`InferenceConfig`); defaults use the bundled model.
    model
        An in-memory ``(network, ModelMeta)`` instead of ``config.model``.
    checkpoint_dir
        Save progress here and resume from it (see module docstring).
    tissue
        A precomputed tissue mask (otherwise detected with ``config.tissue_*``).
    on_mismatch
        When ``checkpoint_dir`` holds a run with other parameters (slide, model, read
        parameters): ``"restart"`` discards it, ``"error"`` raises :class:`InputError`.

    Yields
    ------
    Progress
        ``done``/``total`` patches; every ``partial_seconds`` the step's ``partial`` is a
        :class:`PartialHeatmap` (a copy of the heatmap so far).

    Returns
    -------
    InferenceResult

    Raises
    ------
    ModelError
        Missing or unusable model, patch size or classes that do not match the request.
    InputError
        No tissue, unknown µm/px where one is needed, a CUDA device that is not there.
    """
    from ..progress import in_thread
    from .tiling import make_grid
    from .tissue import tissue_mask_job

    cfg = config or InferenceConfig()
    if cfg.on_corrupt_tile not in ("fail", "skip"):
        raise InputError(f"on_corrupt_tile must be 'fail' or 'skip', got {cfg.on_corrupt_tile!r}")
    if cfg.on_corrupt_tile == "skip" and cfg.decode != "cpu":
        raise InputError("skipping corrupt tiles (--on-corrupt-tile skip) needs CPU decoding "
                         "(--decode cpu): tiles decoded on the device are not checked")
    t0 = time.perf_counter()
    timing: dict[str, Any] = {}
    yield Progress(0, 0, "loading model")  # at once: the bar moves in the first second
    device = yield from in_thread(resolve_device, cfg.device, message="loading model")
    import torch  # imported by resolve_device: instant here
    net, meta, mpath = yield from in_thread(load_inference_model, cfg, device, model,
                                            message="loading model", info=timing)
    mname = str(mpath) if mpath else "model"
    params, warns = plan_read(slide, meta, cfg, model_path=mname)
    from ..models.spatial import context_size

    ctx = context_size(meta)  # > 1: the model reads a k x k neighbourhood per patch
    if ctx > 1:
        params["context"] = ctx
    stain = stain_transform(meta.normalisation, device, model_path=mname)
    pm = PatchModel(net, meta, device, tumour=params["tumour_index"], tta=cfg.tta, amp=cfg.amp,
                    channels_last=cfg.channels_last, stain=stain, compile=cfg.compile,
                    model_path=mname)
    timing["model_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    yield Progress(0, 0, "detecting tissue")
    tissue_corrupt: list[dict[str, Any]] = []
    if tissue is None:  # a mask already computed with these parameters is re-used
        from ..io.slide import CorruptTileError

        try:
            tissue = yield from tissue_mask_job(slide, target_mpp=cfg.tissue_mpp,
                                                method=cfg.tissue_method)
        except CorruptTileError as e:
            if cfg.on_corrupt_tile != "skip":
                raise
            # a damaged tile of the overview only blurs the tissue mask: use it as decoded
            tissue_corrupt.append(e.to_json())
            warns.append(f"tissue detection read a corrupt tile ({e.reason}) at level "
                         f"{e.level}, tile {e.tile}; the tissue mask there may be wrong")
            with slide.unchecked_reads():
                tissue = yield from tissue_mask_job(slide, target_mpp=cfg.tissue_mpp,
                                                    method=cfg.tissue_method)
    grid = yield from in_thread(make_grid, slide, patch_size=params["patch_size"],
                                stride=params["stride"], mpp=params["mpp"],
                                level=params["level"], tissue=tissue,
                                min_tissue=cfg.min_tissue, message="patch grid")
    if len(grid) == 0:
        raise InputError(f"{slide.path}: no patch has at least {cfg.min_tissue:.0%} tissue "
                         f"(tissue covers {tissue.area_fraction:.1%} of the slide)")
    params.update({"read_mpp": grid.mpp, "read_level": grid.level,
                   "downsample": grid.downsample, "size0": grid.size0,
                   "stride0": grid.stride0, "grid_shape": list(grid.grid_shape)})
    timing["tissue_s"] = time.perf_counter() - t1
    frame = grid.frame()
    prob = np.zeros(grid.grid_shape, dtype=np.float32)
    done = np.zeros(grid.grid_shape, dtype=bool)
    in_grid = np.zeros(grid.grid_shape, dtype=bool)
    in_grid[grid.index[:, 0], grid.index[:, 1]] = True

    ckpt = None
    resumed = 0
    if checkpoint_dir is not None:
        model_id = _model_identity(mpath, net, meta)
        ckpt = Checkpoint(checkpoint_dir, run_key(slide, model_id, params))
        if on_mismatch == "error" and ckpt.stored_key() is not None and not ckpt.matches():
            raise InputError(f"{Path(checkpoint_dir).parent}: holds an unfinished run with other "
                             "parameters (slide, model, µm/px, patch size, stride or TTA); pass "
                             "--overwrite / overwrite=True to start over")
        state = ckpt.load(grid.grid_shape)
        if state is not None:
            prob, done = state
            done &= in_grid
            if cfg.on_corrupt_tile == "fail":  # cells a skipping run left unknown: retry
                done &= ~np.isnan(prob)
            prob[~done] = 0.0
            resumed = int(done.sum())
        ckpt.start(grid.grid_shape, prob, done)

    todo = np.flatnonzero(~done[grid.index[:, 0], grid.index[:, 1]])
    total = len(grid)
    n_done = total - len(todo)

    def partial() -> PartialHeatmap:
        return PartialHeatmap(prob.copy(), done.copy(), frame)

    yield Progress(n_done, total, "tissue ready" if not resumed else
                   f"resuming ({resumed} patches done)", partial())

    t2 = time.perf_counter()
    read_grid = context_grid(grid, ctx)
    if cfg.batch_size:
        bs = int(cfg.batch_size)
    else:  # probed once per loaded network and setting (warm runs skip the probe)
        probe_key = (str(device), read_grid.patch_size, bool(cfg.tta), bool(cfg.amp),
                     bool(cfg.channels_last), bool(cfg.compile), int(cfg.max_batch_size),
                     repr(meta.normalisation))
        known = _PROBED_BATCH.setdefault(net, {}) if model is None else {}
        bs = known.get(probe_key) or auto_batch_size(pm, read_grid.patch_size,
                                                     max_batch=cfg.max_batch_size)
        timing["batch_probed"] = probe_key not in known
        known[probe_key] = bs
    bs = max(1, min(bs, cfg.max_batch_size))
    timing["batch_probe_s"] = time.perf_counter() - t2
    micro = bs  # forward size; halves on out-of-memory
    ooms = 0
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    cuda = device.type == "cuda"
    reader, timing["reader"] = make_reader(slide, read_grid, batches, batch_size=bs,
                                           device=device, workers=cfg.workers,
                                           depth=cfg.prefetch, decode=cfg.decode,
                                           on_corrupt_tile=cfg.on_corrupt_tile)
    cache = 0
    if timing["reader"] == "threads":
        # the batches being read at once (prefetch depth + the one in the model) share
        # tiles: keep them decoded
        cache = tile_working_set(slide, read_grid, batches, max(1, cfg.prefetch) + 1)
        if cache:
            slide.reserve_tile_cache(cache)
    timing["tile_cache_reserved_mb"] = cache / 2**20

    def forward(x_host: torch.Tensor) -> torch.Tensor:
        """Probabilities of one host batch, splitting it on out-of-memory."""
        nonlocal micro, ooms
        out = []
        i = 0
        while i < len(x_host):
            n = min(micro, len(x_host) - i)
            try:
                x = x_host[i:i + n].to(device, non_blocking=True)
                out.append(pm.probs(x))
                i += n
            except Exception as e:
                if not is_oom(e) or micro == 1:
                    raise
                ooms += 1
                micro = max(1, micro // 2)
                if cuda:
                    torch.cuda.empty_cache()
        return torch.cat(out) if len(out) > 1 else out[0]

    pending: tuple | None = None  # (indices, slot, probs on device/host) of the last batch
    last_ckpt = last_partial = time.perf_counter()
    dirty = [math.inf, -1]  # heatmap rows changed since the last checkpoint
    n_run = 0
    t_loop = time.perf_counter()

    def collect(item) -> None:
        nonlocal n_done, n_run
        idx, slot, p_dev = item
        p = p_dev.float().cpu().numpy()
        reader.release(slot)
        bad = ~np.isfinite(p)
        if bad.any():
            raise ModelError(mname, f"produced {int(bad.sum())} non-finite probabilities "
                             "(NaN/inf): its weights or metadata are broken")
        corrupt = getattr(reader, "corrupt", None)
        if corrupt:
            p[[int(k) in corrupt for k in idx]] = np.nan  # unknown: a corrupt tile
        rows, cols = grid.index[idx, 0], grid.index[idx, 1]
        prob[rows, cols] = p
        done[rows, cols] = True
        dirty[0] = min(dirty[0], int(rows.min()))
        dirty[1] = max(dirty[1], int(rows.max()) + 1)
        n_done += len(idx)
        n_run += len(idx)

    def checkpoint() -> None:
        if ckpt is not None and dirty[1] > dirty[0]:
            ckpt.flush(prob, done, (int(dirty[0]), int(dirty[1])))
        dirty[0], dirty[1] = math.inf, -1

    try:
        for idx, x_host, slot in reader:
            if cuda:  # queued asynchronously: returns at once
                p_dev = forward(x_host)
            else:  # a CPU batch may take seconds: Cancel is still answered meanwhile
                p_dev = yield from in_thread(forward, x_host, interval=0.25,
                                             beat=Progress(n_done, total, "inference"))
            # On CUDA the previous batch's result is fetched after this one is queued, so
            # the GPU never idles while Python copies results.
            if pending is not None:
                collect(pending)
            pending = (idx, slot, p_dev)
            if not cuda:
                collect(pending)
                pending = None
            now = time.perf_counter()
            part = None
            if now - last_partial >= cfg.partial_seconds:
                part, last_partial = partial(), now
            if now - last_ckpt >= cfg.checkpoint_seconds:
                checkpoint()
                last_ckpt = now
            yield Progress(n_done, total, "inference", part)
        if pending is not None:
            collect(pending)
            pending = None
    finally:
        reader.close()
        checkpoint()
    t_inf = time.perf_counter() - t_loop
    timing.update({"inference_s": t_inf, "read_wait_s": reader.wait_s,
                   "patches": total, "patches_run": n_run, "patches_resumed": resumed,
                   "patches_per_s": n_run / t_inf if t_inf > 0 else None,
                   "total_s": time.perf_counter() - t0, "oom_backoffs": ooms,
                   "forward_batch_size": micro})
    unknown = done & in_grid & np.isnan(prob)
    corrupt_tiles: dict[tuple, dict[str, Any]] = {}
    for d in tissue_corrupt + [e.to_json() for e in getattr(reader, "corrupt", {}).values()]:
        corrupt_tiles.setdefault((d["level"], *d["tile"]), d)
    if unknown.any():
        warns.append(f"{int(unknown.sum())} heatmap cells are unknown (NaN): their patches "
                     f"touch {len(corrupt_tiles) or 'earlier-found'} corrupt tile(s) of the "
                     "slide, skipped (--on-corrupt-tile skip)")
    yield Progress(total, total, "inference done", partial())
    return InferenceResult(probability=prob, scored=done & in_grid & ~unknown, frame=frame,
                           grid=grid, unknown=unknown,
                           corrupt_tiles=[corrupt_tiles[k] for k in sorted(corrupt_tiles)],
                           tissue=tissue, meta=meta, params=params, timing=timing,
                           device=str(device), batch_size=bs, slide_path=str(slide.path),
                           model_path=str(mpath) if mpath else None, config=cfg,
                           warnings=warns, resumed=resumed)
