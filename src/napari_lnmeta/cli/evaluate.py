"""``lnmeta evaluate-slides`` (CAMELYON16 slide AUC + FROC) and ``lnmeta separability`` (seed 001)."""

from __future__ import annotations

import sys

from ..io import jsonio
from ..io.validate import mpp_arg, positive_arg
from . import add_device, add_out, add_overwrite, command

_EPILOG_SLIDES = """\
PRED_DIR holds lnmeta prediction folders (summary.json + lesions.geojson, as written by
`lnmeta predict` or `lnmeta batch --step predict`, at any depth up to 3), or flat files
<slide>.geojson (lesion points) / <slide>.csv (CAMELYON16 submission: p, x, y in level-0
pixels) with an optional scores.csv (slide, score).

TRUTH_DIR holds one file per slide, matched by name (case-insensitive; suffixes such as
_mask, _tumor_mask, _evaluation_mask are ignored): CAMELYON16 XML, NCRF JSON or QuPath
GeoJSON polygons in level-0 pixels, an OME-Zarr mask, or a PNG/TIFF mask covering the
slide. An annotation with no tumour is a negative slide; a slide without any file is
skipped unless --negatives lists it.

rules (CAMELYON16): regions dilated by 75 um (diameter), holes filled, 8-connected;
regions with a major axis < 200 um (+75 after dilation) are isolated tumour cells, neither
hit nor missed; one hit per region, duplicates ignored; detections elsewhere are false
positives. FROC score = mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 FPs per slide.

outputs in REPORT_DIR: report.json, slides.csv (per slide + mean and sd rows),
detections.csv (every detection with its outcome), roc.png, froc.png.
"""

_EPILOG_SEP = """\
A and B are folders of patch images (searched recursively) or slides (patches over
tissue). Features of a backbone without its head (random weights unless --init; nothing is
downloaded) -> PCA (2) -> k-means (k=2); accuracy after Hungarian matching of clusters to
sources, silhouette and adjusted Rand index, before and after stain normalisation.
Accuracy near 0.5 and ARI near 0: the sources are not separable (seed 001).

outputs in OUT: separability.json, separability.png (PCA scatter), points.csv.
"""


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@command("evaluate-slides", help="CAMELYON16 evaluation of slide predictions: slide-level "
                                 "ROC AUC (bootstrap CI) and lesion FROC")
def evaluate_slides(p):
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG_SLIDES
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predictions")
    p.add_argument("truth_dir", metavar="TRUTH_DIR", help="folder of ground-truth files")
    add_out(p, "report folder", metavar="REPORT_DIR")
    p.add_argument("--negatives", default=None, metavar="FILE|NAMES",
                   help="tumour-free slides without a ground-truth file: a text/CSV file (one "
                        "slide per line; CAMELYON reference.csv keeps its Normal rows) or "
                        "comma-separated names")
    p.add_argument("--mpp", type=mpp_arg("--mpp"), default=None,
                   help="level-0 µm/px of the slides when the predictions do not say")
    p.add_argument("--truth-scale", type=positive_arg("--truth-scale"), default=1.0, metavar="S",
                   help="slide pixels per polygon-file pixel (e.g. 0.03125 for level-0 "
                        "CAMELYON polygons on a level-5 slide)")
    p.add_argument("--mask-downsample", type=float, default=None, metavar="D",
                   help="level-0 pixels per mask pixel of PNG/TIFF masks (default: from the "
                        "slide size in summary.json)")
    p.add_argument("--eval-mpp", type=mpp_arg("--eval-mpp"), default=7.776, metavar="UM",
                   help="µm/px at which the rules are applied (polygons rasterised, finer "
                        "masks reduced); default CAMELYON16 level 5")
    p.add_argument("--dilation", type=float, default=75.0, metavar="UM",
                   help="growth of each region's diameter (µm)")
    p.add_argument("--itc", type=float, default=200.0, metavar="UM",
                   help="isolated tumour cells: regions smaller than this (µm)")
    p.add_argument("--lesions", choices=("file", "nms", "components"), default="file",
                   help="detections from lesions.geojson (file) or recomputed from the "
                        "heatmap by NMS or connected components (CAMELYON16 winner)")
    p.add_argument("--lesion-threshold", type=float, default=0.5)
    p.add_argument("--lesion-radius", type=float, default=200.0, metavar="UM",
                   help="NMS radius (µm) when recomputing")
    p.add_argument("--score", choices=("max", "top_k_mean"), default="max",
                   help="slide score from summary.json")
    p.add_argument("--slide-threshold", type=float, default=0.5,
                   help="slide score above which a slide is called tumour (ACC/SEN/SPE)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of the AUC CI")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    add_overwrite(p)

    def run(args):

        from ..core.froc import FrocConfig, evaluate_folders_job, write_report
        from ..progress import TextProgress
        from ..progress import run as drive

        cfg = FrocConfig(dilation_um=args.dilation, itc_um=args.itc, eval_mpp=args.eval_mpp,
                         truth_scale=args.truth_scale, mpp=args.mpp,
                         mask_downsample=args.mask_downsample, lesions=args.lesions,
                         lesion_threshold=args.lesion_threshold,
                         lesion_radius_um=args.lesion_radius, score=args.score,
                         slide_threshold=args.slide_threshold, n_boot=args.n_boot)
        # refuse an existing report before any work
        from pathlib import Path

        from ..core.froc import REPORT_FILES
        from ..errors import OutputExistsError

        if not args.overwrite:
            for name in REPORT_FILES:
                if (Path(args.out) / name).exists():
                    raise OutputExistsError(Path(args.out) / name)
        rep = drive(evaluate_folders_job(args.pred_dir, args.truth_dir, cfg,
                                         negatives=args.negatives), TextProgress())
        write_report(rep, args.out, overwrite=args.overwrite,
                     inputs=(args.pred_dir, args.truth_dir))
        for s in rep.skipped:
            print(f"lnmeta: skipped {s['slide']}: {s['reason']}", file=sys.stderr)
        for n in rep.notes:
            print(f"lnmeta: note: {n}", file=sys.stderr)
        if args.json:
            print(jsonio.dumps(rep.to_json(), indent=1))
        else:
            print(f"slides:    {len(rep.slides)} evaluated, {len(rep.skipped)} skipped")
            if rep.roc:
                r = rep.roc
                print(f"slide AUC: {r['AUC']:.3f} [{r['AUC_CI'][0]:.3f}, {r['AUC_CI'][1]:.3f}] "
                      f"({r['n_tumour']} tumour, {r['n_normal']} normal); at "
                      f"{r['threshold']:g}: ACC {_fmt(r['ACC'])} SEN {_fmt(r['SEN'])} "
                      f"SPE {_fmt(r['SPE'])}")
            if rep.froc:
                f = rep.froc
                pts = ", ".join(f"{x:g}: {s:.3f}" for x, s in zip(f["fp_rates"], f["sensitivity"],
                                                                  strict=True))
                print(f"FROC:      {f['score']:.3f} ({f['n_tumours']} lesions, {f['n_itc']} "
                      f"ITC regions ignored); sensitivity at FPs/slide {pts}")
            print(f"written:   {args.out}")
        if not rep.slides:
            print("lnmeta: error: no slide could be evaluated (see the 'skipped' list in "
                  f"{Path(args.out) / 'report.json'})", file=sys.stderr)
            return 2
        return 0

    return run


@command("separability", help="Seed-001 dataset separability of two patch sources: features "
                              "-> PCA -> k-means, Hungarian accuracy, silhouette, ARI, before "
                              "and after stain normalisation")
def separability(p):
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG_SEP
    p.add_argument("a", metavar="A", help="first source: folder of patch images or a slide")
    p.add_argument("b", metavar="B", help="second source")
    add_out(p, "output folder", metavar="OUT")
    p.add_argument("--backbone", default="resnet18",
                   help="registry architecture (random weights unless --init) or an lnmeta "
                        "model file (.safetensors)")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="safetensors weights for the backbone (e.g. converted ImageNet)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="resize patches to this side (default: A's first patch; 224 for slides)")
    p.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None, metavar="UM",
                   help="read slide patches at this µm/px (default level 0)")
    p.add_argument("--max-patches", type=int, default=500, help="per source (random subset)")
    p.add_argument("--stain", choices=("macenko", "vahadane", "reinhard", "none"),
                   default="macenko", help="normalisation for the second run (none: skip it)")
    p.add_argument("--stain-target", default=None, metavar="JSON",
                   help="stain target (default: fitted on patches of both sources)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    p.add_argument("--batch-size", type=int, default=32)
    add_overwrite(p)

    def run(args):
        from pathlib import Path

        from ..core.separability import (
            SEPARABILITY_FILES,
            SeparabilityConfig,
            separability_job,
            write_separability,
        )
        from ..errors import OutputExistsError
        from ..progress import TextProgress
        from ..progress import run as drive

        if not args.overwrite:
            for name in SEPARABILITY_FILES:
                if (Path(args.out) / name).exists():
                    raise OutputExistsError(Path(args.out) / name)
        device = args.device
        if device == "auto":
            from ..models.io import resolve_device

            device = str(resolve_device("auto"))
        cfg = SeparabilityConfig(backbone=args.backbone, init=args.init,
                                 patch_size=args.patch_size, max_patches=args.max_patches,
                                 patch_mpp=args.patch_mpp,
                                 stain=None if args.stain == "none" else args.stain,
                                 stain_target=args.stain_target, seed=args.seed,
                                 batch_size=args.batch_size, device=device)
        res = drive(separability_job(args.a, args.b, cfg), TextProgress())
        write_separability(res, args.out, config=cfg, overwrite=args.overwrite,
                           inputs=(args.a, args.b))
        for key, r in res.items():
            print(f"{key:11s} accuracy {r.accuracy:.3f}  silhouette {r.silhouette:.3f}  "
                  f"ARI {r.ari:.3f}  (n = {int((r.source == 0).sum())} + "
                  f"{int((r.source == 1).sum())})")
        print(f"written:    {args.out}")
        return 0

    return run
