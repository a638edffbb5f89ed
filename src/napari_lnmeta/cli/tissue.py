"""``lnmeta tissue``, ``lnmeta grid`` and ``lnmeta stain-fit``: the preprocessing commands."""

from __future__ import annotations

from ..io import jsonio
from ..io.validate import mpp_arg
from . import add_mpp, add_out, add_overwrite, command


def _open(args):
    from ..io.slide import open_slide

    return open_slide(args.slide, mpp=args.mpp)


def _add_tissue_options(p) -> None:
    from ..core.tissue import METHODS

    p.add_argument("--method", choices=METHODS, default="otsu",
                   help="otsu: Otsu on HSV saturation (default); od: Otsu on optical density "
                        "(also for grayscale); hsv: fixed saturation/brightness thresholds")
    p.add_argument("--target-mpp", type=mpp_arg("--target-mpp"), default=10.0,
                   help="µm/px of the low-resolution level analysed (default 10)")
    p.add_argument("--threshold", type=float, default=None,
                   help="fixed threshold instead of Otsu's (saturation or OD, by method)")
    p.add_argument("--min-object-um2", type=float, default=20_000.0,
                   help="drop tissue pieces smaller than this area in µm² (default 20000)")
    p.add_argument("--no-pen", action="store_true", help="keep green/blue (pen-like) pixels")


def _tissue(slide, args):
    from ..core.tissue import tissue_mask

    return tissue_mask(slide, target_mpp=args.target_mpp, method=args.method,
                       threshold=args.threshold, min_object_um2=args.min_object_um2,
                       pen=not args.no_pen)


def _describe(tm) -> str:
    mpp = f"{tm.mpp:.3g} µm/px" if tm.mpp else f"downsample {tm.downsample:g}"
    area = f", {tm.area_um2 / 1e6:.3g} mm²" if tm.area_um2 is not None else ""
    h, w = tm.mask.shape
    return (f"tissue: {100 * tm.area_fraction:.1f}% of the slide{area} "
            f"(mask {w}x{h} at {mpp}, {tm.method} threshold {tm.threshold:.3g})")


@command("tissue", help="Detect tissue at low resolution and write a Labels OME-Zarr mask")
def tissue(p):
    p.add_argument("slide", help="slide file or OME-Zarr directory")
    add_out(p, "output mask (.ome.zarr)", old=("--output",))
    _add_tissue_options(p)
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..io.atomic import claim_output

        with claim_output(args.out, overwrite=args.overwrite, inputs=[args.slide]):
            slide = _open(args)
            tm = _tissue(slide, args)
            tm.save(args.out, overwrite=args.overwrite, inputs=(args.slide,))
        print(_describe(tm))
        print(f"wrote {args.out}")

    return run


@command("grid", help="Make a patch grid over tissue (.npz: level-0 coordinates + read level)")
def grid(p):
    p.add_argument("slide", help="slide file or OME-Zarr directory")
    add_out(p, "output grid (.npz)", old=("--output",))
    p.add_argument("--patch-size", type=int, default=256, help="patch side in read pixels")
    p.add_argument("--stride", type=int, default=None, help="stride in read pixels "
                   "(default: the patch size)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None,
                     help="read patches at this µm/px (default: level 0)")
    res.add_argument("--level", type=int, default=None, help="read patches at this level")
    p.add_argument("--min-tissue", type=float, default=0.5,
                   help="minimum tissue fraction of a patch (default 0.5)")
    p.add_argument("--entropy-min", type=float, default=None,
                   help="minimum grey-level Shannon entropy in bits (seed 003; reads patches)")
    p.add_argument("--rois", default=None, help="CSV of ROI rectangles (xs, ys, xe, ye)")
    p.add_argument("--tissue", default=None,
                   help="tissue mask written by `lnmeta tissue` (default: detect it now)")
    p.add_argument("--no-tissue", action="store_true", help="keep patches anywhere")
    _add_tissue_options(p)
    add_mpp(p)
    add_overwrite(p)

    def run(args):
        from ..io.atomic import claim_output

        with claim_output(args.out, overwrite=args.overwrite, inputs=[args.slide]):
            _grid(args)

    def _grid(args):
        from ..core.tiling import make_grid_job
        from ..core.tissue import TissueMask
        from ..progress import TextProgress
        from ..progress import run as run_job

        slide = _open(args)
        tm = None
        if args.tissue:
            tm = TissueMask.load(args.tissue)
        elif not args.no_tissue:
            tm = _tissue(slide, args)
            print(_describe(tm))
        job = make_grid_job(slide, patch_size=args.patch_size, stride=args.stride,
                            mpp=args.patch_mpp, level=args.level, tissue=tm,
                            min_tissue=args.min_tissue, entropy_min=args.entropy_min,
                            rois=args.rois)
        g = run_job(job, TextProgress() if args.entropy_min is not None else None)
        g.save(args.out, overwrite=args.overwrite, inputs=(args.slide,))
        print(f"grid: {len(g)} patches of {g.patch_size} px (stride {g.stride}, "
              f"{'level ' + str(g.level) if g.level is not None else f'{g.mpp:g} µm/px'}) "
              f"out of {g.grid_shape[0]}x{g.grid_shape[1]} grid positions")
        print(f"wrote {args.out}")

    return run


@command("stain-fit", help="Fit a stain-normalisation target on a slide's tissue and save it "
                           "as JSON")
def stain_fit(p):
    from ..io.stain_target import NORMALISERS

    p.add_argument("slide", help="reference slide (or image)")
    add_out(p, "output target (.json)", old=("--output",))
    p.add_argument("--method", choices=NORMALISERS, default="macenko")
    p.add_argument("--n-patches", type=int, default=32, help="random tissue patches used")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--patch-mpp", type=mpp_arg("--patch-mpp"), default=None,
                   help="read patches at this µm/px (default 1 when the slide is finer)")
    p.add_argument("--seed", type=int, default=0)
    add_mpp(p)
    add_overwrite(p)

    def run(args):

        from ..core.stain import fit_slide_target
        from ..io.atomic import claim_output

        with claim_output(args.out, overwrite=args.overwrite, inputs=[args.slide]):
            slide = _open(args)
            t = fit_slide_target(slide, args.method, n_patches=args.n_patches,
                                 patch_size=args.patch_size, mpp=args.patch_mpp,
                                 seed=args.seed)
            t.save(args.out, overwrite=args.overwrite)
        d = t.to_json()
        shown = {k: d[k] for k in ("method", "stains", "max_conc", "lab_mean", "lab_std")
                 if d[k] is not None}
        print(jsonio.dumps(shown))
        print(f"wrote {args.out} ({t.n_pixels} tissue pixels)")

    return run
