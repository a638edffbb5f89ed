"""Patch datasets, augmentations, the training loop, evaluation and metrics.

Submodules are imported explicitly (``from napari_lnmeta.train.loop import train_job``):
``metrics`` needs only numpy/scipy; ``datasets`` reads slides; ``augment``, ``loop``,
``evaluate`` and ``pipeline`` import torch.
"""
