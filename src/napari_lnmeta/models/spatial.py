"""Spatial context model (seed 004): a grid of neighbouring patches, a shared CNN, an LSTM.

For each patch (the *centre*) the model sees its ``k x k`` neighbourhood of patches
(``k`` odd, default 3) as one ``(k·p) x (k·p)`` window, ``p`` being the patch size:

1. the window is cut into its ``k²`` cells, and one shared CNN (any registry backbone,
   e.g. ``lnmeta_cnn_small`` or ``resnet34`` as in seed 004) encodes each cell as its
   penultimate-layer vector ``z`` (seed 004 eq. 1);
2. the grid of vectors is turned into a sequence in raster order (row by row, left to
   right: seed 004, "the grid of patch representations is transformed into a sequence
   as the input of LSTM") and an LSTM runs over it (eq. 2);
3. a linear layer on each LSTM output gives the logits of every cell, so the network
   predicts all ``k²`` patches (:meth:`SpatialContextModel.forward_grid`, used in
   training); :meth:`SpatialContextModel.forward` returns the centre cell's logits only,
   which is what the whole-slide inference engine uses.

A unidirectional LSTM (the seed's eq. 2) lets the centre see the cells before it in
raster order only; ``bidirectional=True`` lets every cell see the whole window (our
option, not in the seed).

The spatial-consistency loss (seed 004 eqs. 3–5), with ``φ`` the predicted tumour
probability, ``*`` the centre and ``n`` its ``N = k² − 1`` neighbours::

    L_same = (φ(x*) − φ(xⁿ))²
    L_dif  = (1 − φ(xⁿ))(1 − φ(x*)) + φ(xⁿ) φ(x*)
    L_spatial = 1/N Σₙ [(1 − |y* − yⁿ|) L_same + |y* − yⁿ| L_dif]

is :func:`spatial_loss`; the training objective (eq. 6) is ``L_CE + β L_spatial``
(:func:`spatial_objective`), averaged over the batch.

Model files are ordinary lnmeta safetensors files (:mod:`napari_lnmeta.models.io`):
``architecture`` is ``"spatial:<backbone>"``, ``patch_size`` and ``mpp`` are those of one
cell, and ``extra["spatial"]`` holds :class:`SpatialConfig` (``k``, LSTM size...). So
:func:`~napari_lnmeta.models.io.load_model` rebuilds the network, and the inference
engine, seeing ``k > 1`` (:func:`context_size`), reads the ``(k·p) x (k·p)`` window centred
on each patch of its grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelError
from .io import ModelMeta, load_model, read_meta, save_model
from .registry import FROZEN_ATTR, build_model, get_arch

#: prefix of the ``architecture`` of a spatial-context model file
SPATIAL_PREFIX = "spatial:"


@dataclass
class SpatialConfig:
    """Architecture of a :class:`SpatialContextModel` (stored in the model file).

    Parameters
    ----------
    backbone
        Registry architecture of the shared patch CNN (seed 004: ``resnet34``).
    k
        Side of the neighbourhood in patches (odd; 3 = the patch and its 8 neighbours).
    hidden
        LSTM hidden size.
    layers
        Stacked LSTM layers.
    bidirectional
        Run the LSTM both ways over the raster sequence (not in seed 004).
    dropout
        Dropout on the CNN features before the LSTM (and between LSTM layers).
    """

    backbone: str = "lnmeta_cnn_small"
    k: int = 3
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        get_arch(self.backbone)  # ModelError for an unknown name
        if int(self.k) < 1 or int(self.k) % 2 == 0:
            raise InputError(f"the neighbourhood side k must be odd and >= 1 (3 = a patch and "
                             f"its 8 neighbours), got {self.k}")
        if int(self.hidden) < 1 or int(self.layers) < 1:
            raise InputError(f"LSTM hidden size and layers must be >= 1, got {self.hidden}, "
                             f"{self.layers}")
        if not 0 <= float(self.dropout) < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        self.k, self.hidden, self.layers = int(self.k), int(self.hidden), int(self.layers)
        self.bidirectional = bool(self.bidirectional)
        self.dropout = float(self.dropout)

    @property
    def cells(self) -> int:
        return self.k * self.k

    @property
    def centre(self) -> int:
        """Index of the centre cell in the raster sequence."""
        return self.cells // 2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpatialConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def raster_order(k: int) -> np.ndarray:
    """``(k², 2)`` grid ``(row, col)`` of each LSTM step: row by row, left to right."""
    r, c = np.divmod(np.arange(k * k), k)
    return np.stack([r, c], axis=1)


def window_offset(size0: float, k: int) -> int:
    """Level-0 pixels from a window's top-left corner to its centre patch's corner.

    ``⌊(k div 2) · size0⌋`` for patches of ``size0`` level-0 px. Training windows
    (:mod:`napari_lnmeta.train.spatial`) and the inference engine
    (:func:`napari_lnmeta.core.inference.context_grid`) both use it, so they read
    identical windows.
    """
    return int(math.floor((int(k) // 2) * float(size0)))


def neighbour_offsets(k: int) -> np.ndarray:
    """``(k², 2)`` cell offsets from the centre, in raster order (``(-1, -1)`` first for k=3)."""
    return raster_order(k) - k // 2


class SpatialContextModel(nn.Module):
    """Shared CNN over the ``k x k`` cells of a window -> LSTM in raster order -> per-cell logits.

    Parameters
    ----------
    config
        Backbone, ``k`` and LSTM size.
    num_outputs
        Logits per cell (2 for a softmax normal/tumour head, 1 for a sigmoid head).
    patch_size
        Side of one cell in pixels; inputs are ``(B, 3, k·p, k·p)``.
    init, freeze
        Initial weights of the backbone (a safetensors file: a torchvision state dict, a
        trained lnmeta patch model or another spatial model) and frozen early stages, as
        in :func:`~napari_lnmeta.models.registry.build_model`.
    """

    def __init__(self, config: SpatialConfig, num_outputs: int, *, patch_size: int,
                 init: str | Path | None = None, freeze: int = 0):
        super().__init__()
        from .extractor import feature_dim_of, strip_head

        self.config = config
        self.k = config.k
        self.patch_size = int(patch_size)
        arch = get_arch(config.backbone)
        if self.patch_size < arch.min_size:
            raise ModelError(config.backbone, f"cells of {self.patch_size} px are too small "
                             f"for {config.backbone} (at least {arch.min_size} px)")
        bb = build_model(config.backbone, 1, init=init, freeze=freeze)
        self.feature_dim = feature_dim_of(bb, config.backbone)
        strip_head(bb, config.backbone)
        self.backbone = bb
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(self.feature_dim, config.hidden, num_layers=config.layers,
                            batch_first=True, bidirectional=config.bidirectional,
                            dropout=config.dropout if config.layers > 1 else 0.0)
        self.head = nn.Linear(config.hidden * (2 if config.bidirectional else 1),
                              int(num_outputs))
        # frozen backbone stages stay in eval mode under registry.set_train_mode(self)
        object.__setattr__(self, FROZEN_ATTR, list(getattr(bb, FROZEN_ATTR, [])))

    @property
    def window(self) -> int:
        """Input side in pixels (``k · patch_size``)."""
        return self.k * self.patch_size

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, k·p, k·p)`` windows -> ``(B·k², 3, p, p)`` cells in raster order."""
        b, c, h, w = x.shape
        k, p = self.k, self.patch_size
        if h != k * p or w != k * p:
            raise ModelError(f"spatial:{self.config.backbone}",
                             f"expects {k}x{k} neighbourhoods of {p} px patches, i.e. "
                             f"{k * p}x{k * p} px windows, got {h}x{w} px inputs")
        x = x.reshape(b, c, k, p, k, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b * k * k, c, p, p)

    def forward_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every cell: ``(B, k², num_outputs)`` in raster order."""
        b = x.shape[0]
        z = self.backbone(self.cells(x)).reshape(b, self.k * self.k, self.feature_dim)
        h, _ = self.lstm(self.drop(z))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the centre cell, ``(B, num_outputs)`` (what inference uses)."""
        return self.forward_grid(x)[:, self.config.centre]


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def tumour_probability(logits: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """φ: the tumour (positive, last class) probability of binary logits ``(..., C)``."""
    if head == "softmax":
        if logits.shape[-1] != 2:
            raise InputError(f"the spatial loss needs 2 classes, got {logits.shape[-1]} logits")
        return torch.softmax(logits.float(), dim=-1)[..., 1]
    if logits.shape[-1] != 1:
        raise InputError(f"a binary sigmoid head has 1 logit, got {logits.shape[-1]}")
    return torch.sigmoid(logits.float()[..., 0])


def spatial_loss(probs: torch.Tensor, labels: torch.Tensor, *, centre: int | None = None,
                 ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """Seed 004's spatial-consistency loss (eqs. 3–5) of a batch of neighbourhoods.

    Parameters
    ----------
    probs
        ``(B, K)`` or ``(B, k, k)`` tumour probability φ of every cell.
    labels
        Same shape: 1 tumour, 0 normal, ``ignore_index`` for cells without a label
        (left out of the mean).
    centre
        Index of the centre cell in the flattened ``K`` cells (default ``K // 2``).
    reduction
        ``"mean"`` over the neighbourhoods that have at least one usable pair, or
        ``"none"`` for the per-neighbourhood values (0 where there is none).

    Returns
    -------
    torch.Tensor
        ``mean_n [(1 − |y* − yⁿ|)(φ* − φⁿ)² + |y* − yⁿ|((1 − φⁿ)(1 − φ*) + φⁿ φ*)]`` over
        the neighbours ``n`` of the centre ``*``.
    """
    b = probs.shape[0]
    p = probs.reshape(b, -1)
    if not p.is_floating_point():
        p = p.float()
    y = labels.reshape(b, -1)
    if y.shape != p.shape:
        raise InputError(f"probabilities {tuple(probs.shape)} and labels {tuple(labels.shape)} "
                         "differ in shape")
    n_cells = p.shape[1]
    c = n_cells // 2 if centre is None else int(centre)
    nb = [i for i in range(n_cells) if i != c]
    if not nb:
        zero = p.sum() * 0.0
        return zero if reduction == "mean" else p[:, 0] * 0.0
    pc, pn = p[:, c:c + 1], p[:, nb]
    yc, yn = y[:, c:c + 1], y[:, nb]
    valid = (yc != ignore_index) & (yn != ignore_index)
    d = (yc.float() - yn.float()).abs() * valid
    same = (pc - pn) ** 2
    dif = (1 - pn) * (1 - pc) + pn * pc
    term = ((1 - d) * same + d * dif) * valid
    count = valid.sum(dim=1)
    per = term.sum(dim=1) / count.clamp_min(1)
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    has = count > 0
    return per[has].mean() if bool(has.any()) else p.sum() * 0.0


def spatial_objective(logits: torch.Tensor, labels: torch.Tensor, *, beta: float = 1.0,
                      head: str = "softmax", ce_cells: str = "all",
                      ignore_index: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_CE + β L_spatial`` for per-cell logits ``(B, K, C)`` and labels ``(B, K)``.

    ``ce_cells="all"`` averages the cross-entropy over every labelled cell of the
    neighbourhoods (the network predicts each of them); ``"centre"`` over the centre
    cells only. Returns ``(total, ce, spatial)``.
    """
    if ce_cells not in ("all", "centre"):
        raise InputError(f"ce_cells must be 'all' or 'centre', got {ce_cells!r}")
    b, n_cells = logits.shape[0], logits.shape[1]
    y = labels.reshape(b, n_cells).long()
    c = n_cells // 2
    lg, yy = (logits, y) if ce_cells == "all" else (logits[:, c:c + 1], y[:, c:c + 1])
    flat, ty = lg.reshape(-1, lg.shape[-1]).float(), yy.reshape(-1)
    keep = ty != ignore_index
    if not bool(keep.any()):
        ce = flat.sum() * 0.0
    elif head == "softmax":
        ce = nn.functional.cross_entropy(flat[keep], ty[keep])
    else:
        ce = nn.functional.binary_cross_entropy_with_logits(flat[keep][:, 0], ty[keep].float())
    if beta:
        sp = spatial_loss(tumour_probability(logits, head), y, centre=c,
                          ignore_index=ignore_index)
    else:
        sp = ce.detach() * 0.0
    return ce + float(beta) * sp, ce, sp


# --------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------
def is_spatial(meta: ModelMeta) -> bool:
    return meta.architecture.startswith(SPATIAL_PREFIX)


def context_size(meta: ModelMeta) -> int:
    """``k`` of a spatial model (it reads ``k x k`` patches around each one), else 1."""
    if not is_spatial(meta):
        return 1
    sp = (meta.extra or {}).get("spatial") or {}
    return int(sp.get("k", 1))


def spatial_meta(config: SpatialConfig, *, classes: list[str], patch_size: int,
                 mpp: float | None, mean: list[float], std: list[float],
                 head: str = "softmax", normalisation: dict | None = None,
                 extra: dict | None = None) -> ModelMeta:
    """The :class:`ModelMeta` of a spatial model (``patch_size``/``mpp`` of one cell)."""
    return ModelMeta(architecture=SPATIAL_PREFIX + config.backbone, classes=list(classes),
                     patch_size=int(patch_size), mpp=mpp, normalisation=normalisation,
                     mean=list(mean), std=list(std), head=head,
                     extra={**(extra or {}), "spatial": config.to_json()})


def build_from_meta(meta: ModelMeta, *, path: str | Path = "model") -> SpatialContextModel:
    """The (untrained) network a spatial model file describes; ModelError when it cannot."""
    if not is_spatial(meta):
        raise ModelError(path, f"is a {meta.architecture} patch classifier, not a spatial-context "
                         "model (train one with lnmeta train-spatial)")
    sp = (meta.extra or {}).get("spatial")
    if not isinstance(sp, dict) or "k" not in sp:
        raise ModelError(path, "spatial-context model file without its 'spatial' settings "
                         "(neighbourhood size k, backbone, LSTM size) in the metadata")
    try:
        cfg = SpatialConfig.from_json(sp)
    except (InputError, TypeError, ValueError) as e:
        raise ModelError(path, f"bad spatial settings in the metadata ({e})") from e
    want = meta.architecture[len(SPATIAL_PREFIX):]
    if cfg.backbone != want:
        raise ModelError(path, f"architecture says backbone {want!r} but the spatial settings "
                         f"say {cfg.backbone!r}")
    return SpatialContextModel(cfg, meta.num_outputs, patch_size=meta.patch_size)


def save_spatial_model(path: str | Path, model: SpatialContextModel, meta: ModelMeta, *,
                       overwrite: bool = False, dtype: str | None = None) -> Path:
    """:func:`~napari_lnmeta.models.io.save_model` after checking model and metadata agree."""
    if not is_spatial(meta) or context_size(meta) != model.k \
            or meta.patch_size != model.patch_size:
        raise ModelError(path, f"metadata ({meta.architecture}, k={context_size(meta)}, "
                         f"{meta.patch_size} px) does not describe this spatial model "
                         f"(k={model.k}, {model.patch_size} px)")
    return save_model(path, model, meta, overwrite=overwrite, dtype=dtype)


def load_spatial_model(path: str | Path, *, device: str | torch.device = "cpu"
                       ) -> tuple[SpatialContextModel, ModelMeta]:
    """Load a spatial model file; a plain patch classifier or MIL file is refused by name."""
    meta = read_meta(path)
    if not is_spatial(meta):
        what = "MIL model" if meta.architecture.startswith("mil:") else \
            f"{meta.architecture} patch classifier"
        raise ModelError(path, f"is a {what}, not a spatial-context model (train one with "
                         "lnmeta train-spatial)")
    model, meta = load_model(path, device=device)
    return model, meta  # type: ignore[return-value]


__all__ = ["SPATIAL_PREFIX", "SpatialConfig", "SpatialContextModel", "build_from_meta",
           "context_size", "is_spatial", "load_spatial_model", "neighbour_offsets",
           "raster_order", "save_spatial_model", "spatial_loss", "spatial_meta",
           "spatial_objective", "tumour_probability", "window_offset"]
