"""Locally built pretrained weights, laid out exactly as torch hub and the Hugging Face
Hub cache them, so tests (and benchmarks) load backbones by name without a network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

REV = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit id


def torch_cache_file(torch_home: Path, arch: str, weights: str = "DEFAULT") -> Path:
    """Write a seeded random state dict of torchvision ``arch`` where torch hub caches the
    weights ``weights`` (``$TORCH_HOME/hub/checkpoints/<file of the url>``)."""
    from urllib.parse import urlparse

    import torch
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    path = Path(torch_home) / "hub" / "checkpoints" / os.path.basename(urlparse(w.url).path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = getattr(tvm, arch)(weights=None)
    torch.save(model.state_dict(), path)
    return path


def _blob(repo_dir: Path, name: str, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / REV / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))


def hf_cache_repo(hf_home: Path, repo: str, model, *, architecture: str,
                  model_args: dict | None = None, pretrained_cfg: dict | None = None) -> Path:
    """Put a timm ``model``'s weights and config into ``$HF_HOME/hub`` as the Hub cache
    holds repository ``repo`` (blobs, ``snapshots/<rev>/`` links and ``refs/main``)."""
    from safetensors.torch import save

    repo_dir = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    cfg = {"architecture": architecture, "num_classes": 0,
           "num_features": int(getattr(model, "num_features", 0)),
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5],
                              "std": [0.5, 0.5, 0.5], "crop_pct": 1.0,
                              **(pretrained_cfg or {})}}
    if model_args:
        cfg["model_args"] = model_args
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    _blob(repo_dir, "config.json", json.dumps(cfg).encode())
    _blob(repo_dir, "model.safetensors", save(tensors))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REV)
    return repo_dir


def local_folder(folder: Path, model, *, architecture: str, model_args: dict | None = None
                 ) -> Path:
    """The same layout as a Hub repository, in a plain folder (air-gapped sites)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": architecture, "num_classes": 0,
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5],
                              "std": [0.5, 0.5, 0.5]}}
    if model_args:
        cfg["model_args"] = model_args
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def tiny_vit(seed: int = 0, **kw):
    """A small random ViT (patch 16 at 224 px, 2 blocks, width 64)."""
    import timm
    import torch

    torch.manual_seed(seed)
    args = {"embed_dim": 64, "depth": 2, "num_heads": 2, **kw}
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                             **args), args


def tiny_transformers(kind: str = "vit", seed: int = 0):
    """A small random transformers encoder: ``ViTModel`` (``kind="vit"``, as Phikon) or
    ``Dinov2Model`` (``"dinov2"``, as Phikon-v2); patch 16 at 224 px, 2 layers, width 64."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 224, "patch_size": 16}
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(intermediate_size=128, **common))
    return transformers.Dinov2Model(transformers.Dinov2Config(layerscale_value=0.5, **common))


#: Phikon's preprocessor_config.json (a ViTImageProcessor, 224 x 224, ImageNet mean/std)
PHIKON_PREPROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                       "image_processor_type": "ViTImageProcessor", "resample": 3,
                       "rescale_factor": 1 / 255, "size": {"height": 224, "width": 224}}


def hf_transformers_repo(hf_home: Path, repo: str, model, *, preprocessor: dict,
                         weights: str = "model.safetensors", prefix: str = "") -> Path:
    """Put a transformers ``model`` into ``$HF_HOME/hub`` as the Hub caches repository
    ``repo``: ``config.json`` (``save_pretrained``'s), ``preprocessor_config.json`` and the
    weights as ``model.safetensors`` (or ``pytorch_model.bin``), keys under ``prefix``."""
    import io

    import torch
    from safetensors.torch import save

    repo_dir = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    tensors = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "model.safetensors":
        data = save(tensors)
    else:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
    _blob(repo_dir, "config.json", model.config.to_json_string().encode())
    _blob(repo_dir, "preprocessor_config.json", json.dumps(preprocessor).encode())
    _blob(repo_dir, weights, data)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REV)
    return repo_dir
