"""The model of a run: device, tumour class, the per-process warm model cache
(one load per model file and device in a Dask worker or the napari session) and the
read plan (level, patch size and stride at the model's µm/px).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError, ModelError
from ...io.annotations import TUMOUR_NAMES
from .config import MPP_TOLERANCE, InferenceConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...io.slide import Slide
    from ...models.io import ModelMeta

# --------------------------------------------------------------------------------------
# Model, device and parameters
# --------------------------------------------------------------------------------------
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
    from ...models.io import default_model_path

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
    from ...models.io import load_model

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
    mpp, level = config.patch_mpp, config.level
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
