"""Backbone registry: torchvision architectures with a new head, optional init, frozen stages.

Every model is built with ``weights=None``; pretrained weights come from ``init``: a
safetensors file (converted weights, one of our own model files) or a name resolved from
the local caches by :mod:`napari_lnmeta.models.backbones` (``imagenet``,
``torchvision:resnet50.IMAGENET1K_V2``, ``hf-hub:ORG/NAME``, a folder...). Nothing is
downloaded here.

Besides the torchvision architectures, any timm model is an architecture named
``timm:MODEL`` (optionally followed by a JSON object of constructor arguments, e.g.
``timm:vit_large_patch16_224{"dynamic_img_size":true,"init_values":1e-05}``): the string
alone rebuilds the network, so model files that store it reload without extra state.
timm is optional (``pip install napari-lnmeta[foundation]``).

A *stage* is a group of early layers that freezing treats as one unit: for a ResNet the
stem (``conv1`` + ``bn1``) then ``layer1`` ... ``layer4``; for VGG and AlexNet the blocks
between max-pools; for DenseNet the stem then each dense block with its transition; for
EfficientNet / MobileNet / ConvNeXt each entry of ``features``; for a timm ViT the patch
embedding (with the class / register tokens and position embedding) then each
transformer block; for other timm models the stem then each stage. Frozen stages get
``requires_grad=False`` and keep their batch-norm statistics fixed (see
:func:`set_train_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn

#: attribute set on a built model: the list of modules that are frozen
FROZEN_ATTR = "_lnmeta_frozen"


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and where its head and stages are."""

    name: str
    family: str            # resnet | vgg | alexnet | densenet | features | regnet | shufflenet | inception | lnmeta
    min_size: int          # smallest input side that survives the down-sampling
    description: str


def _archs() -> dict[str, Arch]:
    out: dict[str, Arch] = {}

    def add(name, family, min_size, description):
        out[name] = Arch(name, family, min_size, description)

    for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
              "resnext50_32x4d", "wide_resnet50_2"):
        add(n, "resnet", 32, f"torchvision {n}")
    for n in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg11", "vgg13", "vgg16", "vgg19"):
        add(n, "vgg", 32, f"torchvision {n}")
    add("alexnet", "alexnet", 63, "torchvision alexnet")
    for n in ("densenet121", "densenet161", "densenet169", "densenet201"):
        add(n, "densenet", 32, f"torchvision {n}")
    for n in [f"efficientnet_b{i}" for i in range(8)] + ["efficientnet_v2_s"]:
        add(n, "features", 32, f"torchvision {n}")
    for n in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"):
        add(n, "features", 32, f"torchvision {n}")
    for n in ("convnext_tiny", "convnext_small"):
        add(n, "features", 32, f"torchvision {n}")
    for n in ("regnet_y_400mf", "regnet_y_800mf", "regnet_x_400mf"):
        add(n, "regnet", 32, f"torchvision {n}")
    for n in ("shufflenet_v2_x0_5", "shufflenet_v2_x1_0"):
        add(n, "shufflenet", 32, f"torchvision {n}")
    add("inception_v3", "inception", 75, "torchvision inception_v3 (no auxiliary head)")
    add("lnmeta_cnn_small", "lnmeta", 8,
        "compact ResNet-style CNN (stem + 4 one-block stages, 24-192 channels, ~0.9 M "
        "parameters) for small patches at low magnification")
    return out


ARCHITECTURES: dict[str, Arch] = _archs()


def list_architectures() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(ARCHITECTURES)


def get_arch(architecture: str) -> Arch:
    if isinstance(architecture, str) and architecture.startswith("timm:"):
        name, _ = split_timm(architecture)
        return Arch(architecture, "timm", 16, f"timm {name}")
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ModelError(architecture, "unknown architecture; choose one of "
                         + ", ".join(list_architectures())) from None


# --------------------------------------------------------------------------------------
# timm architectures
# --------------------------------------------------------------------------------------
def split_timm(architecture: str) -> tuple[str, dict]:
    """``"timm:NAME{json}"`` -> ``(NAME, kwargs)``."""
    import json

    body = architecture[len("timm:"):]
    name, brace, rest = body.partition("{")
    args = {}
    if brace:
        try:
            args = json.loads("{" + rest)
        except json.JSONDecodeError as e:
            raise ModelError(architecture, f"bad timm constructor arguments ({e})") from None
    if not name:
        raise ModelError(architecture, "timm: needs a model name, e.g. timm:vit_base_patch16_224")
    return name, args


def _build_timm(architecture: str, num_classes: int):
    from .backbones import _require

    timm = _require("timm", architecture)
    name, args = split_timm(architecture)
    layers = {"swiglu_packed": "SwiGLUPacked", "swiglu": "SwiGLU", "mlp": "Mlp",
              "gluMlp": "GluMlp"}
    if isinstance(args.get("mlp_layer"), str):
        args["mlp_layer"] = getattr(timm.layers, layers.get(args["mlp_layer"], args["mlp_layer"]))
    if not timm.is_model(name):
        raise ModelError(architecture, f"timm has no model {name!r}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=int(num_classes), **args)
    except (TypeError, ValueError) as e:
        raise ModelError(architecture, f"timm cannot build it ({e})") from e


def _timm_head_name(model) -> str:
    head = model.get_classifier()
    for n, m in model.named_modules():
        if m is head:
            return n
    return "head"


# --------------------------------------------------------------------------------------
# A compact CNN for low-magnification patches (the default model)
# --------------------------------------------------------------------------------------
def _small_cnn(num_classes: int, stem: int = 24, widths=(32, 64, 128, 192),
               strides=(2, 2, 2, 1)):
    """A compact residual CNN: a stem, then four one-block stages (3 halve the resolution).

    Made for small patches at low magnification (the default model reads 32 px at
    7.8 µm/px); about 0.9 M parameters, a few tens of MFLOPs per 32 px patch.
    """
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            idt = x if self.down is None else self.down(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + idt)

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
            cin = stem
            layers = []
            for w, st in zip(widths, strides, strict=True):
                layers.append(Block(cin, w, st))
                cin = w
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(0.2)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.dropout(self.pool(x).flatten(1)))

    return SmallCNN()


# --------------------------------------------------------------------------------------
# Heads and stages per family
# --------------------------------------------------------------------------------------
def _replace_head(model, family: str, num_classes: int) -> None:
    from torch import nn

    if family in ("resnet", "regnet", "shufflenet", "inception"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif family == "densenet":
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    elif family in ("vgg", "alexnet", "features"):
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    elif family in ("lnmeta", "timm"):
        pass  # built with the right number of classes
    else:  # pragma: no cover - registry and this function are kept in step
        raise AssertionError(family)


def stages(model, architecture: str) -> list[list[nn.Module]]:
    """The freezable stages of a built model, earliest first (see module docstring)."""
    from torch import nn

    fam = get_arch(architecture).family
    if fam == "resnet":
        return [[model.conv1, model.bn1], [model.layer1], [model.layer2], [model.layer3],
                [model.layer4]]
    if fam == "lnmeta":
        return [[model.stem], [model.layer1], [model.layer2], [model.layer3], [model.layer4]]
    if fam == "timm":
        if hasattr(model, "blocks") and hasattr(model, "patch_embed"):  # ViT-like
            return [[model.patch_embed]] + [[b] for b in model.blocks]
        if hasattr(model, "stages"):
            stem = [m for n, m in model.named_children() if n.startswith("stem")]
            return ([stem] if stem else []) + [[m] for m in model.stages]
        head = _timm_head_name(model).split(".")[0]
        return [[m] for n, m in model.named_children() if n != head]
    if fam in ("vgg", "alexnet"):
        out, cur = [], []
        for m in model.features:
            cur.append(m)
            if isinstance(m, nn.MaxPool2d):
                out.append(cur)
                cur = []
        if cur:
            out.append(cur)
        return out
    if fam == "densenet":
        f = dict(model.features.named_children())
        out = [[f["conv0"], f["norm0"], f["relu0"], f["pool0"]]]
        for i in range(1, 5):
            group = [f[f"denseblock{i}"]]
            group.append(f[f"transition{i}"] if f"transition{i}" in f else f["norm5"])
            out.append(group)
        return out
    if fam == "features":
        return [[m] for m in model.features]
    if fam == "regnet":
        return [[model.stem]] + [[m] for m in model.trunk_output]
    if fam == "shufflenet":
        return [[model.conv1, model.maxpool], [model.stage2], [model.stage3], [model.stage4],
                [model.conv5]]
    if fam == "inception":
        names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                 "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
        return [[getattr(model, n)] for n in names]
    raise AssertionError(fam)  # pragma: no cover


def head_parameter_names(model, architecture: str) -> set[str]:
    """Names (state-dict keys) of the classification head's parameters."""
    fam = get_arch(architecture).family
    if fam == "timm":
        pre = _timm_head_name(model) + "."
        return {k for k in model.state_dict() if k.startswith(pre)}
    prefix = {"resnet": "fc.", "regnet": "fc.", "shufflenet": "fc.", "inception": "fc.",
              "lnmeta": "fc.", "densenet": "classifier."}.get(fam)
    if prefix is None:  # vgg, alexnet, features: the last Linear of classifier
        prefix = f"classifier.{len(model.classifier) - 1}."
    return {k for k in model.state_dict() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------
def build_model(architecture: str, num_classes: int, *, init: str | Path | None = None,
                freeze: int = 0, freeze_convs: int = 0) -> nn.Module:
    """Build a classifier with ``num_classes`` outputs.

    Parameters
    ----------
    architecture
        A name from :func:`list_architectures` (``"resnet18"``, ``"vgg16_bn"``, ...).
    num_classes
        Output logits (1 for a sigmoid binary head, else the number of classes).
    init
        Optional initial weights: a safetensors file (a plain state dict or an lnmeta
        model file) or a pretrained name resolved from the local caches by
        :func:`napari_lnmeta.models.backbones.resolve` (``imagenet``, ``timm:...``,
        ``hf-hub:...``, a folder). Tensors whose name and shape match are loaded; the head
        is skipped when its shape differs. ``ModelError`` when nothing matches. The
        provenance of a named init is recorded in ``model._lnmeta_init``.
    freeze
        Freeze the first ``freeze`` stages (see module docstring).
    freeze_convs
        Alternatively freeze the first ``freeze_convs`` convolution layers in forward
        order, with the batch norm that follows each (seed 000 freezes the first three
        conv layers of ResNet-50).

    Returns
    -------
    torch.nn.Module
        In train mode; frozen modules are listed in ``model._lnmeta_frozen``.
    """
    arch = get_arch(architecture)
    if int(num_classes) < 1:
        raise ModelError(architecture, f"num_classes must be >= 1, got {num_classes}")
    if arch.family == "lnmeta":  # torch only: no torchvision import (a second of start-up)
        model = _small_cnn(int(num_classes))
    elif arch.family == "timm":
        model = _build_timm(architecture, int(num_classes))
    else:
        import torchvision.models as tvm

        kwargs = {"weights": None}
        if arch.family == "inception":
            kwargs.update(aux_logits=False, init_weights=True)
        model = getattr(tvm, architecture)(**kwargs)
        _replace_head(model, arch.family, int(num_classes))
    if init is not None:
        load_init(model, architecture, init)
    freeze_model(model, architecture, stages_=freeze, convs=freeze_convs)
    return model


#: attribute set on a model built from a named init: its provenance dict
INIT_ATTR = "_lnmeta_init"


def load_init(model, architecture: str, path: str | Path) -> list[str]:
    """Load matching tensors from a safetensors file or a pretrained name (see
    :mod:`napari_lnmeta.models.backbones`) into ``model``; return their names."""
    from .backbones import is_named, resolve
    from .io import read_safetensors

    if is_named(path):
        src = resolve(str(path), architecture)
        if src.is_transformers:
            from .backbones import raise_not_an_init

            raise_not_an_init(str(path), src.id)
        if src.architecture != architecture and not (
                src.architecture.split("{")[0] == architecture.split("{")[0]):
            raise ModelError(str(path), f"is a {src.architecture}, not a {architecture}; "
                             f"use --arch {src.architecture} (or leave --arch out)")
        tensors = src.state_dict()
        if get_arch(architecture).family == "timm":
            tensors = _timm_filter(model, tensors, str(path))
        names = load_init_tensors(model, architecture, tensors, str(path))
        head = head_parameter_names(model, architecture)
        missing = [k for k in model.state_dict() if k not in head and k not in names
                   and not k.endswith("num_batches_tracked")]
        if missing:
            raise ModelError(str(path), f"the checkpoint {src.weights_file} lacks {len(missing)} "
                             f"tensors of {architecture}, e.g. {', '.join(missing[:3])} "
                             "(another model under this name?)")
        object.__setattr__(model, INIT_ATTR, src.provenance())
        return names
    tensors, _ = read_safetensors(path)
    names = load_init_tensors(model, architecture, tensors, path)
    from .extractor import file_digest

    object.__setattr__(model, INIT_ATTR, {"id": f"file:{Path(path).name}",
                                          "weights_sha256": file_digest(path, 64),
                                          "architecture": architecture, "file": str(path)})
    return names


def _timm_filter(model, tensors: dict, what: str) -> dict:
    """timm's own checkpoint conversion for the model's family (what ``pretrained=True``
    applies: e.g. a ViT's position embedding resampled to the model's grid)."""
    import sys

    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return tensors
    try:
        return fn(tensors, model)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ModelError(what, f"timm cannot convert this checkpoint for "
                         f"{type(model).__name__} ({type(e).__name__}: {e})") from e


def load_init_tensors(model, architecture: str, tensors: dict, path: str | Path) -> list[str]:
    """Load the tensors of ``tensors`` whose name and shape fit ``model`` (head excepted)."""
    own = model.state_dict()
    head = head_parameter_names(model, architecture)
    loaded, skipped = {}, []
    for key, t in tensors.items():
        k = key
        for pre in ("module.", "model.", "backbone."):
            if k.startswith(pre) and k[len(pre):] in own:
                k = k[len(pre):]
        if k in own and tuple(own[k].shape) == tuple(t.shape):
            loaded[k] = t.to(own[k].dtype)
        elif k in own and k not in head:
            skipped.append(f"{k} {tuple(t.shape)} != {tuple(own[k].shape)}")
    body = [k for k in own if k not in head and not k.endswith("num_batches_tracked")]
    if not any(k in loaded for k in body):
        raise ModelError(path, f"no tensor in this file matches a {architecture} "
                         "(wrong architecture?)")
    if skipped:
        raise ModelError(path, f"{len(skipped)} tensors do not fit a {architecture}, e.g. "
                         + "; ".join(skipped[:3]))
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def freeze_model(model, architecture: str, *, stages_: int = 0, convs: int = 0) -> list:
    """Freeze the first stages (or conv layers); record the frozen modules on the model."""
    from torch import nn

    frozen: list[nn.Module] = []
    st = stages(model, architecture)
    if stages_ < 0 or stages_ > len(st):
        raise ModelError(architecture, f"freeze must be between 0 and {len(st)} stages, "
                         f"got {stages_}")
    for group in st[:stages_]:
        frozen.extend(group)
    if stages_ and get_arch(architecture).family == "timm":
        # a ViT's class / register tokens and position embedding belong to its first stage
        for n in ("cls_token", "reg_token", "pos_embed"):
            prm = getattr(model, n, None)
            if prm is not None and hasattr(prm, "requires_grad_"):
                prm.requires_grad_(False)
    if convs:
        mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        n = 0
        for i, m in enumerate(mods):
            if isinstance(m, nn.Conv2d):
                if n == convs:
                    break
                n += 1
                frozen.append(m)
                if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                    frozen.append(mods[i + 1])
        if n < convs:
            raise ModelError(architecture, f"has only {n} conv layers, cannot freeze {convs}")
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    object.__setattr__(model, FROZEN_ATTR, frozen)
    return frozen


def set_train_mode(model, train: bool = True):
    """``model.train(train)``, keeping frozen modules (and their batch norms) in eval mode."""
    model.train(train)
    if train:
        for m in getattr(model, FROZEN_ATTR, []):
            m.eval()
    return model


def count_parameters(model, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters()
               if p.requires_grad or not trainable_only)


__all__ = ["ARCHITECTURES", "INIT_ATTR", "Arch", "build_model", "count_parameters", "freeze_model",
           "get_arch", "head_parameter_names", "list_architectures", "load_init", "load_init_tensors", "split_timm",
           "set_train_mode", "stages"]
