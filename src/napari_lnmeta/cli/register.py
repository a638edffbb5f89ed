"""``lnmeta register``, ``lnmeta check-registration``, ``lnmeta warp-points`` and
``lnmeta transfer-mask``: IHC → H&E."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..io.validate import mpp_arg
from . import add_device, add_mpp, add_out, add_overwrite, command


def _open(path, mpp):
    from ..io.slide import open_slide

    return open_slide(path, mpp=mpp)


def _add_pair(p) -> None:
    p.add_argument("fixed", help="the H&E slide (the grid results are written on)")
    p.add_argument("moving", help="the IHC slide (consecutive section)")
    add_mpp(p)
    p.add_argument("--fixed-mpp", type=mpp_arg("--fixed-mpp"), default=None,
                   help="level-0 µm/px of the fixed slide (overrides --mpp)")
    p.add_argument("--moving-mpp", type=mpp_arg("--moving-mpp"), default=None,
                   help="level-0 µm/px of the moving slide (overrides --mpp)")


def _open_pair(args):
    fixed = _open(args.fixed, args.fixed_mpp if args.fixed_mpp is not None else args.mpp)
    moving = _open(args.moving, args.moving_mpp if args.moving_mpp is not None else args.mpp)
    return fixed, moving


def _progress(args):
    from ..progress import TextProgress

    return None if getattr(args, "quiet", False) else TextProgress()


@command("register", help="Register a moving slide (IHC) onto a fixed slide (H&E); write "
                          "a transform (JSON + displacement field)")
def register_cmd(p):
    from ..core.registration import MODES

    _add_pair(p)
    add_out(p, "transform file (.json)", old=("--output",))
    p.add_argument("--mode", choices=MODES, default="nonrigid",
                   help="rigid (rotation, flip, translation), affine, or nonrigid (affine + "
                        "smooth invertible deformation; default)")
    p.add_argument("--nonrigid-size", type=int, default=1024,
                   help="longest side (px) of the image the non-rigid step works on")
    p.add_argument("--min-similarity", type=float, default=None,
                   help="fail below this similarity (default 0.13, see docs/registration.md)")
    p.add_argument("--no-flip", action="store_true", help="do not try mirrored slides")
    add_device(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_overwrite(p)

    def run(args):
        from ..io.atomic import claim_output

        with claim_output(args.out, overwrite=args.overwrite,
                          inputs=[args.fixed, args.moving]):
            _register(args)

    def _register(args):
        from ..core.registration import RegistrationConfig, register_job
        from ..models.io import resolve_device
        from ..progress import run as drive

        resolve_device(args.device)
        fixed, moving = _open_pair(args)
        device = None if args.device == "auto" else args.device  # None: CUDA when present
        kw = {"mode": args.mode, "nonrigid_size": args.nonrigid_size,
              "allow_flip": not args.no_flip, "device": device, "threads": args.threads}
        if args.min_similarity is not None:
            kw["min_similarity"] = args.min_similarity
        t = drive(register_job(fixed, moving, RegistrationConfig(**kw)), _progress(args))
        t.save(args.out, overwrite=args.overwrite, inputs=(args.fixed, args.moving))
        st = t.metrics["stages"]
        pre = st["prealign"]
        print(f"{args.mode}: similarity {t.metrics['similarity']:.3f}, tissue overlap "
              f"{100 * st['tissue_overlap']:.0f}%, rotation {pre['angle']:g}°"
              f"{' (mirrored)' if pre['flip'] else ''}, {t.metrics['seconds']:.1f} s")
        for note in t.metrics.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {args.out}")

    return run


@command("check-registration", help="Images for judging a registration by eye: a checkerboard "
                                    "of H&E / registered IHC and their haematoxylin difference "
                                    "(PNG)")
def check_registration_cmd(p):
    _add_pair(p)
    p.add_argument("--transform", required=True, help="transform from `lnmeta register`")
    add_out(p, "output folder (written whole: checkerboard.png, difference.png)")
    p.add_argument("--size", type=int, default=1024,
                   help="longest side of the images (px, default 1024)")
    p.add_argument("--squares", type=int, default=8,
                   help="checkerboard squares along the longest side (default 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_overwrite(p)

    def run(args):
        import numpy as np

        from ..core.registration import Transform, check_png, registration_check_job
        from ..errors import InputError
        from ..io.atomic import atomic_path, claim_output
        from ..progress import run as drive

        if args.size < 16 or args.squares < 1:
            raise InputError(f"--size must be at least 16 (got {args.size}) and --squares at "
                             f"least 1 (got {args.squares})")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: is a file; -o names a folder")
        inputs = [args.fixed, args.moving, args.transform]
        files = {name: out / f"{name}.png" for name in ("checkerboard", "difference")}
        # the folder is written whole (one rename); --overwrite replaces only a folder we wrote
        with claim_output(out, overwrite=args.overwrite, inputs=inputs):
            fixed, moving = _open_pair(args)
            t = Transform.load(args.transform)
            check = drive(registration_check_job(t, fixed, moving, size=args.size),
                          _progress(args))
            diff = check.difference()
            with atomic_path(out, overwrite=args.overwrite, inputs=inputs) as tmp:
                tmp.mkdir()
                (tmp / files["checkerboard"].name).write_bytes(
                    check_png(check.checkerboard(args.squares)))
                (tmp / files["difference"].name).write_bytes(check_png(diff))
        h, w = check.fixed.shape[:2]
        print(f"{w}x{h} px (downsample {check.frame.downsample:g}); median haematoxylin "
              f"difference {float(np.median(diff)):.3f}; wrote {files['checkerboard']}, "
              f"{files['difference']}")

    return run


def read_points_csv(path: str | Path) -> tuple[list[str], list[list[str]], int, int]:
    """Header, rows, and the indices of the ``X`` and ``Y`` columns of a points CSV."""
    import csv

    from ..errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text CSV (byte {e.start} is not UTF-8)") from e
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not rows:
        raise InputError(f"{path}: empty CSV")
    header = rows[0]
    names = [h.strip() for h in header]
    ix = next((i for i, n in enumerate(names) if n in ("X", "x")), None)
    iy = next((i for i, n in enumerate(names) if n in ("Y", "y")), None)
    if ix is None or iy is None:
        raise InputError(f"{path}: needs columns X and Y (got {', '.join(names) or 'none'})")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    for k, r in enumerate(body, start=2):
        if len(r) <= max(ix, iy):
            raise InputError(f"{path}: line {k} has {len(r)} columns, the header {len(header)}")
        try:
            xy = float(r[ix]), float(r[iy])
        except ValueError as e:
            raise InputError(f"{path}: line {k}: X/Y must be numbers ({e})") from e
        if not all(math.isfinite(v) for v in xy):
            raise InputError(f"{path}: line {k}: X/Y must be finite numbers, got "
                             f"{r[ix].strip()!r}, {r[iy].strip()!r}")
    return header, body, ix, iy


@command("warp-points", help="Map points (CSV with X,Y in level-0 px of the MOVING slide) into "
                             "the FIXED slide, or back with --inverse")
def warp_points(p):
    p.add_argument("transform", help="transform file written by `lnmeta register`")
    p.add_argument("points", help="CSV with columns X, Y (other columns are kept)")
    add_out(p, "output CSV", old=("--output",))
    p.add_argument("--inverse", action="store_true",
                   help="the points are in the FIXED slide; map them into the MOVING one")
    add_overwrite(p)

    def run(args):
        import csv
        import io

        import numpy as np

        from ..core.registration import Transform
        from ..io.atomic import claim_output, write_text_atomic

        with claim_output(args.out, overwrite=args.overwrite,
                          inputs=[args.points, args.transform]):
            t = Transform.load(args.transform)
            header, body, ix, iy = read_points_csv(args.points)
            pts = np.array([[float(r[iy]), float(r[ix])] for r in body], dtype=np.float64)
            out = t.fixed_to_moving(pts) if args.inverse else t.moving_to_fixed(pts)
            bad = ~np.isfinite(np.asarray(out, dtype=np.float64).reshape(-1, 2)).all(axis=1)
            if bad.any():
                from ..errors import InputError

                raise InputError(f"{args.transform}: maps {int(bad.sum())} of {len(pts)} "
                                 f"points of {args.points} to non-finite coordinates (first: "
                                 f"point {int(np.flatnonzero(bad)[0]) + 1}); nothing written")
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(header)
            for r, (y, x) in zip(body, out.reshape(-1, 2), strict=True):
                r = list(r)
                r[ix], r[iy] = f"{x:.4f}", f"{y:.4f}"
                w.writerow(r)
            write_text_atomic(args.out, buf.getvalue(), overwrite=args.overwrite)
        direction = "fixed -> moving" if args.inverse else "moving -> fixed"
        print(f"{len(body)} points mapped ({direction}); wrote {args.out}")

    return run


@command("transfer-mask", help="Tumour mask from the IHC's DAB, warped onto the H&E and written "
                               "as a multiscale OME-Zarr label image")
def transfer_mask_cmd(p):
    _add_pair(p)
    p.add_argument("--transform", required=True, help="transform from `lnmeta register`")
    add_out(p, "output mask (.ome.zarr)", old=("--output",))
    p.add_argument("--threshold", type=float, default=None,
                   help="DAB optical density threshold (default: Otsu over tissue)")
    p.add_argument("--min-area-um2", type=float, default=200.0,
                   help="drop tumour objects smaller than this (µm², default 200)")
    p.add_argument("--close-um", type=float, default=4.0, help="closing radius (µm, default 4)")
    p.add_argument("--fibrosis-um", type=float, default=None,
                   help="also label tissue within this distance of tumour as fibrosis (2)")
    p.add_argument("--mask-mpp", type=mpp_arg("--mask-mpp"), default=2.0,
                   help="µm/px of the mask (default 2; ignored with --downsample)")
    p.add_argument("--downsample", type=float, default=None,
                   help="level-0 H&E px per mask px (default from --mask-mpp)")
    p.add_argument("--geojson", default=None, help="also export outlines as QuPath GeoJSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_overwrite(p)

    def run(args):
        import contextlib

        from ..io.atomic import claim_output
        from ..io.omezarr import read_ome_zarr
        from ..progress import run as drive

        inputs = [args.fixed, args.moving, args.transform]
        with contextlib.ExitStack() as stack:
            stack.enter_context(claim_output(args.out, overwrite=args.overwrite,
                                             inputs=inputs))
            if args.geojson:
                if Path(args.geojson).resolve() == Path(args.out).resolve():
                    from ..errors import InputError

                    raise InputError(f"{args.geojson}: --geojson and -o name the same path")
                stack.enter_context(claim_output(args.geojson, overwrite=args.overwrite,
                                                 inputs=inputs))
            _transfer(args, read_ome_zarr, drive)

    def _transfer(args, read_ome_zarr, drive):
        from ..core.dab import DabParams, mask_outlines, transfer_mask_job
        from ..core.registration import Transform

        fixed, moving = _open_pair(args)
        t = Transform.load(args.transform)
        params = DabParams(threshold=args.threshold, min_area_um2=args.min_area_um2,
                           close_um=args.close_um, fibrosis_um=args.fibrosis_um)
        res = drive(transfer_mask_job(fixed, moving, t, args.out, params,
                                  downsample=args.downsample, mask_mpp=args.mask_mpp,
                                  overwrite=args.overwrite), _progress(args))
        print(f"DAB threshold {res.threshold:.4f}; tumour {100 * res.tumour_fraction:.2f}% of "
              f"the mask grid ({res.shape[1]}x{res.shape[0]} at downsample "
              f"{res.frame.downsample:g}); wrote {args.out}")
        if args.geojson:
            from ..io.annotations import write_geojson

            labels = read_ome_zarr(args.out).data.compute()
            polys = mask_outlines(labels, res.frame)
            write_geojson(args.geojson, polys, overwrite=args.overwrite)
            print(f"{len(polys)} outlines; wrote {args.geojson}")

    return run
