"""Networks, the backbone registry and safetensors model files (torch lives here).

Importing this package does not import torch; the functions do, when called.
"""

from __future__ import annotations

from .io import ModelMeta, default_model_path, infer_batch, load_model, read_meta, save_model
from .registry import build_model, list_architectures

__all__ = ["ModelMeta", "build_model", "default_model_path", "infer_batch", "list_architectures",
           "load_model", "read_meta", "save_model"]
