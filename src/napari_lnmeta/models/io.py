"""Model files: safetensors weights with the model's metadata in the header; never pickles.

A model file is a plain `safetensors <https://github.com/huggingface/safetensors>`_ file.
Its header's ``__metadata__`` (a str -> str map) holds

``lnmeta``
    JSON of :class:`ModelMeta`: architecture, classes, patch size, µm/px, input
    normalisation, head and an ``extra`` dict (training config, metrics...);
``format``
    ``"pt"`` (tensors are PyTorch state-dict entries);
``lnmeta_version``
    version of the package that wrote it.

Loading never unpickles anything: a ``torch.save`` checkpoint (zip or pickle) is refused
with :class:`~napari_lnmeta.errors.ModelError` naming the file. Writes are atomic, so an
interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, ModelError
from ..io import jsonio
from ..io.atomic import atomic_path
from ..io.validate import MPP_MAX, MPP_MIN, mpp_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

#: ImageNet statistics (inputs scaled to [0, 1] first)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_MAX_HEADER = 100_000_000


@dataclass
class ModelMeta:
    """What a model needs besides its weights to be used correctly.

    Parameters
    ----------
    architecture
        Registry name (``"resnet18"``...), see :func:`~napari_lnmeta.models.registry.list_architectures`.
    classes
        Class names in output order, e.g. ``["normal", "tumour"]``.
    patch_size
        Input side in pixels at ``mpp``.
    mpp
        µm/px the model was trained at (``None``: unknown / pixel units).
    normalisation
        Stain normalisation applied to inputs, e.g. ``{"method": "macenko", "target": {...}}``.
    mean, std
        Per-channel input normalisation applied after scaling to [0, 1].
    head
        ``"softmax"`` (one logit per class) or ``"sigmoid"`` (one logit when binary, else
        one independent logit per class).
    extra
        Anything else JSON-able: training config, metrics, provenance.
    """

    architecture: str
    classes: list[str]
    patch_size: int
    mpp: float | None = None
    normalisation: dict | None = None
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    head: str = "softmax"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Validate every field (a model file's metadata is input like any other)."""
        name = self.architecture

        def bad(problem: str) -> ModelError:
            return ModelError(name, f"model metadata: {problem}")

        if not isinstance(self.architecture, str) or not self.architecture:
            raise ModelError("model", f"model metadata: architecture {self.architecture!r} "
                             "is not a name")
        if not isinstance(self.classes, (list, tuple)) or not all(
                isinstance(c, (str, int)) and not isinstance(c, bool) for c in self.classes):
            raise bad(f"classes {self.classes!r} is not a list of names")
        self.classes = [str(c) for c in self.classes]
        if len(set(self.classes)) != len(self.classes):
            raise bad(f"classes {self.classes} repeat a name")
        if self.head not in ("softmax", "sigmoid"):
            raise bad(f"head must be 'softmax' or 'sigmoid', got {self.head!r}")
        if len(self.classes) < 2 and self.head == "softmax":
            raise bad(f"a softmax head needs >= 2 classes, got {self.classes}")
        if len(self.classes) < 1:
            raise bad("no classes")
        ps = self.patch_size
        if isinstance(ps, bool) or not isinstance(ps, (int, float, np.integer, np.floating)) \
                or not math.isfinite(ps) or ps != int(ps) or not (1 <= int(ps) <= 8192):
            raise bad(f"patch_size {ps!r} is not a whole number of pixels in [1, 8192]")
        self.patch_size = int(ps)
        if self.mpp is not None:
            problem = mpp_problem(self.mpp)
            if problem is not None or isinstance(self.mpp, str):
                raise bad(f"mpp {self.mpp!r} is not a pixel size "
                          f"({problem or 'a string, not a number'}; it must be finite and "
                          f"within [{MPP_MIN:g}, {MPP_MAX:g}] µm/px)")
            self.mpp = float(self.mpp)
        for label in ("mean", "std"):
            v = getattr(self, label)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise bad(f"{label} {v!r} is not 3 numbers (RGB)")
            vals = [float(x) for x in v]
            if not all(math.isfinite(x) for x in vals):
                raise bad(f"{label} {v!r} is not finite")
            if label == "std" and not all(x > 0 for x in vals):
                raise bad(f"std {v!r} must be > 0 (inputs are divided by it)")
            setattr(self, label, vals)
        norm = self.normalisation
        if norm is not None and not (isinstance(norm, dict)
                                     and isinstance(norm.get("method"), str)):
            raise bad(f"normalisation {norm!r} is not an object with a 'method' name")
        if not isinstance(self.extra, dict):
            raise bad(f"extra {self.extra!r} is not an object")

    @property
    def num_outputs(self) -> int:
        """Logits the network produces (1 for a binary sigmoid head)."""
        if self.head == "sigmoid" and len(self.classes) == 2:
            return 1
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelMeta:
        known = {k: d[k] for k in ("architecture", "classes", "patch_size", "mpp",
                                   "normalisation", "mean", "std", "head", "extra") if k in d}
        return cls(**known)


# --------------------------------------------------------------------------------------
# Low-level safetensors reading with clear refusals
# --------------------------------------------------------------------------------------
def _sniff(path: Path) -> None:
    """Raise ModelError unless ``path`` looks like a safetensors file (no pickle ever)."""
    if not path.exists():
        raise ModelError(path, "no such model file")
    if path.is_dir():
        raise ModelError(path, "is a directory, not a .safetensors model file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(9)
    if size == 0:
        raise ModelError(path, "the model file is empty")
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= min(size - 8, _MAX_HEADER) and head[8:9] == b"{":
            return  # a safetensors header
    if head[:2] == b"PK":
        raise ModelError(path, "is a PyTorch checkpoint (torch.save zip/pickle); pickled models "
                         "are never loaded because unpickling can run arbitrary code. Convert it "
                         "once, in a trusted session, with napari_lnmeta.models.io.save_model "
                         "(or safetensors.torch.save_file) and use the .safetensors file")
    if head[:1] == b"\x80" or head[:1] in (b"(", b"]", b"}"):
        raise ModelError(path, "is a Python pickle, not safetensors; pickled models are never "
                         "loaded because unpickling can run arbitrary code. Save the weights "
                         "with safetensors instead")
    raise ModelError(path, "is not a safetensors file (bad header)")


def read_header(path: str | Path) -> dict[str, Any]:
    """The safetensors JSON header (tensor table plus ``__metadata__``), without the tensors."""
    path = Path(path)
    _sniff(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(path, f"is not a safetensors file (header is not JSON: {e})") from e


def read_meta(path: str | Path) -> ModelMeta:
    """The :class:`ModelMeta` of a model file (reads only the header)."""
    path = Path(path)
    md = read_header(path).get("__metadata__") or {}
    if "lnmeta" not in md:
        raise ModelError(path, "safetensors file without napari-lnmeta metadata (a bare state "
                         "dict); use it to initialise a model (--init) rather than as a model")
    try:
        d = json.loads(md["lnmeta"])
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelError(path, f"corrupt napari-lnmeta metadata ({e})") from e
    return meta_from_json(d, path)


def meta_from_json(d: Any, path: str | Path) -> ModelMeta:
    """:meth:`ModelMeta.from_json` with every refusal naming the model file ``path``."""
    if not isinstance(d, dict):
        raise ModelError(path, "corrupt napari-lnmeta metadata (not a JSON object)")
    missing = [k for k in ("architecture", "classes", "patch_size") if k not in d]
    if missing:
        raise ModelError(path, f"napari-lnmeta metadata lacks {', '.join(missing)}")
    try:
        meta = ModelMeta.from_json(d)
    except ModelError as e:
        raise ModelError(path, e.problem) from e
    except (TypeError, ValueError) as e:
        raise ModelError(path, f"corrupt napari-lnmeta metadata ({e})") from e
    if meta.normalisation:
        from ..io.stain_target import StainTarget

        norm = meta.normalisation
        td = norm.get("target")
        try:
            if td is not None:
                if not isinstance(td, dict):
                    raise TypeError(f"target {td!r} is not an object")
                StainTarget.from_json({**td, "method": norm["method"]})
            else:
                StainTarget.default(norm["method"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(path, f"model metadata: invalid stain normalisation ({e})") from e
    return meta


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the ``__metadata__`` map of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    md = read_header(path).get("__metadata__") or {}
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(path, f"cannot read the tensors ({e})") from e
    return tensors, dict(md)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def save_model(path: str | Path, model: nn.Module, meta: ModelMeta, *, overwrite: bool = False,
               dtype: str | None = None) -> Path:
    """Write ``model``'s state dict and ``meta`` as one safetensors file, atomically.

    Parameters
    ----------
    path
        Target ``.safetensors`` file.
    model
        The network (any device); its ``state_dict`` is saved.
    meta
        Metadata stored in the header.
    overwrite
        Replace an existing file (the old one stays intact until the new one is complete).
    dtype
        ``"float16"`` / ``"bfloat16"`` to store floating tensors at half precision (they
        are loaded back as float32); ``None`` keeps them as they are.
    """
    import torch
    from safetensors.torch import save_file

    from .. import __version__

    path = Path(path)
    half = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}
    if dtype not in half:
        raise ValueError(f"dtype must be one of {list(half)}, got {dtype!r}")
    tensors = {}
    for k, v in model.state_dict().items():
        t = v.detach().to("cpu")
        if half[dtype] is not None and t.is_floating_point():
            t = t.to(half[dtype])
        tensors[k] = t.contiguous().clone()
    metadata = {"format": "pt", "lnmeta": jsonio.dumps(meta.to_json()),
                "lnmeta_version": __version__}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Build the network a model file describes and load its weights.

    Returns
    -------
    (model, meta)
        The model in eval mode on ``device`` (floating weights as float32).

    Raises
    ------
    ModelError
        Missing file, a pickle / ``torch.save`` checkpoint, not safetensors, no lnmeta
        metadata, or weights that do not fit the architecture.
    """
    import torch

    from .registry import build_model

    path = Path(path)
    meta = read_meta(path)
    tensors, _ = read_safetensors(path)
    if meta.architecture.startswith("mil:"):
        raise ModelError(path, "is a slide-level MIL model, not a patch classifier: use it with "
                         "`lnmeta mil` / the Slide-level MIL widget (models.mil.load_mil)")
    def build():
        if meta.architecture.startswith("spatial:"):  # seed-004 spatial-context model
            from .spatial import build_from_meta

            return build_from_meta(meta, path=path)
        return build_model(meta.architecture, meta.num_outputs)

    # Built without storage (no random initialisation of weights that are replaced at
    # once) and given the file's tensors; a network that computes something real while
    # it is built (a buffer not in the file) is built the ordinary way.
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on "meta"
        model = None
    if model is not None and any(t.is_meta for n, t in _tensors(model)
                                 if n not in tensors):
        model = None
    on_meta = model is not None
    if model is None:
        model = build()
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    bad = [k for k in own if k in tensors and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if bad:
            parts.append(f"wrong shape {bad[:3]}")
        raise ModelError(path, f"weights do not fit a {meta.architecture} with "
                         f"{meta.num_outputs} outputs: " + ", ".join(parts))
    state = {k: (t.to(own[k].dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=on_meta)
    model.to(torch.device(device))
    model.eval()
    return model, meta


def _tensors(model: nn.Module):
    """``(state-dict name, tensor)`` of every parameter and buffer, persistent or not."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def default_model_path() -> Path:
    """The bundled default model (``napari_lnmeta/data/default_model.safetensors``)."""
    return Path(__file__).resolve().parents[1] / "data" / "default_model.safetensors"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device for a ``--device`` value; the one place devices are resolved.

    ``"auto"``, ``""`` or ``None``: the first CUDA device when available, else the CPU.
    Anything else is taken as given (``cpu``, ``cuda``, ``cuda:N``, ``mps``) after checking
    that it exists here: an unknown name, CUDA on a machine without it, or a CUDA index
    past the last device is an :class:`~napari_lnmeta.errors.InputError`.
    """
    import torch

    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but CUDA is not available here "
                             "(use --device auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    return dev


def device_choices() -> list[str]:
    """The ``--device`` values this machine offers: auto, cpu, and cuda / cuda:N when present."""
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def preprocess(batch: torch.Tensor | np.ndarray, meta: ModelMeta, *,
               device: str | torch.device = "cpu", normalised: bool = False,
               stain: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Turn patches into the network's input: float32 NCHW, scaled and normalised.

    ``batch`` may be a numpy or torch ``uint8`` array, ``(B, H, W, 3)`` or ``(B, 3, H, W)``
    (values 0-255), or a float tensor ``(B, 3, H, W)`` in [0, 1]. With
    ``normalised=True`` a float tensor is taken as already mean/std normalised.
    The transform is :class:`~napari_lnmeta.models.preprocess.Preprocess` with the
    model's mean/std. A model whose metadata asks for stain normalisation needs its
    normaliser as ``stain`` (this layer has none:
    ``core.inference.stain_transform(meta.normalisation, device)`` builds it).
    """
    import torch

    from .preprocess import Preprocess

    prep = Preprocess.for_meta(meta, device, stain=stain)
    x = prep.to_nchw(batch)
    if normalised and x.dtype != torch.uint8:
        return x.float().contiguous()
    if meta.normalisation and stain is None:
        raise ValueError(f"a {meta.architecture} model with stain normalisation "
                         f"{meta.normalisation.get('method')!r} needs stain= (its normaliser, "
                         "core.inference.stain_transform)")
    return prep(x)


def logits_to_probs(logits: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """Class probabilities ``(B, len(classes))`` from the head's logits."""
    import torch

    logits = logits.float()
    if meta.head == "softmax":
        return torch.softmax(logits, dim=1)
    p = torch.sigmoid(logits)
    if p.shape[1] == 1 and len(meta.classes) == 2:
        return torch.cat([1 - p, p], dim=1)
    return p


def infer_batch(model: nn.Module, batch: torch.Tensor | np.ndarray, *,
                device: str | torch.device, meta: ModelMeta, amp: bool = False,
                normalised: bool = False,
                stain: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Class probabilities for one batch of patches.

    Parameters
    ----------
    model
        Network already on ``device`` and in eval mode (as :func:`load_model` returns).
    batch
        Patches, see :func:`preprocess`.
    device
        Where to run (always explicit).
    meta
        The model's metadata (normalisation and head).
    amp
        Autocast to float16 on CUDA.
    stain
        The stain normaliser the metadata asks for (see :func:`preprocess`).

    Returns
    -------
    numpy.ndarray
        ``(B, len(meta.classes))`` float32 probabilities.
    """
    import torch

    dev = torch.device(device)
    with torch.inference_mode():
        x = preprocess(batch, meta, device=dev, normalised=normalised, stain=stain)
        if amp and dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits = model(x)
        else:
            logits = model(x)
        return logits_to_probs(logits, meta).cpu().numpy().astype(np.float32)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelMeta", "default_model_path", "infer_batch",
           "load_model", "logits_to_probs", "preprocess", "read_header", "read_meta",
           "read_safetensors", "resolve_device", "save_model"]
