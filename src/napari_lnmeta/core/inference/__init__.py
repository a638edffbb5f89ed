"""Whole-slide patch inference: tissue-only grid -> parallel reads -> model -> heatmap grid.

The pipeline (one generator, the same in the CLI, the widget and the tests)::

    tissue mask (low resolution)  ->  PatchGrid over tissue only
      -> thread pool reading batches of patches ahead of the model (prefetch queue;
         page-locked buffers and non-blocking copies on CUDA)
      -> on the device: uint8 -> float, stain normalisation (when the model asks),
         mean/std, channels-last, AMP on CUDA, optional 8-direction TTA (seed 004)
      -> tumour probability per patch, written into a heatmap grid with one cell per
         stride (PatchGrid.frame(): cells centred on their patch, level-0 aligned).

Memory is bounded by the batch buffers and the heatmap grid (one value per stride):
nothing is ever held at slide resolution.

Resumable: with a ``checkpoint_dir``, the heatmap and a done-mask are written there as
zarr every ``checkpoint_seconds`` and when the run stops (cancel, error); a later run
with the same parameters restores them and only reads the patches left.

The batch size is chosen from free device memory (a probe forward measures the memory
per patch) and halves on out-of-memory errors; the run continues with the smaller size.

One subject per module: :mod:`.config` (parameters and results), :mod:`.loading`
(device, warm model cache, read plan), :mod:`.forward` (on-device preprocessing, TTA,
:class:`PatchModel`, batch size), :mod:`.readers` (:class:`BatchReader`,
:class:`DeviceTileReader`), :mod:`.checkpoint` and :mod:`.engine`
(:func:`run_inference_job`). Import from the package.
"""

from .checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    run_key,
)
from .config import (
    MPP_TOLERANCE,
    InferenceConfig,
    InferenceResult,
    PartialHeatmap,
)
from .engine import (
    run_inference_job,
)
from .forward import (
    PatchModel,
    auto_batch_size,
    dihedral,
    is_oom,
    model_preprocess,
    stain_transform,
)
from .loading import (
    MODEL_CACHE_SIZE,
    clear_model_cache,
    load_inference_model,
    model_cache_stats,
    plan_read,
    tumour_index,
)
from .readers import (
    BatchReader,
    DeviceTileReader,
    context_grid,
    level_origins,
    make_reader,
    read_patches_into,
    tile_working_set,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "MODEL_CACHE_SIZE",
    "MPP_TOLERANCE",
    "BatchReader",
    "Checkpoint",
    "DeviceTileReader",
    "InferenceConfig",
    "InferenceResult",
    "PartialHeatmap",
    "PatchModel",
    "auto_batch_size",
    "clear_model_cache",
    "context_grid",
    "dihedral",
    "is_oom",
    "level_origins",
    "load_inference_model",
    "make_reader",
    "model_cache_stats",
    "plan_read",
    "read_patches_into",
    "run_inference_job",
    "run_key",
    "model_preprocess",
    "stain_transform",
    "tile_working_set",
    "tumour_index",
]
