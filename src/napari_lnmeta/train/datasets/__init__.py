"""Labelled patch sets from slides + label masks, read on the fly (no PNG export).

A :class:`PatchSet` is small: for each patch, which slide it comes from, the level-0
``(row, col)`` of its top-left corner, its class and its tumour fraction; plus, per
slide, the path and how to read it (patch size and µm/px or level). Pixels are read
from the slides when a batch is needed (:meth:`PatchSet.read`), through
:meth:`~napari_lnmeta.io.slide.Slide.read_region`, or from an optional zarr cache
(:func:`cache_patches_job`) or an in-memory copy (:meth:`PatchSet.load_pixels`).

Labelling follows seed 000: a patch is **positive** when more than ``positive_min``
(20 %) of it is tumour, **negative** when at most ``negative_max`` (0 %) is, and is left
out otherwise; negatives are subsampled to balance the classes. Fibrosis can count as
tumour (seed 000's "Tumor + FIB"). With several tumour classes (seed 001: negative /
breast metastasis / lymphoma) a patch takes the class that covers the largest share of
it, when that share is above ``positive_min``.

Splits are by slide (:func:`split_by_slide`) or by region of a slide
(:func:`split_by_region`), never by patch: overlapping patches of one region must not
end up on both sides.

One subject per module: :mod:`.patchset` (:class:`PatchSet`, :class:`SlideEntry`),
:mod:`.building` (:class:`PatchConfig`, labelling, the building jobs), :mod:`.splits`
(splits and mixing) and :mod:`.batches` (epoch order, :class:`BatchLoader`, the patch
cache, :class:`TorchPatchDataset`). Import from the package.
"""

from .batches import (
    BatchLoader,
    TorchPatchDataset,
    cache_patches_job,
    epoch_indices,
)
from .building import (
    FIBROSIS_NAMES,
    PatchConfig,
    build_patchset,
    build_patchset_job,
    check_class_counts,
    class_values,
    fractions_of,
    patches_from_slide_job,
)
from .patchset import (
    PATCHSET_FORMAT,
    PATCHSET_VERSION,
    PatchSet,
    SlideEntry,
)
from .splits import (
    mix,
    region_masks,
    split_by_region,
    split_by_slide,
)

__all__ = [
    "FIBROSIS_NAMES",
    "PATCHSET_FORMAT",
    "PATCHSET_VERSION",
    "BatchLoader",
    "PatchConfig",
    "PatchSet",
    "SlideEntry",
    "TorchPatchDataset",
    "build_patchset",
    "build_patchset_job",
    "cache_patches_job",
    "check_class_counts",
    "class_values",
    "epoch_indices",
    "fractions_of",
    "mix",
    "patches_from_slide_job",
    "region_masks",
    "split_by_region",
    "split_by_slide",
]
