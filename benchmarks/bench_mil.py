"""MIL: the real-patch CLI benchmark, the real-tissue benchmark and extraction throughput.

Prints, on one device (no assertions):

0. **Real-patch MIL through the CLI** (what a user runs): 36 mosaic slides of 6 x 6 real
   H&E patches (LC25000 lung, ``../shared/data/lc25000_lung_224``, 224 px images
   resized to 112 px; the slide is declared at 2 µm/px, LC25000 gives no pixel size,
   about 1-3 µm at this size); an N+ slide holds 4-12 carcinoma patches among benign
   ones, an N0 slide only benign ones. Split by LC25000 augmentation group: 18 training
   slides from folds 0-2, 6 validation slides from fold 3, 12 held-out slides from fold
   4 (no source image is shared across splits). ``lnmeta extract-features`` (resnet18,
   random initialisation, 112 px, stride 112) → ``lnmeta train-mil`` **with its
   defaults** for each of 4 seeds → ``lnmeta mil`` on each held-out slide. Per seed:
   held-out **slide AUC** (``lnmeta mil``'s N+ probability) and the attention **instance
   AUC** (``attention.ome.zarr`` against the carcinoma patches, mean over held-out N+
   slides); the worst seed is printed last. No preprocessing happens outside the
   product.
1. **Real-tissue MIL benchmark.** CAMELYON16 tumor_001 at 7.776 µm/px
   (``../shared/data/camelyon16_tumor001_lowres``): 16 x 16 px patches (124 µm), stride 8,
   on tissue (Otsu mask); *tumour* patches have >= 50 % of their area inside the expert
   polygons (``Tumor_001.json`` / 32), *normal* ones 0 %. Features: penultimate layer of
   ``lnmeta_cnn_small`` with **random weights** (seed 0; nothing pretrained exists
   offline; the MIL model standardises them with its training slides' statistics).
   Hold-out by region: bags for training
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
    from napari_lnmeta.core.bags import region_fraction
    from napari_lnmeta.core.features import extract_features_job
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.annotations import read_camelyon_json
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.extractor import load_extractor
    from napari_lnmeta.progress import run

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
    return dict(x=x, tumour=frac[keep] >= 0.5, train=train, backbone=ext[1],
                n=len(sub), extract_s=dt)


LC25000 = SHARED / "lc25000_lung_224"
CLI_GRID, CLI_PATCH, CLI_MPP = 6, 112, 2.0
CLI_SPLITS = (("train", 18, (0, 1, 2)), ("val", 6, (3,)), ("test", 12, (4,)))


def mosaic_slides(tmp: Path, seed: int = 0) -> list[dict]:
    """The CLI benchmark's mosaic slides (see the module docstring), written as TIFFs."""
    import csv

    import tifffile
    from PIL import Image

    with open(LC25000 / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(seed)
    n_cells = CLI_GRID * CLI_GRID
    slides = []
    for split, n, folds in CLI_SPLITS:
        pool = [r for r in rows if int(r["fold"]) in folds]
        benign = [r["path"] for r in pool if r["label"] == "0"]
        tumour = [r["path"] for r in pool if r["label"] == "1"]
        for k in range(n):
            label = k % 2
            n_t = int(rng.integers(4, 13)) if label else 0
            paths = (list(rng.choice(tumour, n_t, replace=False))
                     + list(rng.choice(benign, n_cells - n_t, replace=False)))
            is_t = np.r_[np.ones(n_t, bool), np.zeros(n_cells - n_t, bool)]
            order = rng.permutation(n_cells)
            img = np.zeros((CLI_GRID * CLI_PATCH, CLI_GRID * CLI_PATCH, 3), np.uint8)
            cells = np.zeros((CLI_GRID, CLI_GRID), bool)
            for cell, src in enumerate(order):
                i, j = divmod(cell, CLI_GRID)
                with Image.open(LC25000 / paths[src]) as im:
                    patch = np.asarray(im.convert("RGB").resize((CLI_PATCH, CLI_PATCH),
                                                                Image.BILINEAR))
                img[i * CLI_PATCH:(i + 1) * CLI_PATCH, j * CLI_PATCH:(j + 1) * CLI_PATCH] = patch
                cells[i, j] = is_t[src]
            name = f"{split}_{k:02d}"
            path = tmp / "slides" / f"{name}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, img, photometric="rgb", tile=(224, 224),
                             resolution=(1e4 / CLI_MPP, 1e4 / CLI_MPP),
                             resolutionunit="CENTIMETER")
            slides.append({"name": name, "path": path, "split": split,
                           "label": ["N0", "N+"][label], "tumour_cells": cells})
    return slides


def cli_benchmark(tmp: Path, *, seeds, backbone: str = "resnet18") -> list[dict]:
    """Section 0: extract-features, train-mil (defaults) and mil through ``lnmeta``'s main."""
    import contextlib
    import io

    from napari_lnmeta.cli import main as lnmeta
    from napari_lnmeta.core.metrics import roc_auc
    from napari_lnmeta.io.omezarr import read_ome_zarr

    def call(argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = lnmeta([str(a) for a in argv])
        if rc:
            raise RuntimeError(f"lnmeta {argv[0]} failed ({rc}):\n{buf.getvalue()[-2000:]}")
        return buf.getvalue()

    t0 = time.perf_counter()
    slides = mosaic_slides(tmp)
    cache = tmp / "features"
    call(["extract-features", *[s["path"] for s in slides], "--backbone", backbone,
          "--patch-size", CLI_PATCH, "--stride", CLI_PATCH, "--min-tissue", 0,
          "--device", "cpu", "--cache-dir", cache])
    for s in slides:
        (f,) = sorted(cache.glob(f"{s['name']}.*.features.zarr"))
        s["features"] = f
    table = tmp / "cohort.csv"
    table.write_text("slide,features,label,split\n" + "".join(
        f"{s['path']},{s['features']},{s['label']},{s['split']}\n" for s in slides))
    prep_s = time.perf_counter() - t0
    test = [s for s in slides if s["split"] == "test"]
    out = []
    for seed in seeds:
        t0 = time.perf_counter()
        run = tmp / f"run{seed}"
        call(["train-mil", table, "-o", run, "--seed", seed, "--device", "cpu"])
        train_s = time.perf_counter() - t0
        y, p, inst_aucs = [], [], []
        for s in test:
            res = tmp / f"pred{seed}" / s["name"]
            call(["mil", s["path"], "-o", res, "--model", run / "best.safetensors",
                  "--features", s["features"], "--device", "cpu"])
            summ = json.loads((res / "summary.json").read_text())
            y.append(int(s["label"] == "N+"))
            p.append(summ["probabilities"]["N+"])
            if s["label"] == "N+":
                att = np.asarray(read_ome_zarr(res / "attention.ome.zarr").pyramid[0])
                att = att.reshape(att.shape[-2:])
                inst_aucs.append(roc_auc(s["tumour_cells"].ravel().astype(int), att.ravel()))
        hist = json.loads((run / "history.json").read_text())
        out.append({"seed": seed, "slide_auc": roc_auc(np.array(y), np.array(p)),
                    "instance_auc": float(np.mean(inst_aucs)),
                    "instance_auc_min": float(np.min(inst_aucs)),
                    "loss_first": hist[0]["train_loss"], "loss_last": hist[-1]["train_loss"],
                    "train_s": train_s, "total_s": time.perf_counter() - t0})
        r = out[-1]
        print(f"cli seed {seed}: held-out slide AUC {r['slide_auc']:.3f}   attention instance "
              f"AUC {r['instance_auc']:.3f} (worst slide {r['instance_auc_min']:.3f})   "
              f"train loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}   "
              f"train-mil {train_s:.1f} s, with mil {r['total_s']:.1f} s", flush=True)
    worst = min(out, key=lambda r: min(r["slide_auc"], r["instance_auc"]))
    print(f"cli worst seed {worst['seed']} of {len(out)}: held-out slide AUC "
          f"{worst['slide_auc']:.3f}, attention instance AUC {worst['instance_auc']:.3f} "
          f"(mosaics + features {prep_s:.1f} s)", flush=True)
    return out


def mil_benchmark(inst, *, poolings, seeds, device, settings, label):
    from napari_lnmeta.core.bags import labelled_instance_bags
    from napari_lnmeta.progress import run
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

    from napari_lnmeta.core.metrics import roc_auc

    tr, te = inst["train"], ~inst["train"]
    x = inst["x"]
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)  # the probe's own preprocessing
    clf = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
    clf.fit(x[tr], inst["tumour"][tr])
    return roc_auc(inst["tumour"][te].astype(int), clf.decision_function(x[te]))


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
    ap.add_argument("--cli-only", action="store_true", help="only section 0 (CLI benchmark)")
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
        print(f"real-patch MIL through the CLI ({CLI_GRID}x{CLI_GRID} LC25000 mosaics, "
              f"{args.backbone} @ {CLI_PATCH} px, train-mil defaults):", flush=True)
        cli = cli_benchmark(tmp, seeds=[0, 1] if quick else [0, 1, 2, 3],
                            backbone=args.backbone)
        if args.cli_only:
            if args.json:
                Path(args.json).write_text(json.dumps({"cli": cli}, indent=1))
            return 0
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
                    ["gated_attention", "attention", "maxpool_attention", "mean", "max"])
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
            Path(args.json).write_text(json.dumps({"cli": cli, "mil": rows, "throughput": tp},
                                                  indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
