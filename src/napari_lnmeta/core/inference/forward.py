"""On the device: uint8 -> float, stain normalisation, mean/std, channels-last, AMP,
optional 8-direction TTA (:class:`PatchModel`), and the batch size chosen from free
device memory (:func:`auto_batch_size`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ...errors import ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ...models.io import ModelMeta

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


def stain_transform(normalisation: dict | None, device: torch.device):
    """An on-device stain normaliser for float NCHW batches in [0, 1], or ``None``
    (:func:`napari_lnmeta.core.stain.torch_normaliser`)."""
    if not normalisation:
        return None
    from ..stain import torch_normaliser

    return torch_normaliser(normalisation, device=device)


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

        from ...models.io import logits_to_probs

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
