"""One input transform: whole-slide inference, feature extraction, ``infer_batch``,
Grad-CAM, training and validation feed a patch network the same tensor for a patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lnmeta.core.features import make_preprocessor
from napari_lnmeta.core.gradcam import _as_input
from napari_lnmeta.core.inference import PatchModel, model_preprocess, stain_transform
from napari_lnmeta.models.extractor import load_extractor
from napari_lnmeta.models.io import ModelMeta, infer_batch, preprocess, save_model
from napari_lnmeta.models.preprocess import Preprocess
from napari_lnmeta.models.registry import build_model
from napari_lnmeta.progress import run
from napari_lnmeta.train.augment import make_augment
from napari_lnmeta.train.loop import predict_patches_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Inputs:
    """Records what a network is fed (a forward pre-hook)."""

    def __init__(self, net):
        self.seen: list[torch.Tensor] = []
        net.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach().clone()))

    def last(self) -> torch.Tensor:
        return self.seen[-1].contiguous()


@pytest.mark.parametrize("normalisation", [None, {"method": "macenko"}],
                         ids=["plain", "stain-normalised"])
def test_every_path_feeds_the_network_the_same_tensor(t001_patches, tmp_path, normalisation):
    ps = t001_patches.subset(np.arange(6))
    x = ps.read(np.arange(len(ps)))  # real uint8 (B, 32, 32, 3) patches
    torch.manual_seed(0)
    net = build_model("lnmeta_cnn_small", 2).eval()
    meta = ModelMeta(architecture="lnmeta_cnn_small", classes=["normal", "tumour"],
                     patch_size=32, mpp=ps.read_mpp, normalisation=normalisation,
                     mean=[0.7, 0.55, 0.68], std=[0.15, 0.2, 0.12])
    cpu = torch.device("cpu")
    rec = _Inputs(net)

    # the reference: the steps written out
    ref = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    if normalisation:
        ref = stain_transform(normalisation, cpu)(ref)
        assert not torch.equal(ref, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)
    ref = (ref - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)

    got = {}
    # whole-slide inference (the engine's PatchModel), both memory layouts
    for cl in (True, False):
        pm = PatchModel(net, meta, cpu, tumour=1, amp=False, channels_last=cl,
                        stain=stain_transform(normalisation, cpu))
        pm.probs(torch.from_numpy(x))
        got[f"inference channels_last={cl}"] = rec.last()
    net.to(memory_format=torch.contiguous_format)
    # validation / patch-set evaluation during training
    run(predict_patches_job(net, ps, meta, device=cpu, batch_size=len(ps), workers=1))
    got["validation"] = rec.last()
    # a training step: the model's transform with the augmentation between its steps
    prep = model_preprocess(meta, cpu)
    got["training step"] = prep.normalise(make_augment("none")(prep.to_unit(x)))
    # feature extraction from the saved model (its penultimate layer)
    path = save_model(tmp_path / "m.safetensors", net, meta)
    _, info = load_extractor(path)
    assert info.normalisation == normalisation
    got["feature extraction"] = make_preprocessor(info, cpu)(x)
    # Grad-CAM
    got["gradcam"] = _as_input(x, meta, cpu)
    # infer_batch / preprocess (the models layer: the stain normaliser is passed in)
    stain = stain_transform(normalisation, cpu)
    infer_batch(net, x, device=cpu, meta=meta, stain=stain)
    got["infer_batch"] = rec.last()
    got["preprocess NCHW"] = preprocess(torch.from_numpy(x).permute(0, 3, 1, 2), meta,
                                        stain=stain)

    for name, t in got.items():
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        assert torch.equal(t.contiguous(), ref), name


def test_a_model_asking_for_stain_normalisation_needs_its_normaliser():
    meta = ModelMeta(architecture="lnmeta_cnn_small", classes=["normal", "tumour"],
                     patch_size=32, normalisation={"method": "macenko"})
    with pytest.raises(ValueError, match="stain normalisation"):
        PatchModel(build_model("lnmeta_cnn_small", 2), meta, torch.device("cpu"), tumour=1)
    with pytest.raises(ValueError, match="stain normalisation"):
        infer_batch(build_model("lnmeta_cnn_small", 2).eval(),
                    np.zeros((1, 32, 32, 3), np.uint8), device="cpu", meta=meta)
    assert model_preprocess(meta, "cpu").stain is not None
    assert Preprocess.for_meta(meta).stain is None
