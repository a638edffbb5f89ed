"""``lnmeta make-patches``, ``lnmeta train``, ``lnmeta evaluate``: the seed-000 loop headless.

A typical run::

    lnmeta make-patches --slide node.svs --labels node_tumour.geojson --patch-size 90 \\
        --patch-mpp 0.5 --out node_patches.npz
    lnmeta train node_patches.npz other_patches.npz --val-slides other.svs \\
        --arch resnet50 --freeze-convs 3 --epochs 18 --out runs/r50
    lnmeta evaluate runs/r50/best.safetensors heldout_patches.npz --out runs/r50/eval
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..io import jsonio
from ..io.validate import mpp_arg, positive_arg
from . import add_device, add_mpp, add_out, add_overwrite, command

_EPILOG_PATCHES = """\
labels: CAMELYON JSON (.json with positive/negative), QuPath GeoJSON (.geojson), ASAP XML
(.xml), ROI rectangles (.csv with xs, ys, xe, ye), an OME-Zarr mask (.zarr) or a label image
(.png/.tif covering the slide). Polygon files made for another resolution than the slide
need --labels-scale (slide px per file px) or --labels-mpp (µm/px of the file's coordinates).

rule (seed 000): a patch is tumour when > --positive-min of it is labelled tumour, normal
when <= --negative-max (0) is, and left out otherwise; normals are subsampled to balance
(--neg-ratio) unless --no-balance.

example (the CAMELYON16 slide at 7.776 µm/px, polygons at 0.243 µm/px):
  lnmeta make-patches --slide tumor_001_level5.ome.tif --labels Tumor_001.json \\
      --labels-mpp 0.243 --patch-size 32 --stride 8 --no-balance --out t001.npz
"""

_EPILOG_TRAIN = """\
splits are by slide (--val-slides, --val-fraction) or by a region of a slide
(--holdout-region ROW0,COL0,ROW1,COL1 in level-0 px), never by patch. Outputs in --out:
last.safetensors, best.safetensors, log.csv, config.json (+ eval/ with --eval).

recipes (--recipe; options given explicitly win):
  seed000 = --arch resnet50 --freeze-convs 3 --optimizer sgd --lr 2e-2 --scheduler cosine
    --weight-decay 1e-4 --batch-size 128 --epochs 18 --augment photometric;
  seed001 = --arch resnet50 --optimizer adam --lr 1e-4 --weight-decay 1e-3
    --scheduler plateau --early-stopping 20 --head sigmoid.
  Both start from ImageNet weights (--init imagenet) when they are in the torch cache,
  and say so when they are not (then: random initialisation).
pretrained weights (--init): imagenet (torchvision weights of --arch from the torch cache),
torchvision:ARCH.WEIGHTS, timm:MODEL.TAG, hf-hub:ORG/NAME, a short name of `lnmeta
models list`, a folder (config.json + model.safetensors) or a .safetensors file. Nothing
is downloaded here: fetch once with `lnmeta models pull NAME`. A timm / Hub init decides
the architecture (--arch may be left out).
"""

RECIPES = {
    "seed000": {"arch": "resnet50", "freeze_convs": 3, "optimizer": "sgd", "lr": 2e-2,
                "scheduler": "cosine", "weight_decay": 1e-4, "batch_size": 128, "epochs": 18,
                "augment": "photometric"},
    "seed001": {"arch": "resnet50", "optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-3,
                "scheduler": "plateau", "early_stopping": 20, "head": "sigmoid"},
}


_RECIPE_KEYS = {k for r in RECIPES.values() for k in r} | {"normalise"}


def _track_explicit(p: argparse.ArgumentParser) -> None:
    """Let ``run`` tell options given on the command line from defaults (for recipes):
    the recipe keys default to ``None`` and get their real default in
    :func:`_fill_defaults`; ``args._explicit`` names those the user gave."""
    real = {}
    for a in p._actions:
        if a.dest in _RECIPE_KEYS:
            real[a.dest] = a.default
            a.default = None
    p.set_defaults(_real_defaults=real)


def _fill_defaults(args) -> None:
    args._explicit = {k for k in args._real_defaults if getattr(args, k) is not None}
    for k, v in args._real_defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def apply_recipe(args, parser: argparse.ArgumentParser) -> None:
    """Fill options left at their defaults from ``--recipe``; pick the init.

    The recipe's init is ImageNet when its weights are in the local torch cache; when
    they are not, a line says so (and how to fetch them) and training starts from a
    random initialisation.
    """
    from ..errors import ModelError
    from ..models.backbones import resolve

    for key, value in RECIPES[args.recipe].items():
        if key not in args._explicit:
            setattr(args, key, value)
    if args.init is None:
        try:
            src = resolve("imagenet", args.arch)
        except ModelError as e:
            print(f"recipe {args.recipe}: ImageNet weights are not cached, starting from a "
                  f"random initialisation ({e.problem})", file=sys.stderr)
        else:
            args.init = "imagenet"
            if "normalise" not in args._explicit:
                args.normalise = "imagenet"
            print(f"recipe {args.recipe}: init from {src.id} ({src.weights_file})",
                  file=sys.stderr)



def _floats(text: str, n: int, what: str) -> list[float]:
    from ..errors import InputError

    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError as e:
        raise InputError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from e
    if len(vals) != n:
        raise InputError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    from ..errors import InputError

    out = {}
    for it in items or []:
        if "=" not in it:
            raise InputError(f"{what}: expected NAME=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _per_slide(values: list | None, n: int, what: str, default=None) -> list:
    from ..errors import InputError

    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(f"{what}: give it once or once per --slide ({n}), got {len(values)}")
    return values


# --------------------------------------------------------------------------------------
@command("make-patches", help="Cut labelled patches (seed-000 rule) from slides + labels into a patch set")
def make_patches(p: argparse.ArgumentParser):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG_PATCHES
    p.add_argument("--slide", action="append", required=True,
                   help="slide file (repeat for several slides)")
    p.add_argument("--labels", action="append", required=True,
                   help="labels of the slide given at the same position (repeat)")
    add_out(p, "patch-set file to write (.npz)")
    p.add_argument("--labels-scale", type=positive_arg("--labels-scale"), action="append",
                   help="slide pixels per label-file pixel (once, or once per slide)")
    p.add_argument("--labels-mpp", type=mpp_arg("--labels-mpp"), action="append",
                   help="µm/px of the label file's coordinates (alternative to --labels-scale)")
    p.add_argument("--patch-size", type=int, default=90, help="patch side in px (default 90, seed 000)")
    p.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None,
                   help="read patches at this µm/px (default: --level, else level 0)")
    p.add_argument("--level", type=int, default=None, help="pyramid level to read")
    p.add_argument("--stride", type=int, default=None, help="grid step in px (default: patch size)")
    p.add_argument("--positive-min", type=float, default=0.2,
                   help="tumour share above which a patch is positive (default 0.2)")
    p.add_argument("--negative-max", type=float, default=0.0,
                   help="tumour share at or below which a patch is negative (default 0)")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="minimum tissue share of every patch (default 0.5)")
    p.add_argument("--classes", default="normal,tumour",
                   help="class names, negative first (default normal,tumour; e.g. "
                        "negative,breast metastasis,lymphoma)")
    p.add_argument("--class-map", action="append", metavar="LABEL=CLASS",
                   help="map a label name of the files to a class (repeat)")
    p.add_argument("--fibrosis-as-tumour", action="store_true",
                   help="count fibrosis labels as tumour (seed 000 'Tumor + FIB')")
    p.add_argument("--negatives", choices=["tissue", "annotated"], default="tissue",
                   help="negatives from all unlabelled tissue (default) or only from regions "
                        "labelled normal")
    p.add_argument("--no-balance", action="store_true", help="keep every negative patch")
    p.add_argument("--neg-ratio", type=float, default=1.0,
                   help="negatives per positive when balancing (default 1)")
    p.add_argument("--max-per-class", type=int, default=None, help="cap per class and slide")
    p.add_argument("--source", action="append",
                   help="dataset source name (for --mix in lnmeta train), once or per slide")
    p.add_argument("--cache", default=None, help="also write the pixels to this zarr cache")
    p.add_argument("--seed", type=int, default=0)
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..errors import InputError
        from ..io.atomic import claim_output

        if len(args.slide) != len(args.labels):
            raise InputError(f"give one --labels per --slide ({len(args.slide)} slides, "
                             f"{len(args.labels)} labels)")
        with claim_output(args.out, overwrite=args.overwrite, inputs=args.slide + args.labels):
            return _patches(args)

    def _patches(args):
        from ..io.slide import open_slide
        from ..progress import TextProgress
        from ..progress import run as drive
        from ..train.datasets import PatchConfig, build_patchset_job, cache_patches_job

        n = len(args.slide)
        cfg = PatchConfig(patch_size=args.patch_size, patch_mpp=args.patch_mpp, level=args.level,
                          stride=args.stride,
                          classes=[c.strip() for c in args.classes.split(",") if c.strip()],
                          positive_min=args.positive_min, negative_max=args.negative_max,
                          min_tissue=args.min_tissue, fibrosis_as_tumour=args.fibrosis_as_tumour,
                          negatives=args.negatives, balance=not args.no_balance,
                          neg_ratio=args.neg_ratio, max_per_class=args.max_per_class,
                          class_map=_pairs(args.class_map, "--class-map"), seed=args.seed)
        mpps = [args.mpp] * n
        if args.labels_mpp:
            lm = _per_slide(args.labels_mpp, n, "--labels-mpp")
            scales = []
            for path, m in zip(args.slide, lm, strict=True):
                smpp = open_slide(path, mpp=args.mpp).require_mpp()
                scales.append(m / smpp)
        else:
            scales = _per_slide(args.labels_scale, n, "--labels-scale", 1.0)
        sources = _per_slide(args.source, n, "--source", "default")
        ps = drive(build_patchset_job(list(zip(args.slide, args.labels, strict=True)), cfg,
                                      sources=sources, label_scales=scales, mpps=mpps),
                   TextProgress())
        ps.save(args.out, overwrite=args.overwrite)
        counts = dict(zip(ps.classes, ps.counts().tolist(), strict=True))
        print(f"{args.out}: {len(ps)} patches {counts} from {len(ps.slides)} slide(s), "
              f"{ps.patch_size} px at {ps.read_mpp or 'unknown'} µm/px")
        if args.cache:
            drive(cache_patches_job(ps, args.cache, overwrite=args.overwrite), TextProgress())
            print(f"{args.cache}: pixel cache written")

    return run


# --------------------------------------------------------------------------------------
def _load_sets(paths: list[str], cache: str | None = None):
    from ..train.datasets import PatchSet

    sets = [PatchSet.load(p) for p in paths]
    ps = PatchSet.concat(sets)
    if cache:
        ps.attach_cache(cache)
    return ps


def _split(ps, args):
    from ..errors import InputError
    from ..train.datasets import split_by_region, split_by_slide

    chosen = [bool(args.holdout_region), bool(args.val_slides), args.val_fraction is not None]
    if sum(chosen) > 1:
        raise InputError("choose one of --holdout-region, --val-slides, --val-fraction")
    if args.holdout_region:
        box = _floats(args.holdout_region, 4, "--holdout-region")
        return split_by_region(ps, box, slide=args.holdout_slide, margin=args.holdout_margin)
    if args.val_slides:
        return split_by_slide(ps, test=[s.strip() for s in args.val_slides.split(",")])
    if args.val_fraction is not None:
        return split_by_slide(ps, test_fraction=args.val_fraction, seed=args.seed)
    return ps, None


def _add_split(p):
    g = p.add_argument_group("held-out data (split by slide or region, never by patch)")
    g.add_argument("--holdout-region", default=None, metavar="ROW0,COL0,ROW1,COL1",
                   help="level-0 rectangle held out (patches across its border are dropped)")
    g.add_argument("--holdout-slide", default=None,
                   help="slide the region refers to (default: every slide)")
    g.add_argument("--holdout-margin", type=float, default=0.0,
                   help="gap in level-0 px between the region and training patches")
    g.add_argument("--val-slides", default=None, help="comma-separated slide names held out")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this fraction of the slides (at random, --seed)")


@command("train", help="Train a patch classifier on patch sets (checkpoints, logs, metrics)")
def train(p: argparse.ArgumentParser):
    from ..models.registry import list_architectures
    from ..train.options import AUGMENT_PRESETS as PRESETS
    from ..train.options import OPTIMIZERS, SCHEDULERS, augment_name

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG_TRAIN
    p.add_argument("patches", nargs="+", help="patch sets from lnmeta make-patches (.npz)")
    add_out(p, "run folder for checkpoints and logs")
    p.add_argument("--val", nargs="+", default=None, help="separate validation patch sets")
    _add_split(p)
    p.add_argument("--mix", action="append", metavar="SOURCE=FRACTION",
                   help="mix training patches by source, e.g. --mix local=0.5 --mix camelyon16=0.5")
    p.add_argument("--cache", default=None, help="zarr pixel cache from make-patches --cache")
    p.add_argument("--in-memory", action="store_true",
                   help="read every patch into memory first (fast when the set fits in RAM)")
    m = p.add_argument_group("model")
    m.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a seed's settings (see below); explicit options win")
    m.add_argument("--arch", default="resnet18", metavar="ARCH",
                   help="backbone: " + ", ".join(list_architectures())
                        + " or timm:MODEL (default resnet18)")
    m.add_argument("--head", choices=["softmax", "sigmoid"], default="softmax")
    m.add_argument("--init", default=None,
                   help="initial weights: imagenet, torchvision:ARCH.WEIGHTS, timm:MODEL.TAG, "
                        "hf-hub:ORG/NAME, a known name (lnmeta models list), a folder or a "
                        ".safetensors file")
    m.add_argument("--freeze", type=int, default=0, help="freeze the first N stages")
    m.add_argument("--freeze-convs", type=int, default=0,
                   help="freeze the first N conv layers (seed 000: 3)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=64)
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--scheduler", choices=SCHEDULERS, default="cosine")
    o.add_argument("--max-lr", type=float, default=None, help="peak LR of onecycle")
    o.add_argument("--t0", type=int, default=5, help="cosine_restarts period (epochs)")
    o.add_argument("--t-mult", type=int, default=1)
    o.add_argument("--plateau-factor", type=float, default=0.1)
    o.add_argument("--plateau-patience", type=int, default=5)
    o.add_argument("--early-stopping", type=int, default=None, metavar="EPOCHS")
    o.add_argument("--monitor", default="val_loss",
                   choices=["val_loss", "val_auc", "val_acc", "val_f1", "train_loss"])
    o.add_argument("--augment", choices=PRESETS, default="none", type=augment_name,
                   help="photometric: seed 000's; policy-*: seed 003's; dihedral-jitter: seed "
                        "004's (the earlier names seed000, seed003[-POLICY], seed004 are "
                        "still accepted)")
    o.add_argument("--sampler", choices=["shuffle", "balanced"], default="shuffle",
                   help="balanced: equal patches per class each epoch (negatives re-drawn)")
    o.add_argument("--epoch-size", type=int, default=None, help="patches per epoch")
    o.add_argument("--normalise", choices=["dataset", "imagenet", "pretrained"],
                   default="dataset",
                   help="input mean/std: of the training patches, ImageNet's, or the named "
                        "--init's own (foundation models)")
    _track_explicit(p)
    o.add_argument("--l1", type=float, default=0.0)
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--max-steps", type=int, default=None)
    o.add_argument("--val-every", type=int, default=1, metavar="EPOCHS",
                   help="validate every N epochs (and after the last)")
    r = p.add_argument_group("run")
    add_device(r)
    r.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    r.add_argument("--workers", type=int, default=2, help="patch-reading threads")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    r.add_argument("--save-dtype", choices=["float16", "bfloat16"], default=None)
    r.add_argument("--tensorboard", action="store_true")
    r.add_argument("--resume", action="store_true", help="continue the run in --out")
    r.add_argument("--eval", action="store_true",
                   help="evaluate the final model on the held-out set into OUT/eval")
    r.add_argument("--export", default=None,
                   help="copy the final model (last.safetensors) to this path")
    add_overwrite(p)

    def run(args):
        from ..errors import InputError
        from ..models.backbones import architecture_for
        from ..models.registry import get_arch
        from ..progress import TextProgress
        from ..progress import run as drive
        from ..train.datasets import mix
        from ..train.loop import TrainConfig, train_job

        _fill_defaults(args)
        if args.recipe:
            apply_recipe(args, p)
        arch = get_arch(args.arch).name
        args.arch = architecture_for(args.init, arch)
        if args.arch != arch and "arch" in args._explicit \
                and args.arch.split("{")[0] != arch.split("{")[0]:
            raise InputError(f"--init {args.init} is a {args.arch}, not a {arch}; leave "
                             "--arch out")
        ps = _load_sets(args.patches, args.cache)
        train_set, val_set = _split(ps, args)
        if args.val:
            if val_set is not None:
                raise InputError("give --val or a split option, not both")
            val_set = _load_sets(args.val)
        if args.mix:
            props = {k: float(v) for k, v in _pairs(args.mix, "--mix").items()}
            src = train_set.sources()
            parts = {s: train_set.subset(src == s) for s in props}
            train_set = mix(parts, props, seed=args.seed)
        cfg = TrainConfig(architecture=args.arch, head=args.head, epochs=args.epochs,
                          batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                          weight_decay=args.weight_decay, momentum=args.momentum,
                          scheduler=args.scheduler, max_lr=args.max_lr, t0=args.t0,
                          t_mult=args.t_mult, plateau_factor=args.plateau_factor,
                          plateau_patience=args.plateau_patience,
                          early_stopping=args.early_stopping, monitor=args.monitor,
                          freeze=args.freeze, freeze_convs=args.freeze_convs, init=args.init,
                          augment=args.augment, sampler=args.sampler, epoch_size=args.epoch_size,
                          normalise=args.normalise, l1=args.l1,
                          label_smoothing=args.label_smoothing, seed=args.seed,
                          deterministic=args.deterministic, device=args.device,
                          amp=not args.no_amp, workers=args.workers, max_steps=args.max_steps,
                          val_every=args.val_every, checkpoint_every=args.checkpoint_every, save_dtype=args.save_dtype,
                          tensorboard=args.tensorboard)
        announce_sets(train_set, val_set, in_memory=args.in_memory)
        res = drive(train_job(cfg, train_set, val_set, out_dir=args.out, resume=args.resume,
                              overwrite=args.overwrite), TextProgress())
        report_and_export(res, args, unit="patches")
        _print_init(res.last)
        if args.eval and val_set is not None:
            from ..train.evaluate import evaluate_job, write_patch_report

            ev = drive(evaluate_job(res.last, val_set, device=args.device,
                                    workers=args.workers), TextProgress())
            write_patch_report(ev, Path(args.out) / "eval", val_set, overwrite=True)
            _print_metrics(ev.metrics)

    return run


def _print_init(model_path) -> None:
    """The provenance of a pretrained init (id + weights hash) of a written model."""
    from ..models.io import read_meta

    init = read_meta(model_path).extra.get("init")
    if init:
        print(f"init: {init['id']} (sha256 {init['weights_sha256'][:16]})")


def _print_metrics(m: dict) -> None:
    keys = ["ACC", "SEN", "SPE", "PPV", "NPV", "F1", "F1_weighted", "AUC"]
    for k in keys:
        if k in m:
            ci = m.get(f"{k}_CI")
            extra = f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            print(f"{k:12s} {m[k]:.4f}{extra}")
    if "confusion" in m:
        print(f"confusion    {m['confusion']}")


@command("evaluate", help="Evaluate a model on held-out patches: metrics with CIs, ROC, per-slide table")
def evaluate(p: argparse.ArgumentParser):
    p.add_argument("model", help="model file (.safetensors)")
    p.add_argument("patches", nargs="+", help="held-out patch sets (.npz)")
    add_out(p, "folder for metrics.json, roc.png, predictions.csv", required=False)
    p.add_argument("--holdout-region", default=None, metavar="ROW0,COL0,ROW1,COL1",
                   help="evaluate only patches inside this level-0 rectangle")
    p.add_argument("--holdout-slide", default=None)
    p.add_argument("--compare", default=None,
                   help="a second model: DeLong test of the two AUCs on the same patches")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates for the AUC CI")
    p.add_argument("--batch-size", type=int, default=256)
    add_device(p)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_overwrite(p)

    def run(args):
        from ..core.metrics import delong_test
        from ..progress import TextProgress
        from ..progress import run as drive
        from ..train.datasets import split_by_region
        from ..train.evaluate import evaluate_job, write_patch_report

        ps = _load_sets(args.patches)
        if args.holdout_region:
            _, ps = split_by_region(ps, _floats(args.holdout_region, 4, "--holdout-region"),
                                    slide=args.holdout_slide)
        ps.load_pixels()
        ev = drive(evaluate_job(args.model, ps, device=args.device, batch_size=args.batch_size,
                                threshold=args.threshold, n_boot=args.n_boot,
                                workers=args.workers), TextProgress())
        out = {"model": args.model, "n": len(ps),
               "counts": dict(zip(ps.classes, ps.counts().tolist(), strict=True)),
               "metrics": ev.metrics}
        if args.compare:
            ev2 = drive(evaluate_job(args.compare, ps, device=args.device,
                                     batch_size=args.batch_size, n_boot=args.n_boot,
                                     workers=args.workers), TextProgress())
            out["compare"] = {"model": args.compare, "metrics": ev2.metrics,
                              "delong": delong_test(ev.labels, ev.score, ev2.score).to_dict()}
        if args.out:
            write_patch_report(ev, args.out, ps, overwrite=args.overwrite)
            if args.compare:
                from ..io.atomic import write_text_atomic

                write_text_atomic(Path(args.out) / "delong.json",
                                  jsonio.dumps(out["compare"]["delong"], indent=2), overwrite=True)
        if args.json:
            print(jsonio.dumps(out, indent=2, default=float))
        else:
            print(f"{args.model}: {len(ps)} patches {out['counts']}")
            _print_metrics(ev.metrics)
            if args.compare:
                d = out["compare"]["delong"]
                print(f"DeLong vs {args.compare}: AUC {d['auc1']:.4f} vs {d['auc2']:.4f}, "
                      f"z={d['z']:.3f}, p={d['p']:.4g}")

    return run


def announce_sets(train_set, val_set, *, in_memory: bool) -> None:
    """Print the training and validation sets; load their pixels for ``--in-memory``."""
    print(f"train: {train_set}" + (f"\nval:   {val_set}" if val_set is not None else ""),
          file=sys.stderr)
    if in_memory:
        train_set.load_pixels()
        if val_set is not None:
            val_set.load_pixels()


def report_and_export(res, args, *, unit: str) -> None:
    """Print a training run's summary line and copy its last model to ``--export``."""
    last = res.history[-1] if res.history else {}
    print(f"{res.out_dir}: {res.steps} steps in {res.seconds:.0f} s "
          f"({res.patches_per_second:.1f} {unit}/s); last epoch: "
          + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
    if args.export:
        from ..io.atomic import atomic_path

        with atomic_path(args.export, overwrite=args.overwrite) as tmp:
            shutil.copyfile(res.last, tmp)
        print(f"{args.export}: exported {res.last.name}")

