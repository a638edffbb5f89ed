"""The one input transform: patches as read -> the network's input.

Every path that feeds a patch network (whole-slide inference, feature extraction,
``infer_batch``, training and its validation) goes through a :class:`Preprocess`, which
the model carries (:attr:`PatchModel.preprocess <napari_lnmeta.models.patch.PatchModel>`),
as TIAToolbox's models carry their ``preproc_func``. Steps, in order:

1. uint8 0-255 -> float32 in [0, 1] (``x.float() / 255``), NHWC or NCHW accepted;
2. the stain normaliser, when the model's metadata asks for one (a callable on float
   NCHW batches in [0, 1] on the device: models sit below the stain code, so it is
   passed in; :func:`napari_lnmeta.core.features.make_preprocessor` and
   :func:`napari_lnmeta.core.inference.stain_transform` build it);
3. ``(x - mean) / std`` per channel;
4. contiguous, channels-last when asked.

Training augments between steps 2 and 3 (:meth:`Preprocess.to_unit`, then the
augmentation, then :meth:`Preprocess.normalise`), so what the network sees at training
and at inference differ only by the augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class Preprocess:
    """Patches -> normalised float32 NCHW on ``device``.

    Parameters
    ----------
    mean, std
        Per-channel normalisation after scaling to [0, 1].
    device
        Where the tensors are made.
    stain
        On-device stain normaliser (float NCHW in [0, 1] -> same), or ``None``.
    channels_last
        Return channels-last memory (the inference engine's layout).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *,
                 device: Any = "cpu",
                 stain: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 channels_last: bool = False):
        import torch

        self.device = torch.device(device)
        self.mean = torch.tensor([float(v) for v in mean], device=self.device,
                                 dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor([float(v) for v in std], device=self.device,
                                dtype=torch.float32).view(1, 3, 1, 1)
        self.stain = stain
        self.channels_last = bool(channels_last)

    @classmethod
    def for_meta(cls, meta: Any, device: Any = "cpu", *,
                 stain: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 channels_last: bool = False) -> Preprocess:
        """The transform of a :class:`~napari_lnmeta.models.io.ModelMeta` or a
        :class:`~napari_lnmeta.models.extractor.BackboneInfo` (its mean/std)."""
        return cls(meta.mean, meta.std, device=device, stain=stain,
                   channels_last=channels_last)

    def to_nchw(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A batch (or one patch) as an NCHW tensor on the device, dtype unchanged."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(patches)) if isinstance(patches, np.ndarray) \
            else patches
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, H, W, 3) or (B, 3, H, W), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
        return x.to(self.device, non_blocking=True)

    def to_unit(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Steps 1-2: float32 NCHW in [0, 1], stain-normalised when the model asks.
        A float input is taken as already in [0, 1]."""
        import torch

        x = self.to_nchw(patches)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.stain is not None:
            x = self.stain(x)
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 3-4 on a float NCHW batch in [0, 1]."""
        import torch

        x = (x - self.mean) / self.std
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()

    def __call__(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.normalise(self.to_unit(patches))


__all__ = ["Preprocess"]
