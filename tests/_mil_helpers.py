"""Shared MIL test data: real CAMELYON16 tumor_001 patches, their features and MIL bags.

The real-tissue MIL benchmark (small version; ``benchmarks/bench_mil.py`` runs the full
one). Instances are 16 x 16 px patches (124 µm) at 7.776 µm/px, stride 8, on tissue
(Otsu tissue mask); a patch is *tumour* when at least half of it lies inside the expert
polygons (``Tumor_001.json`` divided by 32), *normal* when none of it does (patches in
between are left out, seed 000's rule). Features are the penultimate layer (192-d) of
the registry's ``lnmeta_cnn_small`` **randomly initialised** (seed 0; no trained weights
exist offline), as the extractor gives them: no test-side preprocessing (the MIL model
standardises its inputs with its training slides' statistics, as it does for the CLI).

Hold-out by region: the slide is cut at level-5 row 4050, between the two tumour
polygons. Training bags use patches above it (the larger polygon), test bags below it
(the smaller polygon and the lower half of the node), so no test patch overlaps a
training patch. A bag holds 16 patches; a positive bag 1 to 6 tumour patches, a negative
bag none.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conftest import SHARED, write_pyramid_tiff

CAMELYON = SHARED / "camelyon16_tumor001_lowres"
SLIDE = CAMELYON / "tumor_001_level5.ome.tif"
POLYGONS = CAMELYON / "Tumor_001.json"
PATCH, STRIDE = 16, 8
SPLIT_ROW = 4050
BACKBONE = "lnmeta_cnn_small"

_TMP = Path(tempfile.mkdtemp(prefix="lnmeta-mil-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@dataclass
class Instances:
    grid: object           # PatchGrid of the selected patches
    features: np.ndarray   # (n, 192) raw backbone features
    tumour: np.ndarray     # (n,) bool
    train: np.ndarray      # (n,) bool: above SPLIT_ROW
    backbone: object       # BackboneInfo
    cache_path: Path


@functools.lru_cache(maxsize=2)
def camelyon_instances(n_normal: int = 1200, seed: int = 0) -> Instances:
    """All tumour patches and ``n_normal`` random normal patches of tumor_001, with features."""
    import torch

    from napari_lnmeta.core.bags import region_fraction
    from napari_lnmeta.core.features import extract_features_job
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.annotations import read_camelyon_json
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.extractor import load_extractor
    from napari_lnmeta.progress import run

    slide = open_slide(SLIDE)
    tissue = tissue_mask(slide, target_mpp=31.0)
    grid = make_grid(slide, patch_size=PATCH, stride=STRIDE, tissue=tissue, min_tissue=0.5)
    polys = read_camelyon_json(POLYGONS, scale=1 / 32)
    frac = region_fraction(grid, polys)
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(frac >= 0.5)
    neg = rng.choice(np.flatnonzero(frac == 0), n_normal, replace=False)
    keep = np.sort(np.r_[pos, neg])
    sub = grid.subset(keep)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared; one thread is also the fastest here
    try:
        ext = load_extractor(BACKBONE, patch_size=PATCH, seed=0)
        path = _TMP / f"tumor001_{n_normal}_{seed}.features.zarr"
        cache = run(extract_features_job(slide, sub, path, extractor=ext, batch_size=256,
                                         device="cpu"))
    finally:
        torch.set_num_threads(threads)
    x = cache.load()
    train = sub.coords[:, 0] < SPLIT_ROW
    return Instances(grid=sub, features=x, tumour=frac[keep] >= 0.5, train=train,
                     backbone=ext[1], cache_path=path)


def benchmark_bags(inst: Instances, *, n_train: int = 300, n_test: int = 120, seed: int = 0,
                   bag_size: int = 16, positives: tuple[int, int] = (1, 6)):
    """(train bags, test bags) as one-bag MILSlides with instance labels."""
    from napari_lnmeta.core.bags import labelled_instance_bags

    rng = np.random.default_rng(seed)
    tr, te = inst.train, ~inst.train
    train = labelled_instance_bags(inst.features[tr], inst.tumour[tr], n_bags=n_train,
                                   bag_size=bag_size, positives=positives, rng=rng, prefix="tr")
    test = labelled_instance_bags(inst.features[te], inst.tumour[te], n_bags=n_test,
                                  bag_size=bag_size, positives=positives, rng=rng, prefix="te")
    return train, test


@functools.lru_cache(maxsize=1)
def camelyon_crop() -> tuple[Path, tuple[int, int]]:
    """A 384 x 320 px crop of tumor_001 around the tumour as a small OME-TIFF pyramid.

    Returns the path and the crop's level-5 origin (row, col) in the full image.
    """
    import tifffile

    origin = (3760, 2040)
    img = tifffile.imread(CAMELYON / "tumor_001_level5.tif")
    crop = np.ascontiguousarray(img[origin[0]:origin[0] + 384, origin[1]:origin[1] + 320])
    path = write_pyramid_tiff(_TMP / "tumor001_crop.ome.tif", crop, levels=2, mpp=7.776,
                              tile=128, compression="zlib")
    return path, origin


def small_patch_model(path: Path) -> Path:
    """A tiny trained-format patch classifier file (random weights) for penultimate features."""
    import torch

    from napari_lnmeta.models.io import ModelMeta, save_model
    from napari_lnmeta.models.registry import build_model

    torch.manual_seed(1)
    model = build_model(BACKBONE, 2)
    meta = ModelMeta(architecture=BACKBONE, classes=["normal", "tumour"], patch_size=PATCH,
                     mpp=7.776)
    return save_model(path, model, meta, overwrite=True)


#: the crop's feature settings (a model whose "features" metadata matches reuses the cache)
CROP_STRIDE = 16
CROP_FEATURES_META = {"stride": CROP_STRIDE, "min_tissue": 0.5, "tissue_mpp": 10.0}


@functools.lru_cache(maxsize=1)
def crop_features():
    """(slide path, cache folder, FeatureCache) of the crop: 16 px patches, stride 16."""
    import torch

    from napari_lnmeta.core.features import FeatureConfig, slide_features_job
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.progress import run

    path, _ = camelyon_crop()
    cache_dir = _TMP / "crop-cache"
    cfg = FeatureConfig(backbone=BACKBONE, patch_size=PATCH, device="cpu", batch_size=128,
                        **CROP_FEATURES_META)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache = run(slide_features_job(open_slide(path), cfg, cache_dir=cache_dir))
    finally:
        torch.set_num_threads(threads)
    return path, cache_dir, cache


def random_mil_file(path: Path, backbone, *, pooling: str = "gated_attention",
                    classes=("N0", "N+"), clinical=None, bag_size: int = 8, seed: int = 0) -> Path:
    """An untrained MIL model file for ``backbone`` (a BackboneInfo) on the crop's grid."""
    import torch

    from napari_lnmeta.models.mil import MILConfig, MILInfo, MILModel, save_mil

    torch.manual_seed(seed)
    cfg = MILConfig(feature_dim=backbone.feature_dim, n_classes=len(classes), pooling=pooling,
                    embed_dim=32, attn_dim=16,
                    clinical_dim=0 if clinical is None else clinical.dim)
    info = MILInfo(config=cfg, classes=list(classes), backbone=backbone, clinical=clinical,
                   features=dict(CROP_FEATURES_META), bags={"size": bag_size, "per_slide": 4})
    return save_mil(path, MILModel(cfg), info, overwrite=True)
