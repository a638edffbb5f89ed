"""``lnmeta train-spatial``: the seed-004 spatial-context model from slides + labels.

One command cuts the labelled patches (the ``make-patches`` rule), gives each its
``k x k`` neighbourhood, splits by region or slide, trains CNN + LSTM with
``CE + β·L_spatial`` under the class-then-slide-then-patch sampler, and writes a model
file that ``lnmeta predict --model`` runs like any patch model::

    lnmeta train-spatial --slide tumor_001_level5.ome.tif --labels Tumor_001.json \\
        --labels-mpp 0.243 --patch-size 16 --stride 8 --k 3 --arch lnmeta_cnn_small \\
        --holdout-region 4050,0,7168,3072 --holdout-margin 16 --epochs 8 --eval \\
        --out runs/spatial
    lnmeta predict tumor_001_level5.ome.tif --model runs/spatial/last.safetensors -o pred
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import jsonio
from ..io.validate import mpp_arg
from . import add_device, add_mpp, add_out, add_overwrite, command

_EPILOG = """\
seed 004 as written: --arch resnet34 --init RESNET34.safetensors --optimizer rmsprop --lr 0.01
  --momentum 0.9 --augment dihedral-jitter --beta B (B cross-validated in the paper; not given).
the held-out split is on whole windows: no pixel a training window reads is in a test window.
--beta 0 trains CNN + LSTM with cross-entropy only (the seed's ablation).
"""


@command("train-spatial", help="Train the seed-004 spatial-context model (CNN + LSTM over "
                               "k x k neighbourhoods, spatial-consistency loss)")
def train_spatial_cmd(p: argparse.ArgumentParser):
    from ..models.registry import list_architectures
    from ..train.options import OPTIMIZERS, SCHEDULERS, augment_name
    from ..train.options import SPATIAL_AUGMENTS as AUGMENTS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    d = p.add_argument_group("data (as lnmeta make-patches)")
    d.add_argument("--slide", action="append", required=True, help="slide file (repeat)")
    d.add_argument("--labels", action="append", required=True,
                   help="labels of the slide at the same position (repeat)")
    d.add_argument("--labels-scale", type=float, action="append",
                   help="slide pixels per label-file pixel (once, or once per slide)")
    d.add_argument("--labels-mpp", type=mpp_arg("--labels-mpp"), action="append",
                   help="µm/px of the label file's coordinates (alternative to --labels-scale)")
    d.add_argument("--patch-size", type=int, default=16, help="patch (cell) side in px")
    d.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None, help="read patches at this µm/px")
    d.add_argument("--level", type=int, default=None, help="pyramid level to read")
    d.add_argument("--stride", type=int, default=None, help="grid step in px (default: patch size)")
    d.add_argument("--positive-min", type=float, default=0.2)
    d.add_argument("--negative-max", type=float, default=0.0)
    d.add_argument("--min-tissue", type=float, default=0.5)
    d.add_argument("--balance", action="store_true",
                   help="also subsample normals when cutting (the sampler balances classes anyway)")
    add_mpp(d)
    g = p.add_argument_group("held-out data (whole windows, by region or slide)")
    g.add_argument("--holdout-region", default=None, metavar="ROW0,COL0,ROW1,COL1")
    g.add_argument("--holdout-slide", default=None)
    g.add_argument("--holdout-margin", type=float, default=0.0)
    g.add_argument("--val-slides", default=None, help="comma-separated slide names held out")
    g.add_argument("--val-fraction", type=float, default=None)
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="lnmeta_cnn_small", choices=list_architectures(),
                   metavar="ARCH", help="shared patch CNN (seed 004: resnet34)")
    m.add_argument("--k", type=int, default=3, help="neighbourhood side in patches (odd)")
    m.add_argument("--hidden", type=int, default=128, help="LSTM hidden size")
    m.add_argument("--layers", type=int, default=1, help="LSTM layers")
    m.add_argument("--bidirectional", action="store_true",
                   help="LSTM both ways over the raster sequence (not in seed 004)")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--head", choices=["softmax", "sigmoid"], default="softmax")
    m.add_argument("--init", default=None, help="backbone weights (.safetensors)")
    m.add_argument("--freeze", type=int, default=0, help="freeze the first N backbone stages")
    o = p.add_argument_group("optimisation")
    o.add_argument("--beta", type=float, default=1.0, help="weight of the spatial loss")
    o.add_argument("--ce-cells", choices=["all", "centre"], default="all",
                   help="cross-entropy over all labelled cells or the centre only")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--epoch-size", type=int, default=None, help="neighbourhoods per epoch")
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--scheduler", choices=SCHEDULERS, default="cosine")
    o.add_argument("--augment", choices=AUGMENTS, default="flips", type=augment_name,
                   help="dihedral-jitter: seed 004's (earlier name seed004, still accepted)")
    o.add_argument("--normalise", choices=["dataset", "imagenet"], default="dataset")
    o.add_argument("--monitor", default="val_loss",
                   choices=["val_loss", "val_auc", "val_acc", "val_f1", "train_loss"])
    o.add_argument("--early-stopping", type=int, default=None, metavar="EPOCHS")
    o.add_argument("--val-every", type=int, default=1, metavar="EPOCHS")
    o.add_argument("--max-steps", type=int, default=None)
    r = p.add_argument_group("run")
    add_out(r, "run folder (last/best.safetensors, log.csv)")
    add_device(r)
    r.add_argument("--no-amp", action="store_true")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--in-memory", action="store_true", help="read every window into memory first")
    r.add_argument("--eval", action="store_true",
                   help="patch-level metrics of the final model on the held-out centres "
                        "(OUT/eval/metrics.json)")
    r.add_argument("--export", default=None, help="copy last.safetensors to this path")
    add_overwrite(p)

    def run(args):
        from ..errors import InputError
        from ..io.slide import open_slide
        from ..models.spatial import SpatialConfig
        from ..progress import TextProgress
        from ..progress import run as drive
        from ..train.datasets import PatchConfig
        from ..train.spatial import (
            SpatialTrainConfig,
            build_neighbourhoods_job,
            split_neighbourhoods,
            train_spatial_job,
        )
        from .train import _floats, _per_slide

        if len(args.slide) != len(args.labels):
            raise InputError(f"give one --labels per --slide ({len(args.slide)} slides, "
                             f"{len(args.labels)} labels)")
        if (Path(args.out) / "last.safetensors").exists() and not args.overwrite:
            raise InputError(f"{args.out}: already holds a training run (pass --overwrite to "
                             "start again)")
        n = len(args.slide)
        scfg = SpatialConfig(backbone=args.arch, k=args.k, hidden=args.hidden,
                             layers=args.layers, bidirectional=args.bidirectional,
                             dropout=args.dropout)
        pcfg = PatchConfig(patch_size=args.patch_size, patch_mpp=args.patch_mpp, level=args.level,
                           stride=args.stride, positive_min=args.positive_min,
                           negative_max=args.negative_max, min_tissue=args.min_tissue,
                           balance=args.balance, seed=args.seed)
        tcfg = SpatialTrainConfig(spatial=scfg, beta=args.beta, ce_cells=args.ce_cells,
                                  head=args.head, epochs=args.epochs, epoch_size=args.epoch_size,
                                  batch_size=args.batch_size, optimizer=args.optimizer,
                                  lr=args.lr, weight_decay=args.weight_decay,
                                  momentum=args.momentum, scheduler=args.scheduler,
                                  augment=args.augment, normalise=args.normalise,
                                  init=args.init, freeze=args.freeze, monitor=args.monitor,
                                  early_stopping=args.early_stopping, val_every=args.val_every,
                                  seed=args.seed, device=args.device, amp=not args.no_amp,
                                  workers=args.workers, max_steps=args.max_steps)
        if args.labels_mpp:
            lm = _per_slide(args.labels_mpp, n, "--labels-mpp")
            scales = [m_ / open_slide(s, mpp=args.mpp).require_mpp()
                      for s, m_ in zip(args.slide, lm, strict=True)]
        else:
            scales = _per_slide(args.labels_scale, n, "--labels-scale", 1.0)
        ns = drive(build_neighbourhoods_job(list(zip(args.slide, args.labels, strict=True)), pcfg,
                                            k=args.k, label_scales=scales, mpps=[args.mpp] * n),
                   TextProgress())
        region = _floats(args.holdout_region, 4, "--holdout-region") \
            if args.holdout_region else None
        vs = [s.strip() for s in args.val_slides.split(",")] if args.val_slides else None
        train_set, val_set = split_neighbourhoods(ns, region=region,
                                                  region_slide=args.holdout_slide,
                                                  margin=args.holdout_margin, test_slides=vs,
                                                  test_fraction=args.val_fraction,
                                                  seed=args.seed)
        from .train import announce_sets, report_and_export

        announce_sets(train_set, val_set, in_memory=args.in_memory)
        res = drive(train_spatial_job(tcfg, train_set, val_set, out_dir=args.out,
                              overwrite=args.overwrite, patch_config=pcfg.to_json()),
                    TextProgress())
        report_and_export(res, args, unit="neighbourhoods")
        if args.eval and val_set is not None:
            from ..core.metrics import evaluate_binary
            from ..io.atomic import write_text_atomic
            from ..train.spatial import predict_neighbourhoods_job
            from .train import _print_metrics

            probs = drive(predict_neighbourhoods_job(res.model, val_set, res.meta,
                                                     device=res.extra["device"],
                                                     workers=args.workers), TextProgress())
            metrics = evaluate_binary(val_set.labels, probs[:, 1])
            (Path(args.out) / "eval").mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(args.out) / "eval" / "metrics.json",
                              jsonio.dumps({"n": len(val_set), "metrics": metrics}, indent=2,
                                         default=float), overwrite=True)
            _print_metrics(metrics)

    return run
