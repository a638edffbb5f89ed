"""Hugging Face ``transformers`` backbones as patch feature extractors.

Phikon (``owkin/phikon``, a ``ViTModel``) and Phikon-v2 (``owkin/phikon-v2``, a
``Dinov2Model``) are transformers repositories, not timm ones: ``config.json`` has a
``model_type`` instead of timm's ``architecture``, the preprocessing is in
``preprocessor_config.json``. Their model cards take the class token of
``last_hidden_state`` as the embedding; :func:`build_extractor` returns a module whose
output is exactly that.

The network is built from its config (``AutoModel.from_config``, nothing fetched) and the
weights are read by :meth:`~napari_lnmeta.models.backbones.Source.state_dict`
(safetensors, or ``torch.load(weights_only=True)`` for a ``pytorch_model.bin``), never
through transformers' own loader, so loading is offline and never unpickles.

Only imported inside functions (transformers and torch are heavy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn

#: transformers model types whose class token is the embedding, and their model class
MODEL_TYPES = {"vit": "ViTModel", "dinov2": "Dinov2Model",
               "dinov2_with_registers": "Dinov2WithRegistersModel"}


def is_transformers_config(cfg: dict) -> bool:
    """A transformers ``config.json`` of a supported vision encoder (not a timm config)."""
    return "architecture" not in cfg and cfg.get("model_type") in MODEL_TYPES


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"not a readable config.json ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelError(path, "config.json is not a JSON object")
    return cfg


def _side(v, path: Path, key: str) -> int | None:
    """A square side from a processor ``size`` / ``crop_size`` entry."""
    if v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        if "height" in v and "width" in v:
            if int(v["height"]) != int(v["width"]):
                raise ModelError(path, f"{key} {v['height']}x{v['width']} is not square")
            return int(v["height"])
        if "shortest_edge" in v:
            return int(v["shortest_edge"])
    raise ModelError(path, f"cannot read {key} {v!r}")


def preprocessing(path: Path) -> tuple[list[float], list[float], int]:
    """``(mean, std, input side)`` of a ``preprocessor_config.json``.

    The input side is the centre crop when the processor crops, else its resize size;
    patches are read at that size directly, so the resize and crop are identities.
    """
    cfg = read_config(path)
    try:
        if cfg.get("do_normalize", True):
            mean = [float(v) for v in cfg["image_mean"]]
            std = [float(v) for v in cfg["image_std"]]
        else:
            mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    except (KeyError, TypeError, ValueError):
        raise ModelError(path, "preprocessor_config.json has no valid image_mean / "
                         "image_std") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ModelError(path, f"image_mean / image_std must be 3 values (std > 0), got "
                         f"{mean} / {std}")
    side = None
    if cfg.get("do_center_crop"):
        side = _side(cfg.get("crop_size"), path, "crop_size")
    if side is None:
        side = _side(cfg.get("size"), path, "size")
    if cfg.get("do_rescale", True) is False:
        raise ModelError(path, "do_rescale is false: pixel values in 0-255 are not supported")
    return mean, std, int(side or 224)


def build_extractor(src) -> nn.Module:
    """The transformers encoder of ``src`` (a resolved
    :class:`~napari_lnmeta.models.backbones.Source`) loaded with its weights; its output is
    the class token of ``last_hidden_state``, shape ``(B, hidden_size)``."""
    import torch
    from torch import nn

    from .backbones import _require

    transformers = _require("transformers", src.spec)
    cfg_dict = read_config(src.config_file)
    mtype = cfg_dict.get("model_type")
    if mtype not in MODEL_TYPES:
        raise ModelError(src.config_file, f"model_type {mtype!r} is not a supported "
                         f"transformers encoder ({', '.join(MODEL_TYPES)})")
    args = {k: v for k, v in cfg_dict.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(mtype, **args)
        with torch.random.fork_rng(devices=[]):
            model = transformers.AutoModel.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelError(src.config_file, f"transformers cannot build it ({e})") from e
    model = model.float()  # a config's dtype (float16...) is not the extractor's
    sd = src.state_dict()
    prefix = f"{model.base_model_prefix}."
    if sd and all(k.startswith(prefix) for k in sd if not k.startswith(("classifier.",
                                                                          "head."))):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ModelError(src.weights_file, f"{len(bad)} tensors do not fit the network of "
                         f"config.json, e.g. {'; '.join(bad[:3])}")
    result = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    # the pooler is not part of the embedding; a checkpoint may leave it out
    missing = [k for k in result.missing_keys if not k.startswith("pooler.")]
    if missing:
        raise ModelError(src.weights_file, f"the checkpoint lacks {len(missing)} tensors of "
                         f"{type(model).__name__}, e.g. {', '.join(missing[:3])}")
    image_size = int(getattr(config, "image_size", 224) or 224)
    vit = mtype == "vit"

    class ClassToken(nn.Module):
        """``last_hidden_state[:, 0]`` of a transformers vision encoder."""

        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder
            self.num_features = int(config.hidden_size)

        def forward(self, x):
            kw = {}
            if vit and x.shape[-1] != image_size:  # Dinov2 interpolates by itself
                kw["interpolate_pos_encoding"] = True
            return self.encoder(pixel_values=x, **kw).last_hidden_state[:, 0]

    return ClassToken(model)


__all__ = ["MODEL_TYPES", "build_extractor", "is_transformers_config", "preprocessing",
           "read_config"]
