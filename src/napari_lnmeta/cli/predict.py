"""``lnmeta predict``: tumour heatmap, maps, lesions and summary of a slide, resumably."""

from __future__ import annotations

import sys

from ..io import jsonio
from ..io.validate import mpp_arg, positive_arg
from . import add_device, add_mpp, add_out, add_overwrite, command, warn


@command("predict", help="Detect metastases in a slide: probability heatmap, 3-tier map, "
                         "lesions, overview and summary in OUT_DIR")
def predict(p):
    p.add_argument("slide", help="slide file or OME-Zarr directory")
    add_out(p, metavar="OUT_DIR",
            help="result folder (probability.ome.zarr, summary.json, lesions.geojson, "
                 "overview.png ...); an unfinished run there is resumed")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="model file (.safetensors); default: the bundled model")
    add_mpp(p)
    p.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None, metavar="UM",
                   help="read patches at this µm/px (default: the model's)")
    p.add_argument("--level", type=int, default=None, help="read this pyramid level instead")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch side in read pixels (default: the model's; must match it)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between patches in read pixels (default: the patch size)")
    p.add_argument("--tta", action="store_true",
                   help="average the 8 dihedral transforms (seed 004)")
    add_device(p)
    p.add_argument("--batch-size", type=int, default=0,
                   help="patches per forward pass (0 = from free memory)")
    p.add_argument("--workers", type=int, default=0, help="reader threads (0 = one per core)")
    p.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                   help="decode JPEG tiles in the reader threads (default) or whole tiles "
                        "on the GPU (nvJPEG; pays when few CPU cores feed a fast GPU)")
    p.add_argument("--on-corrupt-tile", choices=("fail", "skip"), default="fail",
                   help="a stored tile that is damaged (fails to decode or the JPEG checks): "
                        "fail naming the tile (default), or skip it and mark the cells it "
                        "touches as unknown (NaN, counted in summary.json)")
    p.add_argument("--dtype", choices=("float16", "uint8"), default="float16",
                   help="storage type of the heatmap")
    p.add_argument("--tumour-class", default=None, help="name of the tumour class of the model")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="tissue fraction a patch needs to be analysed")
    p.add_argument("--lesion-threshold", type=float, default=0.5)
    p.add_argument("--lesion-radius", type=float, default=200.0, metavar="UM",
                   help="non-maximum suppression radius in µm")
    p.add_argument("--lesion-method", choices=("nms", "components"), default="nms",
                   help="lesion candidates by non-maximum suppression (seed 004) or one per "
                        "connected component above the threshold (CAMELYON16 winner)")
    p.add_argument("--truth", default=None, metavar="MASK",
                   help="tumour ground truth (OME-Zarr mask, CAMELYON XML/JSON, GeoJSON) for "
                        "patch-level ACC, SEN, SPE, F1, AUC in summary.json")
    p.add_argument("--truth-scale", type=positive_arg("--truth-scale"), default=1.0, metavar="S",
                   help="slide pixels per file pixel of a polygon --truth file (e.g. 0.03125 "
                        "for CAMELYON16 polygons on a level-5 image)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout")
    add_overwrite(p)

    def run(args):
        from ..core.inference import InferenceConfig
        from ..core.predict import predict_to_folder_job
        from ..io.slide import open_slide
        from ..progress import TextProgress
        from ..progress import run as drive

        slide = open_slide(args.slide, mpp=args.mpp)
        cfg = InferenceConfig(model=args.model, patch_mpp=args.patch_mpp, level=args.level,
                              patch_size=args.patch_size, stride=args.stride, tta=args.tta,
                              device=args.device, batch_size=args.batch_size,
                              workers=args.workers, decode=args.decode,
                              heatmap_dtype=args.dtype,
                              tumour_class=args.tumour_class, min_tissue=args.min_tissue,
                              lesion_threshold=args.lesion_threshold,
                              lesion_radius_um=args.lesion_radius,
                              lesion_method=args.lesion_method, compile=args.compile,
                              amp=not args.no_amp, on_corrupt_tile=args.on_corrupt_tile)
        try:
            pred = drive(predict_to_folder_job(slide, args.out, cfg, overwrite=args.overwrite,
                                           truth=args.truth, truth_scale=args.truth_scale),
                         TextProgress())
        except KeyboardInterrupt:
            print(f"\nlnmeta: interrupted; run the same command again to resume "
                  f"({args.out}/.partial)", file=sys.stderr)
            return 130
        s = pred.summary()
        if args.json:
            print(jsonio.dumps(s, indent=1, default=str))
            return 0
        t = s["timing"]
        sc = s["score"]
        print(f"slide:     {slide.path}")
        print(f"score:     max {sc['max']:.4f}  top-{sc['top_k']} mean {sc['top_k_mean']:.4f}")
        print(f"patches:   {s['counts']['patches']} ({s['counts']['positive_cells']} with p > 0.5; "
              f"tiers {s['counts']['tiers']})")
        print(f"lesions:   {s['counts']['lesions']}")
        if s["counts"].get("unknown_cells"):
            tiles = s["corrupt_tiles"]
            shown = "; ".join(f"level {t['level']} tile {tuple(t['tile'])} rows "
                              f"{t['region'][0]}-{t['region'][2]} cols {t['region'][1]}-"
                              f"{t['region'][3]}" for t in tiles[:5])
            print(f"unknown:   {s['counts']['unknown_cells']} cells (NaN) from "
                  f"{len(tiles)} corrupt tile(s): {shown}" + (" ..." if len(tiles) > 5 else ""))
        rate = t.get("patches_per_s")
        print(f"time:      {t['total_s']:.1f} s total, inference {t['inference_s']:.1f} s"
              + (f" ({rate:.0f} patches/s)" if rate else "")
              + f" on {s['device']}, batch {s['batch_size']}")
        if s["evaluation"]:
            e = s["evaluation"]
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"eval:      ACC {fmt(e['ACC'])} SEN {fmt(e['SEN'])} SPE {fmt(e['SPE'])} "
                  f"F1w {fmt(e['F1_weighted'])} AUC {fmt(e['AUC'])} (n={e['n']}, "
                  f"{e['n_ambiguous']} ambiguous left out)")
        for w in s["warnings"]:
            warn(w)
        print(f"written:   {args.out}")
        return 0

    return run
