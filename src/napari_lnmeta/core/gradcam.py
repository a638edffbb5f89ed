"""Seed 001's Grad-CAM of a patch model, on patches or on a region of a slide.

:func:`gradcam` (Selvaraju et al. 2017) weights the activations of the last convolutional
stage by the spatially averaged gradient of the class score and keeps the positive part.
The stage is found automatically for every registry architecture (the last module, in
execution order, whose output is still a spatial map; :func:`find_target_layer`).
:func:`gradcam_region_job` tiles a level-0 box of a slide into model patches and returns
a mosaic with its :class:`~napari_lnmeta.io.frame.SlideFrame`, ready for a napari layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io.frame import SlideFrame
from ..progress import Job, Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..io.slide import Slide
    from ..models.io import ModelMeta

# --------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------
def find_target_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last module (in execution order) whose output is still a spatial map.

    A forward pass with hooks on every module records when each one finishes; a
    container finishes after its children, so for a ResNet this is ``layer4``, for VGG /
    DenseNet / EfficientNet ``features``, for ``lnmeta_cnn_small`` ``layer4``. Adaptive
    pools (whose output is the pooled map, not a stage) are skipped.
    """
    import torch
    from torch import nn

    order: list[nn.Module] = []
    skip = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)

    def hook(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1 \
                and not isinstance(mod, skip):
            order.append(mod)

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise InputError("the model has no convolutional stage with a spatial output "
                         "(patches too small?)")
    return order[-1]


def _as_input(patches: Any, meta: ModelMeta | None, device: torch.device) -> torch.Tensor:
    import torch

    from ..models.io import IMAGENET_MEAN, IMAGENET_STD, ModelMeta
    from ..models.preprocess import Preprocess

    if isinstance(patches, torch.Tensor) and patches.is_floating_point():
        x = patches.to(device).float()
        return x[None] if x.ndim == 3 else x
    m = meta or ModelMeta(architecture="?", classes=["a", "b"], patch_size=1,
                          mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    stain = None
    if meta is not None and meta.normalisation:
        from .inference import stain_transform

        stain = stain_transform(meta.normalisation, device)
    return Preprocess.for_meta(m, device, stain=stain)(patches)


def gradcam(model: nn.Module, patches: Any, target_layer: nn.Module | None = None, *,
            class_index: int | None = None, meta: ModelMeta | None = None,
            device: str | torch.device = "cpu", batch_size: int = 32,
            out_size: int | None = None, return_probs: bool = False):
    """Grad-CAM maps of patches, in [0, 1].

    Parameters
    ----------
    model
        A classifier (registry architecture or any CNN), on ``device``.
    patches
        uint8 ``(B, H, W, 3)`` (numpy or torch; scaled and normalised with ``meta``'s
        mean/std and stain normalisation, ImageNet's without ``meta``) or a float tensor
        ``(B, 3, H, W)`` already normalised.
    target_layer
        The module whose activations are weighted; default :func:`find_target_layer`.
    class_index
        Class explained; default the tumour class of ``meta`` when it has one, else
        each patch's predicted class. With a one-logit sigmoid head, class 1 is the
        logit and class 0 its negative.
    out_size
        Side of the returned maps (default the input side).
    return_probs
        Also return the ``(B, C)`` class probabilities.

    Returns
    -------
    numpy.ndarray
        ``(B, out_size, out_size)`` float32, each map divided by its maximum (all zeros
        where no activation supports the class).
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    x_all = _as_input(patches, meta, dev)
    if class_index is None and meta is not None:
        from ..errors import ModelError
        from .inference import tumour_index

        try:
            class_index = tumour_index(meta)
        except ModelError:
            class_index = None
    layer = target_layer or find_target_layer(model, x_all)
    h, w = x_all.shape[2:]
    size = (out_size or h, out_size or w)
    saved: dict[str, torch.Tensor] = {}

    def keep(_mod, _inp, out):
        saved["a"] = out
        return out.clone()  # later in-place ops (ReLU(inplace=True)) must not touch it

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(keep)
    maps, probs = [], []
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(0, len(x_all), batch_size):
                x = x_all[i:i + batch_size].clone().requires_grad_(True)
                logits = model(x)
                if logits.ndim == 1:
                    logits = logits[:, None]
                if logits.shape[1] == 1:
                    p = torch.sigmoid(logits)
                    probs.append(torch.cat([1 - p, p], 1).detach())
                    sign = -1.0 if class_index == 0 else 1.0
                    score = sign * logits[:, 0]
                else:
                    probs.append(torch.softmax(logits, 1).detach())
                    idx = (logits.argmax(1) if class_index is None
                           else torch.full((len(x),), int(class_index), device=dev))
                    score = logits.gather(1, idx[:, None])[:, 0]
                act = saved["a"]
                grad = torch.autograd.grad(score.sum(), act)[0]
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * act).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
                mx = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
                cam = torch.where(mx > 1e-12, cam / mx, torch.zeros_like(cam))
                maps.append(cam.detach().float().cpu().numpy())
    finally:
        handle.remove()
        model.train(was_training)
    out = np.clip(np.concatenate(maps), 0.0, 1.0).astype(np.float32)
    if return_probs:
        return out, torch.cat(probs).float().cpu().numpy()
    return out


def gradcam_region_job(slide: Slide, model: nn.Module, meta: ModelMeta,
                       box: tuple[float, float, float, float], *, max_patches: int = 256,
                       batch_size: int = 16, device: str | torch.device = "cpu",
                       class_index: int | None = None, cam_px: int = 64
                       ) -> Job[tuple[np.ndarray, SlideFrame, dict[str, Any]]]:
    """Grad-CAM over a level-0 box of a slide, as a mosaic of patch maps.

    The box (``(row0, col0, row1, col1)``, clipped to the slide) is tiled with
    non-overlapping model patches read at the model's µm/px (level 0 when the slide's or
    the model's µm/px is unknown). When more than ``max_patches`` are needed, a centred
    sub-box is used (and noted). Each patch's map is reduced to ``cam_px`` pixels a side.

    Returns
    -------
    (cam, frame, info)
        The ``(ny * c, nx * c)`` float32 map, its :class:`SlideFrame` (for
        :func:`~napari_lnmeta.io.frame.layer_transform`), and ``{"n_patches",
        "grid", "probability" (ny, nx) of the explained class, "notes"}``.
    """
    ps = int(meta.patch_size)
    mpp = meta.mpp if (meta.mpp and slide.mpp) else None
    ds = mpp / slide.mpp if mpp else 1.0
    side0 = ps * ds
    h0, w0 = slide.shape
    r0, c0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    r1, c1 = min(float(h0), float(box[2])), min(float(w0), float(box[3]))
    if r1 <= r0 or c1 <= c0:
        raise InputError("the region to explain lies outside the slide")
    ny = max(1, math.ceil((r1 - r0) / side0))
    nx = max(1, math.ceil((c1 - c0) / side0))
    notes = []
    if ny * nx > max_patches:
        f = math.sqrt(max_patches / (ny * nx))
        ny2, nx2 = max(1, int(ny * f)), max(1, int(nx * f))
        while ny2 * nx2 > max_patches:
            ny2, nx2 = (ny2 - 1, nx2) if ny2 >= nx2 else (ny2, nx2 - 1)
        cy, cx = (r0 + r1) / 2, (c0 + c1) / 2
        r0, c0 = cy - ny2 * side0 / 2, cx - nx2 * side0 / 2
        notes.append(f"the view needs {ny * nx} patches; the central {ny2}x{nx2} "
                     f"(max {max_patches}) were explained")
        ny, nx = ny2, nx2
    r0, c0 = math.floor(r0), math.floor(c0)
    cpx = int(min(cam_px, ps))
    n = ny * nx
    cam = np.zeros((ny * cpx, nx * cpx), np.float32)
    prob = np.zeros((ny, nx), np.float32)
    cells = [(i, j) for i in range(ny) for j in range(nx)]
    explained = None
    for k0 in range(0, n, batch_size):
        chunk = cells[k0:k0 + batch_size]
        batch = np.stack([
            slide.read_region((int(round(r0 + i * side0)), int(round(c0 + j * side0))),
                              (ps, ps), **({"mpp": mpp} if mpp else {"level": 0}))
            for i, j in chunk])
        maps, p = gradcam(model, batch, class_index=class_index, meta=meta, device=device,
                          batch_size=batch_size, out_size=cpx, return_probs=True)
        if explained is None:
            explained = class_index
            if explained is None:
                from ..errors import ModelError
                from .inference import tumour_index

                try:
                    explained = tumour_index(meta)
                except ModelError:
                    explained = int(p.shape[1] - 1)
        for (i, j), m, pp in zip(chunk, maps, p, strict=True):
            cam[i * cpx:(i + 1) * cpx, j * cpx:(j + 1) * cpx] = m
            prob[i, j] = pp[explained]
        yield Progress(min(n, k0 + batch_size), n, "Grad-CAM")
    frame = SlideFrame(downsample=side0 / cpx, origin=(float(r0), float(c0)),
                       slide_mpp=slide.mpp, slide=slide.name, slide_shape=tuple(slide.shape))
    return cam, frame, {"n_patches": n, "grid": [ny, nx], "probability": prob,
                        "class": meta.classes[explained] if explained is not None and
                        explained < len(meta.classes) else None, "notes": notes}
