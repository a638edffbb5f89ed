"""The patch classifier as the pipeline uses it (:class:`PatchModel`): uint8 patches in,
tumour probability out, through the model's own :class:`~.preprocess.Preprocess`,
channels-last memory, AMP and optional 8-direction TTA (:func:`dihedral`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ModelError
from .preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .io import ModelMeta


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th of the 8 dihedral transforms of an NCHW batch (0 = identity).

    ``k % 4`` quarter turns, then a left-right flip when ``k >= 4`` (seed 004's eight
    directions: four rotations, flipped and not).
    """
    import torch

    y = torch.rot90(x, k % 4, dims=(2, 3)) if k % 4 else x
    return torch.flip(y, dims=(3,)) if k >= 4 else y


def fold_batchnorm(net: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """``net`` with every eval-mode batch norm that follows a convolution folded into the
    convolution's weights (``net`` itself is not changed).

    The same function up to float rounding (about 1e-7 in a probability), with one
    kernel instead of two per convolution: a CNN such as resnet18 runs about 1.2x faster
    on a CPU. The network is traced symbolically (``torch.fx``); the traced module
    shares every other parameter with ``net`` and holds new convolutions for the folded
    ones (made in channels-last memory when ``channels_last``). A network that cannot be
    traced (data-dependent control flow), or has nothing to fold, or carries hooks, is
    returned as it is.
    """
    import torch
    from torch import nn

    if net.training or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                               for m in net.modules()):
        return net
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
           or getattr(m, "_backward_pre_hooks", None) for m in net.modules()):
        return net  # hooks (Grad-CAM, feature taps) must see the network as it is
    # the same loaded network (warm runs) is folded once, until its weights change
    sig = (*(t._version for t in (*net.parameters(), *net.buffers())), channels_last)
    hit = _FOLDED.get(net)
    if hit is not None and hit[0] == sig:
        return hit[1]
    try:
        with torch.no_grad():
            folded = _fold(net, channels_last)
    except Exception:  # noqa: BLE001 - not traceable: run it unfolded
        folded = net
    if folded is not net:
        _FOLDED[net] = (sig, folded)
    return folded


def _fold(net: nn.Module, channels_last: bool) -> nn.Module:
    import torch
    from torch import fx, nn

    gm = fx.symbolic_trace(net)
    mods = dict(gm.named_modules())
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1
                or type(mods.get(src.target)) is not nn.Conv2d):
            continue
        conv, bn = mods[src.target], mods[node.target]
        if bn.running_mean is None or bn.running_var is None:
            continue
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          padding_mode=conv.padding_mode, device="meta")
        w = conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        b = (b - bn.running_mean) * scale + (bn.bias if bn.bias is not None else 0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        fused.weight = nn.Parameter(w.contiguous(memory_format=fmt), requires_grad=False)
        fused.bias = nn.Parameter(b.to(conv.weight.dtype), requires_grad=False)
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        n += 1
    if not n:
        return net
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    return gm


#: folded copies of loaded networks (dropped with the network)
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    tta, amp, channels_last
        See :class:`~napari_lnmeta.core.inference.InferenceConfig`.
    stain
        The on-device stain normaliser the metadata asks for (a callable on float NCHW
        batches in [0, 1]; :func:`napari_lnmeta.core.inference.stain_transform`), or
        ``None``. It becomes part of :attr:`preprocess`.

    Attributes
    ----------
    preprocess
        The model's input transform (:class:`~.preprocess.Preprocess`): the same one
        feature extraction, ``infer_batch`` and training use.
    """

    def __init__(self, net: nn.Module, meta: ModelMeta, device: torch.device, *, tumour: int,
                 tta: bool = False, amp: bool = True, channels_last: bool = True,
                 stain: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 compile: bool = False, model_path: str = "model"):
        import torch

        if meta.normalisation and stain is None:
            raise ValueError(f"{model_path} asks for stain normalisation: pass stain= "
                             "(core.inference.stain_transform builds it)")
        self.meta = meta
        self.device = device
        self.tumour = tumour
        self.tta = tta
        self.amp = bool(amp) and device.type == "cuda"
        self.channels_last = channels_last
        self.stain = stain
        self.model_path = model_path
        self.preprocess = Preprocess.for_meta(meta, device, stain=stain,
                                              channels_last=channels_last)
        net = net.to(device).eval()
        if device.type == "cpu" and not compile:
            net = fold_batchnorm(net, channels_last=channels_last)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = torch.compile(net) if compile else net
        self._checked = False

    def prepare(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` on the device -> normalised float NCHW (:attr:`preprocess`)."""
        return self.preprocess(x_u8)

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

        from .io import logits_to_probs

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


__all__ = ["PatchModel", "dihedral", "fold_batchnorm"]
