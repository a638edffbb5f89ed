"""MIL: the real-tissue benchmark (bag AUC, attention instance AUC) and extraction throughput.

Prints, on one device (no assertions):

1. **Real-tissue MIL benchmark.** CAMELYON16 tumor_001 at 7.776 µm/px
   (``../shared/data/camelyon16_tumor001_lowres``): 16 x 16 px patches (124 µm), stride 8,
   on tissue (Otsu mask); *tumour* patches have >= 50 % of their area inside the expert
   polygons (``Tumor_001.json`` / 32), *normal* ones 0 %. Features: penultimate layer of
   ``lnmeta_cnn_small`` with **random weights** (seed 0; nothing pretrained exists
   offline), standardised on the training region. Hold-out by region: bags for training
   come from above level-5 row 4050 (the large tumour polygon), test bags from below
   (the small polygon and the lower half of the node). Bags of 16 patches; positive
   bags hold 1-6 tumour patches, negative bags none; 300 training and 120 test bags.
   For each pooling and 3 seeds (bag draws, initialisation): the test **bag AUC** and
   the **instance AUC** of the attention weights inside positive test bags (mean over
   bags), plus the share of positive bags whose most attended patch is tumour (top-1).
   A logistic-regression probe trained on the *instance* labels of the training region
   is printed as a fully supervised reference.
2. **Feature-extraction throughput**: patches/s of
   :func:`~napari_lnmeta.core.features.extract_features_job` (slide reads in a thread,
   preprocessing and forward on the device, zarr writes) vs the backbone's bare forward
   patches/s on in-memory batches of the same size, same device; the ratio is printed
   (1.0 = reading and writing are completely hidden). Slide: CMU-1-Small-Region (real
   Aperio H&E, 0.499 µm/px).

Run: ``python benchmarks/bench_mil.py [--quick] [--device auto] [--backbone resnet18]
[--patch 224]``. ``--quick`` uses fewer normal patches, one seed and fewer patches for
the throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED

CAMELYON = SHARED / "camelyon16_tumor001_lowres"
CMU1 = SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
PATCH, STRIDE, SPLIT_ROW = 16, 8, 4050
BENCH = dict(bag_size=16, bags_per_slide=1, epochs=20, lr=1e-3, weight_decay=1e-2, dropout=0.5,
             batch_size=16, embed_dim=64, attn_dim=32, t0=1000, test_fraction=0.0,
             val_fraction=0.25, n_boot=50)
#: seed 002's own optimiser settings (Adam 1e-4, wd 1e-3, dropout 0.25), more epochs
SEED002 = dict(BENCH, lr=1e-4, weight_decay=1e-3, dropout=0.25, epochs=60, t0=10)


def instances(tmp: Path, n_normal: int | None, device: str, seed: int = 0):
    from napari_lnmeta.core.features import extract_features_job
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.annotations import read_camelyon_json
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.extractor import load_extractor
    from napari_lnmeta.progress import run
    from napari_lnmeta.train.bags import region_fraction

    slide = open_slide(CAMELYON / "tumor_001_level5.ome.tif")
    grid = make_grid(slide, patch_size=PATCH, stride=STRIDE,
                     tissue=tissue_mask(slide, target_mpp=31.0), min_tissue=0.5)
    frac = region_fraction(grid, read_camelyon_json(CAMELYON / "Tumor_001.json", scale=1 / 32))
    pos, neg = np.flatnonzero(frac >= 0.5), np.flatnonzero(frac == 0)
    if n_normal is not None and n_normal < len(neg):
        neg = np.random.default_rng(seed).choice(neg, n_normal, replace=False)
    keep = np.sort(np.r_[pos, neg])
    sub = grid.subset(keep)
    ext = load_extractor("lnmeta_cnn_small", patch_size=PATCH, seed=0)
    t0 = time.perf_counter()
    cache = run(extract_features_job(slide, sub, tmp / "tumor001.features.zarr", extractor=ext,
                                     batch_size=256, device=device))
    dt = time.perf_counter() - t0
    x = cache.load()
    train = sub.coords[:, 0] < SPLIT_ROW
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    return dict(x=(x - mu) / sd, tumour=frac[keep] >= 0.5, train=train, backbone=ext[1],
                n=len(sub), extract_s=dt)


def mil_benchmark(inst, *, poolings, seeds, device, settings, label):
    from napari_lnmeta.progress import run
    from napari_lnmeta.train.bags import labelled_instance_bags
    from napari_lnmeta.train.mil import MILTrainConfig, attention_instance_auc, train_mil_job

    tr, te = inst["train"], ~inst["train"]
    rows = []
    for pooling in poolings:
        res = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            train = labelled_instance_bags(inst["x"][tr], inst["tumour"][tr], n_bags=300,
                                           positives=(1, 6), rng=rng, prefix="tr")
            test = labelled_instance_bags(inst["x"][te], inst["tumour"][te], n_bags=120,
                                          positives=(1, 6), rng=rng, prefix="te")
            t0 = time.perf_counter()
            out = run(train_mil_job(train, MILTrainConfig(pooling=pooling, seed=seed,
                                                          device=device, **settings),
                                    classes=["normal", "tumour"], backbone=inst["backbone"]))
            m = attention_instance_auc(out.model, test, device=out.model.classifier[1].weight.device)
            m["train_s"] = time.perf_counter() - t0
            res.append(m)
        agg = {k: (float(np.mean([r[k] for r in res])), float(np.std([r[k] for r in res])))
               for k in ("bag_auc", "instance_auc_mean", "instance_auc_pooled", "top1", "train_s")}
        rows.append((label, pooling, agg))
        print(f"{label:8s} {pooling:16s} bag AUC {agg['bag_auc'][0]:.3f} ± {agg['bag_auc'][1]:.3f}"
              f"   instance AUC {agg['instance_auc_mean'][0]:.3f} ± {agg['instance_auc_mean'][1]:.3f}"
              f" (pooled {agg['instance_auc_pooled'][0]:.3f})"
              f"   top-1 {agg['top1'][0]:.2f}   {agg['train_s'][0]:.1f} s/run", flush=True)
    return rows


def probe(inst):
    from sklearn.linear_model import LogisticRegression

    from napari_lnmeta.train.metrics import roc_auc

    tr, te = inst["train"], ~inst["train"]
    clf = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
    clf.fit(inst["x"][tr], inst["tumour"][tr])
    return roc_auc(inst["tumour"][te].astype(int), clf.decision_function(inst["x"][te]))


def throughput(tmp: Path, *, backbone: str, patch: int, n: int, batch: int, device: str):
    import torch

    from napari_lnmeta.core.features import extract_features_job
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.extractor import load_extractor
    from napari_lnmeta.models.io import resolve_device
    from napari_lnmeta.progress import run

    dev = resolve_device(device)
    slide = open_slide(CMU1)
    grid = make_grid(slide, patch_size=patch, stride=max(8, patch // 4))
    grid = grid.subset(np.arange(min(n, len(grid))))
    model, info = load_extractor(backbone, patch_size=patch, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # bare forward on in-memory batches of the same size
    x = torch.randn(batch, 3, patch, patch, device=dev)
    with torch.inference_mode():
        model(x)
        sync()
        reps = max(2, len(grid) // batch)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        sync()
    bare = reps * batch / (time.perf_counter() - t0)
    run(extract_features_job(slide, grid.subset(np.arange(min(batch, len(grid)))),
                             tmp / "warm.features.zarr", extractor=(model, info),
                             batch_size=batch, device=dev))  # warm-up (threads, allocator)
    t0 = time.perf_counter()
    run(extract_features_job(slide, grid, tmp / "cmu1.features.zarr", extractor=(model, info),
                             batch_size=batch, device=dev))
    sync()
    full = len(grid) / (time.perf_counter() - t0)
    return {"backbone": backbone, "patch": patch, "patches": len(grid), "batch": batch,
            "device": str(dev), "bare_patches_per_s": bare, "extract_patches_per_s": full,
            "ratio": full / bare}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--patch", type=int, default=None,
                    help="throughput patch size (default 224 on CUDA, 112 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_lnmeta.models.io import resolve_device

    dev = resolve_device(args.device)
    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="bench-mil-"))
    try:
        print(f"device {dev}, torch threads {torch.get_num_threads()}"
              f"{' (quick)' if quick else ''}", flush=True)
        inst = instances(tmp, 3000 if quick else None, str(dev))
        n_t = int(inst["tumour"].sum())
        print(f"real-tissue MIL benchmark: {inst['n']} patches ({n_t} tumour: "
              f"{int((inst['tumour'] & inst['train']).sum())} train region, "
              f"{int((inst['tumour'] & ~inst['train']).sum())} test region); features "
              f"{inst['x'].shape[1]}-d in {inst['extract_s']:.1f} s "
              f"({inst['n'] / inst['extract_s']:.0f} patches/s)", flush=True)
        print(f"fully supervised instance probe (logistic regression, test region): "
              f"AUC {probe(inst):.3f}", flush=True)
        seeds = [0] if quick else [0, 1, 2]
        poolings = (["gated_attention", "mean"] if quick else
                    ["gated_attention", "attention", "seed002", "mean", "max"])
        rows = mil_benchmark(inst, poolings=poolings, seeds=seeds, device=str(dev),
                             settings=BENCH, label="bench")
        if not quick:
            rows += mil_benchmark(inst, poolings=["gated_attention"], seeds=seeds,
                                  device=str(dev), settings=SEED002, label="seed002")
        patch = args.patch or (224 if dev.type == "cuda" else 112)
        n = (4096 if dev.type == "cuda" else 256) // (2 if quick else 1)
        batch = 128 if dev.type == "cuda" else 32
        tp = throughput(tmp, backbone=args.backbone, patch=patch, n=n, batch=batch,
                        device=str(dev))
        print(f"feature extraction {tp['backbone']} @ {tp['patch']} px, batch {tp['batch']}, "
              f"{tp['patches']} patches on {tp['device']}: {tp['extract_patches_per_s']:.1f} "
              f"patches/s vs bare forward {tp['bare_patches_per_s']:.1f} patches/s -> ratio "
              f"{tp['ratio']:.2f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"mil": rows, "throughput": tp}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
