"""``lnmeta extract-features``, ``lnmeta train-mil`` and ``lnmeta mil``: slide-level MIL.

Thin wrappers over :mod:`napari_lnmeta.core.features`, :mod:`napari_lnmeta.train.mil` and
:mod:`napari_lnmeta.core.mil` (see ``docs/mil.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..io import jsonio
from ..io.validate import mpp_arg
from . import add_device, add_mpp, add_out, add_overwrite, command, warn


def _pooling_name(name: str) -> str:
    """A ``--pooling`` value, its earlier name ``seed002`` read as ``maxpool_attention``."""
    return {"seed002": "maxpool_attention"}.get(name, name)


def _add_feature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--recipe", choices=sorted(MIL_RECIPES), default=None,
                   help="seed002: VGG16-BN ImageNet features of 256 px patches; seed003: "
                        "VGG13-BN ImageNet features. ImageNet weights are used when they are "
                        "in the torch cache (else it says so); explicit options win")
    g.add_argument("--backbone", default=None,
                   help="registry architecture (resnet18, vgg16_bn, densenet121, "
                        "lnmeta_cnn_small, ...), a pretrained name from the local cache "
                        "(uni, virchow2, hf-hub:ORG/NAME, timm:MODEL.TAG, a folder; see "
                        "`lnmeta models list`) or a trained patch-model .safetensors file "
                        "(its penultimate layer); default resnet18")
    g.add_argument("--init", default=None,
                   help="weights for a registry backbone: imagenet (torchvision weights from "
                        "the torch cache), torchvision:ARCH.WEIGHTS or a .safetensors file; "
                        "without it the backbone is randomly initialised from --seed")
    g.add_argument("--backbone-seed", type=int, default=0,
                   help="seed of a random backbone initialisation (default 0)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="patch side in pixels (default: the model file's, else 256)")
    g.add_argument("--stride", type=int, default=None, help="grid stride (default: patch size)")
    g.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None,
                   help="read patches at this µm/px (default: the model file's, else --level)")
    g.add_argument("--level", type=int, default=None, help="read patches at this pyramid level")
    g.add_argument("--min-tissue", type=float, default=0.5,
                   help="minimum tissue fraction of a patch (default 0.5)")
    g.add_argument("--entropy-min", type=float, default=None,
                   help="drop patches whose grey-level entropy (bits) is lower (seed 003)")
    g.add_argument("--tissue-mpp", type=mpp_arg("--tissue-mpp"), default=10.0,
                   help="µm/px of tissue detection (default 10)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="patches per forward pass; 0 = as many as fit the free GPU memory")
    add_device(g)
    g.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
    g.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")


#: the MIL seeds' backbones (seed 002: VGG16-BN, 256 px patches; seed 003: VGG13-BN)
MIL_RECIPES = {"seed002": {"backbone": "vgg16_bn", "patch_size": 256},
               "seed003": {"backbone": "vgg13_bn"}}


def _apply_recipe(args) -> None:
    """``--recipe``: the seed's backbone (and patch size) unless given; ImageNet init when
    the weights are cached, else one line saying they are not (random initialisation)."""
    from ..errors import ModelError
    from ..models.backbones import resolve

    if args.recipe is None:
        if args.backbone is None:
            args.backbone = "resnet18"
        return
    rec = MIL_RECIPES[args.recipe]
    if args.backbone is None:
        args.backbone = rec["backbone"]
    if args.patch_size is None and "patch_size" in rec:
        args.patch_size = rec["patch_size"]
    if args.init is None and args.backbone == rec["backbone"]:
        try:
            src = resolve("imagenet", args.backbone)
        except ModelError as e:
            print(f"recipe {args.recipe}: ImageNet weights are not cached, using a random "
                  f"initialisation ({e.problem})", file=sys.stderr)
        else:
            args.init = "imagenet"
            print(f"recipe {args.recipe}: init from {src.id} ({src.weights_file})",
                  file=sys.stderr)


def _feature_config(args):
    from ..core.features import FeatureConfig
    from ..models.io import resolve_device

    resolve_device(args.device)  # a device this machine lacks fails before any work
    _apply_recipe(args)
    return FeatureConfig(backbone=args.backbone, init=args.init, seed=args.backbone_seed,
                         patch_size=args.patch_size, stride=args.stride, patch_mpp=args.patch_mpp,
                         level=args.level, min_tissue=args.min_tissue,
                         entropy_min=args.entropy_min, tissue_mpp=args.tissue_mpp,
                         batch_size=args.batch_size, device=args.device, amp=args.amp,
                         dtype=args.feature_dtype)


def _progress():
    from ..progress import TextProgress

    return TextProgress()


# --------------------------------------------------------------------------------------
@command("extract-features", help="Compute (or reuse) per-slide patch features for MIL")
def extract_features(p):
    p.add_argument("slides", nargs="+", help="slide files")
    p.add_argument("--cache-dir", default=None,
                   help="folder of feature caches (one <slide>.<backbone>.<key>.features.zarr "
                        "per slide, reused when the settings match)")
    add_out(p, "exact output .features.zarr (one slide only)", required=False)
    p.add_argument("--regions", default=None,
                   help="annotation file: only patches inside its regions (seed 002)")
    p.add_argument("--region-scale", type=float, default=1.0,
                   help="slide pixels per annotation pixel (e.g. 0.03125 for level-0 "
                        "polygons on a level-5 image)")
    _add_feature_options(p)
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..core.features import slide_features_job
        from ..errors import InputError
        from ..io.slide import open_slide
        from ..models.extractor import load_extractor
        from ..progress import run as drive

        if (args.cache_dir is None) == (args.out is None):
            raise InputError("give --cache-dir DIR or -o OUT.features.zarr")
        if args.out is not None and len(args.slides) != 1:
            raise InputError("-o takes one slide; use --cache-dir for several")
        cfg = _feature_config(args)
        ext = load_extractor(cfg.backbone, init=cfg.init, seed=cfg.seed,
                             patch_size=cfg.patch_size)
        for s in args.slides:
            slide = open_slide(s, mpp=args.mpp)
            cache = drive(slide_features_job(slide, cfg, cache_dir=args.cache_dir, out=args.out,
                                             regions=args.regions,
                                             region_scale=args.region_scale, extractor=ext,
                                             overwrite=args.overwrite), _progress())
            print(f"{cache.path}\t{len(cache)} patches x {cache.dim}\t{cache.backbone.id}")

    return run


# --------------------------------------------------------------------------------------
@command("train-mil", help="Train attention MIL on slide labels (seeds 002/003)")
def train_mil(p):
    p.add_argument("table", help="CSV with a 'slide' (slide file) or 'features' (feature "
                                 "cache) column, a 'label' column (class name or index), and "
                                 "optional 'split' (train/val/test), 'regions' and clinical "
                                 "columns; paths are relative to the CSV's folder")
    add_out(p, "checkpoints, best.safetensors, metrics.json, history.json, splits.csv",
            metavar="OUT_DIR", old=("--out-dir",))
    p.add_argument("--classes", default=None,
                   help="class names in label order, comma-separated (default N0,N+ or "
                        "N0,N+(1-2),N+(>=3) when the labels are those)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default OUT_DIR/features)")
    p.add_argument("--clinical", default=None,
                   help="clinical CSV joined on the slide column (default: the table itself)")
    p.add_argument("--numeric", default="", help="numeric clinical columns, comma-separated")
    p.add_argument("--categorical", default="",
                   help="categorical clinical columns, comma-separated")
    p.add_argument("--region-scale", type=float, default=1.0,
                   help="slide pixels per annotation pixel of the 'regions' files")
    _add_feature_options(p)
    g = p.add_argument_group("MIL")
    g.add_argument("--pooling", default="gated_attention",
                   type=_pooling_name,
                   choices=("attention", "gated_attention", "maxpool_attention", "mean", "max"),
                   help="maxpool_attention: the seed-002 variant (earlier name 'seed002', "
                        "still accepted)")
    g.add_argument("--bag-size", type=int, default=16, help="N: patches per bag (default 16)")
    g.add_argument("--bags", type=int, default=10, help="M: bags per slide (default 10)")
    g.add_argument("--replace", action="store_true",
                   help="sample bags with replacement (allows slides with fewer than N patches)")
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--mil-batch", type=int, default=8, help="bags per optimisation step")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam (seed 002) or sgd (seed 003; use with --l1 1e-6)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight-decay", type=float, default=1e-3)
    g.add_argument("--l1", type=float, default=0.0, help="L1 weight (seed 003: 1e-6)")
    g.add_argument("--t0", type=int, default=10, help="epochs per cosine warm-restart cycle")
    g.add_argument("--embed-dim", type=int, default=128, help="0: no embedding layer")
    g.add_argument("--attn-dim", type=int, default=128)
    g.add_argument("--dropout", type=float, default=0.25)
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--val-fraction", type=float, default=0.25)
    g.add_argument("--patience", type=int, default=None, help="early stopping (epochs)")
    g.add_argument("--seed", type=int, default=0)
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..progress import run as drive
        from ..train.mil import MILTrainConfig, train_mil_job
        from ..train.mil_cohort import mil_cohort_job

        table = Path(args.table)
        out_dir = Path(args.out)
        cfg = _feature_config(args)
        tp = _progress()
        cohort = drive(mil_cohort_job(
            table, cfg, cache_dir=Path(args.cache_dir) if args.cache_dir else out_dir / "features",
            classes=args.classes, mpp=args.mpp, clinical=args.clinical,
            numeric=[c.strip() for c in args.numeric.split(",") if c.strip()],
            categorical=[c.strip() for c in args.categorical.split(",") if c.strip()],
            region_scale=args.region_scale, test_fraction=args.test_fraction,
            val_fraction=args.val_fraction, seed=args.seed), tp)
        tcfg = MILTrainConfig(pooling=args.pooling, embed_dim=args.embed_dim or None,
                              attn_dim=args.attn_dim, dropout=args.dropout,
                              bag_size=args.bag_size, bags_per_slide=args.bags,
                              replace=args.replace, epochs=args.epochs,
                              batch_size=args.mil_batch, optimizer=args.optimizer, lr=args.lr,
                              weight_decay=args.weight_decay, l1=args.l1, t0=args.t0,
                              test_fraction=args.test_fraction, val_fraction=args.val_fraction,
                              patience=args.patience, seed=args.seed, device=args.device)
        res = drive(train_mil_job(cohort.slides, tcfg, classes=cohort.classes,
                                  backbone=cohort.backbone, clinical=cohort.clinical,
                                  splits=cohort.splits, out_dir=out_dir,
                                  overwrite=args.overwrite, features_meta=cohort.features_meta,
                                  extra={"table": str(table)}), tp)
        print(f"model: {res.model_path} (best epoch {res.best_epoch})")
        for split in ("val", "test"):
            m = res.metrics.get(split)
            if m:
                auc = m.get("AUC")
                ci = m.get("AUC_CI") or [None, None]
                txt = f"AUC {auc:.3f}" if auc is not None else "AUC n/a"
                if ci[0] is not None:
                    txt += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                acc = m.get("ACC")
                print(f"{split}: n={m.get('n')} {txt} ACC {acc:.3f}" if acc is not None
                      else f"{split}: n={m.get('n')} {txt}")

    return run


# --------------------------------------------------------------------------------------
@command("mil", help="Slide-level MIL prediction: class probabilities + attention heatmap")
def mil(p):
    p.add_argument("slide", help="slide file")
    add_out(p, "writes attention.ome.zarr and summary.json here", metavar="OUT_DIR",
            old=("--out-dir",))
    p.add_argument("--model", required=True, help="MIL model (.safetensors from train-mil)")
    p.add_argument("--clinical", default=None,
                   help="CSV with the slide's clinical values (a 'slide' column picks the "
                        "row; a one-row CSV needs none)")
    p.add_argument("--features", default=None,
                   help="a feature cache of this slide (skips extraction)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default OUT_DIR/features)")
    p.add_argument("--bags", type=int, default=32, help="M: bags averaged (default 32)")
    p.add_argument("--bag-size", type=int, default=None,
                   help="N: patches per bag (default: the model's)")
    p.add_argument("--replace", action="store_true",
                   help="sample with replacement (slides with fewer than N patches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regions", default=None,
                   help="annotation file: bags only from its regions (seed 002 models)")
    p.add_argument("--region-scale", type=float, default=1.0)
    add_device(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--top-k", type=int, default=16, help="top-attended patches in the summary")
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..core.mil import MILInferenceConfig, predict_slide_job
        from ..io.slide import open_slide
        from ..models.clinical import clinical_row
        from ..models.io import resolve_device
        from ..models.mil import read_mil_info
        from ..progress import run as drive

        resolve_device(args.device)
        slide = open_slide(args.slide, mpp=args.mpp)
        info = read_mil_info(args.model)
        clinical = None
        if args.clinical:
            clinical = clinical_row(args.clinical, slide.name)
            if info.clinical is None:
                warn("the model uses no clinical data; --clinical is ignored")
                clinical = None
        cfg = MILInferenceConfig(bags=args.bags, bag_size=args.bag_size, replace=args.replace,
                                 seed=args.seed, device=args.device, batch_size=args.batch_size,
                                 top_k=args.top_k, cache_dir=args.cache_dir)
        res = drive(predict_slide_job(slide, args.model, config=cfg, clinical=clinical,
                                      features=args.features, regions=args.regions,
                                      region_scale=args.region_scale, out_dir=args.out,
                                      overwrite=args.overwrite,
                                      clinical_source=str(args.clinical)), _progress())
        for note in res.extra.get("notes") or []:
            print(f"note: {note}", file=sys.stderr)
        probs = ", ".join(f"{c}: {p:.3f}" for c, p in zip(res.classes, res.probabilities,
                                                          strict=True))
        print(jsonio.dumps({"slide": res.slide, "predicted": res.predicted}) + f"  ({probs})")
        print(f"wrote {Path(args.out) / 'attention.ome.zarr'} and "
              f"{Path(args.out) / 'summary.json'}")

    return run
