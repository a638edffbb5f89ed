"""Pretrained backbones by name: torchvision ImageNet weights, timm / Hugging Face Hub
models (pathology foundation models included) and local folders, from the local caches.

Loading never downloads: a name is looked up in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) or the Hugging Face cache (``$HF_HOME/hub`` or
``$HF_HUB_CACHE``); when the weights are not there, :class:`~napari_lnmeta.errors.ModelError`
says which file to fetch and where to put it. Fetching happens only in :func:`pull`
(``lnmeta models pull NAME``), i.e. only when the user asks for it by name.

Accepted names (``--init`` for training, ``--backbone`` for feature extraction):

``imagenet``
    torchvision's default ImageNet weights of the chosen registry architecture.
``torchvision:ARCH[.WEIGHTS]``
    e.g. ``torchvision:resnet50.IMAGENET1K_V2`` (``DEFAULT`` when no weights are named).
``timm:MODEL[.TAG]``
    a timm model whose pretrained weights are hosted on the Hub, e.g.
    ``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``.
``hf-hub:ORG/NAME[@REVISION]``
    a timm-format Hub repository (``config.json`` + ``model.safetensors``), or a
    transformers ViT / DINOv2 repository (``config.json`` with a ``model_type``,
    ``preprocessor_config.json`` + ``model.safetensors``; used as a feature extractor, its
    embedding the class token of ``last_hidden_state``, see :mod:`._hf`).
a short name of :data:`KNOWN` (``uni``, ``virchow2``, ...)
    the pathology encoders whose ids, licences and preprocessing are listed there.
a folder
    the same layout as a Hub repository (timm: ``config.json`` + ``model.safetensors``;
    transformers: ``config.json`` + ``preprocessor_config.json`` + ``model.safetensors``),
    for sites without internet.

Checkpoints that are not safetensors (torchvision's ``.pth``, a Hub ``pytorch_model.bin``)
are loaded with ``torch.load(weights_only=True)`` only, never a full unpickle.

timm, huggingface_hub and transformers are optional (``pip install
napari-lnmeta[foundation]``); without them torchvision weights still work and timm / Hub
names give a one-line error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

#: ImageNet statistics (kept here too so this module imports nothing heavy)
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass(frozen=True)
class Known:
    """A backbone users ask for by a short name."""

    name: str
    id: str                    # what resolve() gets
    loader: str                # "timm", "torchvision", "transformers" or "conch" (listed only)
    licence: str
    gated: bool
    mpp: float | None          # µm/px the model was trained at (per its model card)
    params: str
    model_args: dict = field(default_factory=dict)
    note: str = ""


#: Pathology foundation models and ImageNet baselines by short name. Licence and gating
#: notes summarise each model card at the time of writing; the card is authoritative.
KNOWN: dict[str, Known] = {k.name: k for k in [
    Known("uni", "hf-hub:MahmoodLab/UNI", "timm", "CC-BY-NC-ND-4.0 (non-commercial, academic)",
          True, 0.5, "ViT-L/16, 303 M", {"init_values": 1e-5, "dynamic_img_size": True}),
    Known("uni2-h", "hf-hub:MahmoodLab/UNI2-h", "timm",
          "CC-BY-NC-ND-4.0 (non-commercial, academic)", True, 0.5, "ViT-H/14, 681 M",
          {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
           "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
           "no_embed_class": True, "mlp_layer": "swiglu_packed", "act_layer": "silu",
           "reg_tokens": 8, "dynamic_img_size": True}),
    Known("conch", "hf-hub:MahmoodLab/CONCH", "conch",
          "CC-BY-NC-ND-4.0 (non-commercial, academic)", True, 0.5, "ViT-B/16 + text, 395 M",
          note="vision-language model (a CoCa with attentional pooling, 448 px) built only by "
               "MahmoodLab's 'conch' package, which is not on PyPI (pip install "
               "git+https://github.com/Mahmoodlab/CONCH.git); its Hub repository holds a "
               "pytorch_model.bin without a timm or open_clip config, so neither timm nor "
               "open_clip_torch can build it and lnmeta does not load it"),
    Known("phikon", "hf-hub:owkin/phikon", "transformers", "Owkin non-commercial licence",
          False, 0.5, "ViT-B/16, 86 M",
          note="Hugging Face transformers ViTModel; feature extraction only (class token of "
               "last_hidden_state), not an --init"),
    Known("phikon-v2", "hf-hub:owkin/phikon-v2", "transformers",
          "Owkin non-commercial licence", False, 0.5, "ViT-L/16, 303 M",
          note="Hugging Face transformers Dinov2Model; feature extraction only (class token "
               "of last_hidden_state), not an --init"),
    Known("h-optimus-0", "hf-hub:bioptimus/H-optimus-0", "timm", "Apache-2.0", False, 0.5,
          "ViT-g/14, 1.1 B", {"init_values": 1e-5, "dynamic_img_size": False}),
    Known("h-optimus-1", "hf-hub:bioptimus/H-optimus-1", "timm",
          "academic research use (check the model card)", True, 0.5, "ViT-g/14, 1.1 B",
          {"init_values": 1e-5, "dynamic_img_size": False}),
    Known("virchow2", "hf-hub:paige-ai/Virchow2", "timm",
          "CC-BY-NC-ND-4.0 (non-commercial)", True, 0.5, "ViT-H/14, 632 M",
          {"mlp_layer": "swiglu_packed", "act_layer": "silu"},
          note="trained at 5x-40x; the model card's embedding is the class token "
               "concatenated with the mean patch token, here the class token (timm's pooled "
               "output) is used"),
    Known("prov-gigapath", "hf-hub:prov-gigapath/prov-gigapath", "timm",
          "Apache-2.0 with gated access (accept the terms on the Hub)", True, 0.5,
          "ViT-g/14, 1.1 B (tile encoder)"),
    Known("imagenet-resnet50", "torchvision:resnet50.IMAGENET1K_V2", "torchvision",
          "BSD-3-Clause (torchvision); ImageNet terms for the weights", False, None,
          "ResNet-50, 25.6 M"),
    Known("imagenet-resnet18", "torchvision:resnet18.IMAGENET1K_V1", "torchvision",
          "BSD-3-Clause (torchvision); ImageNet terms for the weights", False, None,
          "ResNet-18, 11.7 M"),
    Known("imagenet-vgg16_bn", "torchvision:vgg16_bn.IMAGENET1K_V1", "torchvision",
          "BSD-3-Clause (torchvision); ImageNet terms for the weights", False, None,
          "VGG16-BN, 138 M"),
    Known("imagenet-vgg13_bn", "torchvision:vgg13_bn.IMAGENET1K_V1", "torchvision",
          "BSD-3-Clause (torchvision); ImageNet terms for the weights", False, None,
          "VGG13-BN, 133 M"),
    Known("imagenet-vit_b16", "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm",
          "Apache-2.0 (timm)", False, None, "ViT-B/16, 86 M"),
]}

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: loaders of :data:`KNOWN` entries this module loads
_LOADABLE = ("timm", "torchvision", "transformers")


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------
def torch_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's own rule, read at call time)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read at call time, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def _require(module: str, spec: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelError(spec, f"needs the optional package '{module}'; install it with "
                         "pip install 'napari-lnmeta[foundation]'") from None


# --------------------------------------------------------------------------------------
# Resolved sources
# --------------------------------------------------------------------------------------
@dataclass
class Source:
    """A resolved pretrained backbone: how to build it, where its weights are.

    Attributes
    ----------
    spec
        What the user gave.
    id
        Canonical id (``torchvision:resnet50.IMAGENET1K_V2``, ``hf-hub:org/name``,
        ``local:/abs/folder``); stored as provenance.
    architecture
        Registry architecture string (``resnet50``, ``timm:vit_base_patch16_224``,
        ``timm:vit_large_patch16_224{"init_values": 1e-05}``); it alone rebuilds the net.
    weights_file
        The checkpoint in the cache or folder.
    mean, std, input_size, mpp
        The model's own preprocessing: normalisation, input side in px and the µm/px it
        was trained at (``None``: not a pathology model / unknown).
    """

    spec: str
    id: str
    architecture: str
    weights_file: Path
    mean: list[float] = field(default_factory=lambda: list(_IMAGENET[0]))
    std: list[float] = field(default_factory=lambda: list(_IMAGENET[1]))
    input_size: int = 224
    mpp: float | None = None
    licence: str | None = None
    #: the transformers ``config.json`` (``architecture`` ``transformers:<model type>``)
    config_file: Path | None = None

    @property
    def is_transformers(self) -> bool:
        """A transformers encoder: a feature extractor (:mod:`._hf`), not a registry net."""
        return self.architecture.startswith("transformers:")

    def weights_sha256(self) -> str:
        from .extractor import file_digest

        return file_digest(self.weights_file, 64)

    def provenance(self) -> dict[str, Any]:
        """``{"id", "weights_sha256", "architecture", "file"}`` for outputs and summaries."""
        return {"id": self.id, "weights_sha256": self.weights_sha256(),
                "architecture": self.architecture, "file": str(self.weights_file)}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's tensors (CPU): safetensors, or ``torch.load(weights_only=True)``."""
        import torch

        p = self.weights_file
        if p.suffix == ".safetensors":
            from .io import read_safetensors

            tensors, _ = read_safetensors(p)
            return tensors
        if self.id.startswith("torchvision:"):
            weights = _tv_weights(self.id[len("torchvision:"):], self.spec)
            # torchvision's weights API; the file is in the cache, so nothing downloads
            try:
                sd = weights.get_state_dict(progress=False, weights_only=True,
                                            model_dir=str(p.parent))
            except Exception as e:  # unsafe pickle / corrupt zip: refuse, never unpickle
                raise ModelError(p, "cannot load this checkpoint with weights_only=True "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                                 ) from e
        else:
            try:
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # an unsafe or corrupt pickle: refuse, never unpickle fully
                raise ModelError(p, "cannot load this checkpoint with weights_only=True "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                                 ) from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ModelError(p, "the checkpoint is not a state dict")
        return sd


def is_named(spec: str | Path | None) -> bool:
    """True when ``spec`` names a pretrained source this module resolves (not a
    ``.safetensors`` file and not a registry architecture)."""
    if spec is None:
        return False
    s = str(spec)
    if s.endswith(".safetensors"):
        return False
    return (s == "imagenet" or s.split(":", 1)[0] in ("torchvision", "timm", "hf-hub", "hf_hub")
            or s.lower() in KNOWN or Path(s).is_dir())


def _tv_weights(text: str, spec: str):
    """torchvision weights enum member of ``ARCH[.WEIGHTS]``."""
    import torchvision.models as tvm

    arch, _, wname = text.partition(".")
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ModelError(spec, f"torchvision has no pretrained weights for {arch!r}") from None
    wname = wname or "DEFAULT"
    try:
        return enum[wname] if wname != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ModelError(spec, f"unknown weights {wname!r} for {arch}; choose one of "
                         + ", ".join(m.name for m in enum)) from None


def _torchvision_source(spec: str, text: str, *, download: bool) -> Source:
    from urllib.parse import urlparse

    from .registry import get_arch

    arch = text.partition(".")[0]
    get_arch(arch)  # our registry must know the architecture
    w = _tv_weights(text, spec)
    fname = os.path.basename(urlparse(w.url).path)
    path = torch_checkpoints_dir() / fname
    tid = f"torchvision:{arch}.{w.name}"
    if not path.is_file():
        if not download:
            raise ModelError(spec, f"{tid} is not in the torch cache: run `lnmeta models pull "
                             f"{tid}` where there is internet, or download {w.url} and put it "
                             f"at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            w.get_state_dict(progress=True, weights_only=True, model_dir=str(path.parent))
        except Exception as e:  # network errors come in many types
            raise ModelError(spec, f"could not download {w.url} ({type(e).__name__}: {e})"
                             ) from e
    tr = w.transforms()
    return Source(spec=spec, id=tid, architecture=arch, weights_file=path,
                  mean=[float(v) for v in tr.mean], std=[float(v) for v in tr.std],
                  input_size=int(tr.crop_size[0]), mpp=None,
                  licence="BSD-3-Clause (torchvision); ImageNet terms for the weights")


def _hf_file(repo: str, filename: str, revision: str | None, spec: str, *,
             download: bool) -> Path | None:
    """A file of a Hub repository from the cache (or fetched when ``download``)."""
    hub = _require("huggingface_hub", spec)
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hub.hf_hub_download(repo, filename, revision=revision,
                                        cache_dir=str(hf_cache_dir()),
                                        local_files_only=not download))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError:
        if download:
            raise ModelError(spec, f"could not download {filename} of {repo} (no network?)"
                             ) from None
        return None
    except GatedRepoError:
        raise ModelError(spec, f"{repo} is gated: accept its terms at https://huggingface.co/"
                         f"{repo} and log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(spec, f"no Hub repository {repo} (or it is gated/private and you "
                         "are not logged in: `hf auth login` or HF_TOKEN)") from None
    except OSError as e:
        raise ModelError(spec, f"could not fetch {filename} of {repo} ({e})") from e


def _timm_arch_string(name: str, model_args: dict) -> str:
    return f"timm:{name}" + (json.dumps(model_args, sort_keys=True, separators=(",", ":"))
                             if model_args else "")


def _from_config(spec: str, sid: str, cfg_path: Path, weights: Path, extra_args: dict,
                 mpp: float | None, licence: str | None) -> Source:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(cfg_path, f"not a timm config.json ({e})") from e
    pre = cfg.get("pretrained_cfg", cfg)
    arch = cfg.get("architecture") or pre.get("architecture")
    if not arch:
        raise ModelError(cfg_path, "config.json names no 'architecture' (not a timm model; "
                         "transformers and open_clip repositories are not supported)")
    args = {**cfg.get("model_args", {}), **extra_args}
    args.pop("num_classes", None)
    args.pop("pretrained", None)
    size = pre.get("input_size", [3, 224, 224])
    return Source(spec=spec, id=sid, architecture=_timm_arch_string(arch, args),
                  weights_file=weights,
                  mean=[float(v) for v in pre.get("mean", _IMAGENET[0])],
                  std=[float(v) for v in pre.get("std", _IMAGENET[1])],
                  input_size=int(size[-1]), mpp=mpp, licence=licence or pre.get("license"))


def _transformers_source(spec: str, sid: str, cfg_path: Path, pre_path: Path | None,
                         weights: Path, mpp: float | None, licence: str | None) -> Source:
    from . import _hf

    cfg = _hf.read_config(cfg_path)
    if not _hf.is_transformers_config(cfg):
        raise ModelError(cfg_path, "not the config.json of a transformers vision encoder "
                         f"(model_type one of {', '.join(_hf.MODEL_TYPES)}; got "
                         f"{cfg.get('model_type')!r})")
    if pre_path is None:
        raise ModelError(cfg_path.parent / "preprocessor_config.json",
                         "missing: a transformers model needs its preprocessor_config.json "
                         "(input size, mean/std) beside config.json")
    mean, std, size = _hf.preprocessing(pre_path)
    return Source(spec=spec, id=sid, architecture=f"transformers:{cfg['model_type']}",
                  weights_file=weights, mean=mean, std=std, input_size=size, mpp=mpp,
                  licence=licence, config_file=cfg_path)


def _hub_source(spec: str, repo: str, *, extra_args: dict | None = None,
                mpp: float | None = None, licence: str | None = None,
                download: bool = False, timm_name: str | None = None,
                transformers: bool = False) -> Source:
    repo, _, rev = repo.partition("@")
    rev = rev or None
    sid = f"hf-hub:{repo}" + (f"@{rev}" if rev else "")
    weights = None
    for fname in _WEIGHT_FILES:
        weights = _hf_file(repo, fname, rev, spec, download=download)
        if weights is not None:
            break
    cfg = _hf_file(repo, "config.json", rev, spec, download=download) if timm_name is None \
        else None
    pre = None
    if cfg is not None and (transformers or _is_transformers(cfg)):
        pre = _hf_file(repo, "preprocessor_config.json", rev, spec, download=download)
        transformers = True
    if weights is None or (timm_name is None and cfg is None) or (transformers and pre is None):
        where = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
        files = ("config.json, preprocessor_config.json and model.safetensors" if transformers
                 else "config.json and model.safetensors")
        raise ModelError(spec, f"{sid} is not in the Hugging Face cache: run `lnmeta models "
                         f"pull {spec}` where there is internet (gated models need "
                         f"HF_TOKEN), or fetch {files} of "
                         f"https://huggingface.co/{repo} into {where}/snapshots/<revision>/ "
                         "(with refs/main), or into a folder and pass the folder")
    if transformers:
        return _transformers_source(spec, sid, cfg, pre, weights, mpp, licence)
    if timm_name is not None:
        timm = _require("timm", spec)
        pc = timm.models.get_pretrained_cfg(timm_name)
        base = timm_name.partition(".")[0]
        pre = pc.to_dict() if pc is not None else {}
        return Source(spec=spec, id=f"timm:{timm_name}", architecture=f"timm:{base}",
                      weights_file=weights,
                      mean=[float(v) for v in pre.get("mean", _IMAGENET[0])],
                      std=[float(v) for v in pre.get("std", _IMAGENET[1])],
                      input_size=int(pre.get("input_size", (3, 224, 224))[-1]),
                      mpp=mpp, licence=pre.get("license") or licence)
    return _from_config(spec, sid, cfg, weights, extra_args or {}, mpp, licence)


def _is_transformers(cfg_path: Path) -> bool:
    from . import _hf

    return _hf.is_transformers_config(_hf.read_config(cfg_path))


def _timm_source(spec: str, name: str, *, download: bool) -> Source:
    timm = _require("timm", spec)
    pc = timm.models.get_pretrained_cfg(name)
    if pc is None:
        base = name.partition(".")[0]
        if not timm.is_model(base):
            raise ModelError(spec, f"timm has no model {base!r}")
        raise ModelError(spec, f"timm has no pretrained weights {name!r}; name a tag, e.g. "
                         + ", ".join(timm.list_pretrained(base + "*")[:3]))
    hub_id = pc.hf_hub_id
    if not hub_id:
        raise ModelError(spec, f"the weights of {name} are not hosted on the Hugging Face "
                         "Hub; fetch them into a folder and pass the folder")
    if pc.tag and not name.partition(".")[2]:
        name = f"{name}.{pc.tag}"
    return _hub_source(spec, hub_id, download=download, timm_name=name)


def _folder_source(spec: str, folder: Path) -> Source:
    weights = next((folder / f for f in _WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise ModelError(folder, "no model.safetensors (or pytorch_model.bin) in this folder; "
                         "it needs the layout of a Hub repository: config.json + "
                         "model.safetensors")
    if not (folder / "config.json").is_file():
        raise ModelError(folder, "no config.json in this folder (timm layout: config.json + "
                         "model.safetensors)")
    if _is_transformers(folder / "config.json"):
        pre = folder / "preprocessor_config.json"
        return _transformers_source(spec, f"local:{folder.resolve()}", folder / "config.json",
                                    pre if pre.is_file() else None, weights, None, None)
    return _from_config(spec, f"local:{folder.resolve()}", folder / "config.json", weights,
                        {}, None, None)


def resolve(spec: str | Path, architecture: str | None = None, *,
            download: bool = False) -> Source:
    """Resolve a backbone name (module docstring) to a :class:`Source` in the local caches.

    Parameters
    ----------
    spec
        The name.
    architecture
        The registry architecture ``imagenet`` refers to.
    download
        Fetch what is missing (only :func:`pull` sets it).

    Raises
    ------
    ModelError
        Unknown name, weights not cached (naming the file to fetch and where to put it),
        a missing optional package, a gated repository without access.
    """
    s = str(spec)
    known = KNOWN.get(s.lower())
    if known is not None:
        if known.loader not in _LOADABLE:
            raise ModelError(s, f"{known.id} is listed but cannot be loaded here: {known.note}")
        if known.loader == "torchvision":
            return _torchvision_source(s, known.id.partition(":")[2], download=download)
        if known.loader == "transformers":
            return _hub_source(s, known.id.partition(":")[2], mpp=known.mpp,
                               licence=known.licence, download=download, transformers=True)
        if known.id.startswith("timm:"):
            src = _timm_source(s, known.id.partition(":")[2], download=download)
        else:
            src = _hub_source(s, known.id.partition(":")[2], extra_args=known.model_args,
                              mpp=known.mpp, licence=known.licence, download=download)
        return src
    if s == "imagenet":
        if not architecture:
            raise ModelError(s, "'imagenet' needs an architecture (--arch)")
        if architecture.startswith("timm:"):
            return _timm_source(s, architecture.partition(":")[2].split("{")[0],
                                download=download)
        return _torchvision_source(s, architecture, download=download)
    scheme, _, rest = s.partition(":")
    if scheme == "torchvision":
        return _torchvision_source(s, rest, download=download)
    if scheme == "timm":
        return _timm_source(s, rest, download=download)
    if scheme in ("hf-hub", "hf_hub"):
        for k in KNOWN.values():  # a known repo: add the model card's constructor arguments
            if k.id == f"hf-hub:{rest.partition('@')[0]}":
                if k.loader not in _LOADABLE:
                    raise ModelError(s, f"cannot be loaded here: {k.note}")
                return _hub_source(s, rest, extra_args=k.model_args, mpp=k.mpp,
                                   licence=k.licence, download=download,
                                   transformers=k.loader == "transformers")
        return _hub_source(s, rest, download=download)
    if Path(s).is_dir():
        return _folder_source(s, Path(s))
    raise ModelError(s, "unknown backbone name; use imagenet, torchvision:ARCH[.WEIGHTS], "
                     "timm:MODEL, hf-hub:ORG/NAME, a known name (" + ", ".join(KNOWN)
                     + "), a folder or a .safetensors file")


def pull(spec: str, architecture: str | None = None) -> Source:
    """Fetch a named backbone into the local cache (the only place that downloads)."""
    return resolve(spec, architecture, download=True)


def cached_sources() -> list[dict[str, Any]]:
    """Every :data:`KNOWN` backbone with whether it is cached, its size and licence."""
    rows = []
    for k in KNOWN.values():
        row = {"name": k.name, "id": k.id, "loader": k.loader,
               "loadable": k.loader in _LOADABLE,
               "use": ("features" if k.loader == "transformers" else
                       "init+features" if k.loader in _LOADABLE else None),
               "licence": k.licence,
               "gated": k.gated, "mpp": k.mpp, "params": k.params, "cached": False,
               "size_mb": None, "note": k.note}
        if k.loader in _LOADABLE:
            try:
                src = resolve(k.name)
                row.update(cached=True,
                           size_mb=round(src.weights_file.stat().st_size / 2**20, 1),
                           file=str(src.weights_file))
            except ModelError:
                pass
        rows.append(row)
    return rows


def architecture_for(init: str | Path | None, architecture: str) -> str:
    """The architecture a model must have to start from ``init`` (timm names decide it)."""
    if not is_named(init):
        return architecture
    known = KNOWN.get(str(init).lower())
    if known is not None and known.loader == "transformers":  # before looking in the cache
        raise_not_an_init(str(init), known.id)
    src = resolve(str(init), architecture)
    if src.is_transformers:
        raise_not_an_init(str(init), src.id)
    return src.architecture


def raise_not_an_init(spec: str, sid: str) -> None:
    """A transformers encoder initialises no registry network: say what it is for."""
    raise ModelError(spec, f"{sid} is a Hugging Face transformers encoder: use it as a "
                     "feature extractor (extract-features --backbone), not as --init of a "
                     "patch classifier")


__all__ = ["KNOWN", "Known", "Source", "architecture_for", "cached_sources", "hf_cache_dir",
           "is_named", "pull", "resolve", "torch_checkpoints_dir"]
