"""Parameters and results of whole-slide inference: :class:`InferenceConfig`,
:class:`PartialHeatmap` (what the progress reports carry) and :class:`InferenceResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:

    from ...io.frame import SlideFrame
    from ...models.io import ModelMeta
    from ..tiling import PatchGrid
    from ..tissue import TissueMask

#: relative difference between asked and trained µm/px above which a warning is recorded
MPP_TOLERANCE = 0.05


@dataclass
class InferenceConfig:
    """Everything a whole-slide inference run needs besides the slide.

    Parameters
    ----------
    model
        Path of a ``.safetensors`` model file; ``None`` uses the bundled default model.
    patch_mpp
        Read resolution of the patches in µm/px (default: the model's). Needs the
        slide's µm/px. (``mpp`` elsewhere is the slide's level-0 µm/px.)
    level
        Read this pyramid level instead of a µm/px.
    patch_size
        Patch side in read pixels (default: the model's; anything else is refused).
    stride
        Step between patches in read pixels (default: ``patch_size``); a smaller stride
        gives a finer heatmap (seed 004 uses 64).
    tta
        Average the probabilities of the 8 dihedral transforms (seed 004).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    batch_size
        Patches per forward pass; ``0`` chooses from free memory.
    amp
        Mixed precision (float16 autocast) on CUDA; ignored on CPU.
    channels_last
        Run convolutions in NHWC memory format.
    compile
        ``torch.compile`` the model (slow first batch; fixed batch shapes).
    workers
        Reader threads; ``0`` = one per CPU core (at most 16).
    decode
        Where JPEG tiles are decoded: ``"cpu"`` (the reader threads) or ``"device"``
        (whole tiles by nvJPEG on the GPU, for plain JPEG-tiled TIFF/OME-TIFF levels; see
        :class:`DeviceTileReader`). The GPU then decodes and runs the model in turn, so
        it pays only where the CPU cannot feed the GPU (few cores, a small model).
    prefetch
        Batches read ahead of the model.
    tissue_mpp, tissue_method, min_tissue
        Tissue detection resolution and method, and the tissue fraction a patch needs.
    tumour_class
        Name of the tumour class in the model's classes (default: recognised by name).
    heatmap_dtype
        Storage type of the written heatmap: ``"float16"`` or ``"uint8"``.
    lesion_threshold, lesion_radius_um, lesion_method
        Lesion candidates: ``"nms"``, non-maximum suppression with that radius (seed
        004), or ``"components"``, one per connected component above the threshold
        (the CAMELYON16 winner's rule).
    top_k
        Cells averaged for the top-k slide score.
    checkpoint_seconds
        How often progress is saved to the checkpoint folder.
    partial_seconds
        How often a copy of the filling heatmap is attached to a progress step.
    on_corrupt_tile
        What a stored tile that fails to decode or the JPEG checks does
        (:class:`~napari_lnmeta.io.slide.CorruptTileError`, docs/formats.md): ``"fail"``
        stops the run with an error naming the tile; ``"skip"`` marks the cells whose
        patches touch it as unknown (NaN in the heatmap, left out of lesions and score,
        counted in the summary). ``"skip"`` needs ``decode="cpu"``.
    """

    model: str | None = None
    patch_mpp: float | None = None
    level: int | None = None
    patch_size: int | None = None
    stride: int | None = None
    tta: bool = False
    device: str = "auto"
    batch_size: int = 0
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    workers: int = 0
    decode: str = "cpu"
    prefetch: int = 3
    tissue_mpp: float = 10.0
    tissue_method: str = "otsu"
    min_tissue: float = 0.5
    tumour_class: str | None = None
    heatmap_dtype: str = "float16"
    lesion_threshold: float = 0.5
    lesion_radius_um: float = 200.0
    lesion_method: str = "nms"
    top_k: int = 10
    checkpoint_seconds: float = 10.0
    partial_seconds: float = 1.0
    max_batch_size: int = 1024
    on_corrupt_tile: str = "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InferenceConfig:
        names = set(cls.__dataclass_fields__)
        d = dict(d)
        if "mpp" in d and "patch_mpp" not in d:  # written before the field was patch_mpp
            d["patch_mpp"] = d.pop("mpp")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class PartialHeatmap:
    """What a progress step carries while the heatmap fills in (a copy, safe to keep)."""

    probability: np.ndarray
    scored: np.ndarray
    frame: SlideFrame


@dataclass
class InferenceResult:
    """A finished (or resumed-and-finished) whole-slide run.

    Attributes
    ----------
    probability
        ``grid_shape`` float32 tumour probability; 0 where nothing was analysed.
    scored
        ``grid_shape`` bool: the cells that were analysed (tissue patches).
    frame
        Where the heatmap sits on the slide (one cell per stride, centred on its patch).
    grid, tissue
        The patch grid and tissue mask used.
    meta
        The model's metadata.
    params
        Resolved parameters (read µm/px or level, patch size, stride, TTA, tumour class...).
    timing
        Seconds per stage, patches analysed in this run, patches/s, read stall time.
    warnings
        Things the user should know (µm/px mismatch, unknown slide µm/px...).
    unknown
        ``grid_shape`` bool: cells whose patch touched a corrupt tile (``on_corrupt_tile
        ="skip"``); their probability is NaN and they are not in ``scored``.
    corrupt_tiles
        The corrupt tiles met in this run (level, tile, level-0 region, problem).
    """

    probability: np.ndarray
    scored: np.ndarray
    frame: SlideFrame
    grid: PatchGrid
    tissue: TissueMask
    meta: ModelMeta
    params: dict[str, Any]
    timing: dict[str, Any]
    device: str
    batch_size: int
    slide_path: str
    model_path: str | None
    config: InferenceConfig
    warnings: list[str] = field(default_factory=list)
    resumed: int = 0
    unknown: np.ndarray | None = None
    corrupt_tiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def size0(self) -> float:
        """Patch side in level-0 pixels."""
        return float(self.grid.size0)
