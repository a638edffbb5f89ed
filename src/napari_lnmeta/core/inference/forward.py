"""On the device: the stain normaliser a model's metadata asks for
(:func:`stain_transform`), and the batch size chosen from free device memory
(:func:`auto_batch_size`). The model itself, with its input transform, AMP and TTA, is
:class:`napari_lnmeta.models.patch.PatchModel` (re-exported here).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...models.patch import PatchModel, dihedral  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import torch

    from ...models.io import ModelMeta
    from ...models.preprocess import Preprocess

# --------------------------------------------------------------------------------------
# Stain normaliser, out-of-memory errors and the batch size
# --------------------------------------------------------------------------------------
def stain_transform(normalisation: dict | None, device: torch.device):
    """An on-device stain normaliser for float NCHW batches in [0, 1], or ``None``
    (:func:`napari_lnmeta.core.stain.torch_normaliser`)."""
    if not normalisation:
        return None
    from ..stain import torch_normaliser

    return torch_normaliser(normalisation, device=device)


def model_preprocess(meta: ModelMeta, device, *, channels_last: bool = False) -> Preprocess:
    """The model's input transform (:class:`~napari_lnmeta.models.preprocess.Preprocess`)
    with the stain normaliser its metadata asks for: what training, validation and
    patch-set evaluation feed the network (whole-slide inference builds the same one in
    :class:`PatchModel`)."""
    from ...models.preprocess import Preprocess

    return Preprocess.for_meta(meta, device, stain=stain_transform(meta.normalisation, device),
                               channels_last=channels_last)


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
