"""Registration benchmark: ANHIR accuracy per pair and mode, and whole-slide runtime.

Run from the repository root::

    python benchmarks/bench_registration.py            # everything
    python benchmarks/bench_registration.py --quick    # no rigid mode, no mask transfer

1. **Accuracy** on the ANHIR / CIMA lung-lesion-3 pairs in ``../shared/data`` (H&E fixed,
   each of the 4 IHC moving): median rTRE (landmark TRE / fixed image diagonal, landmarks
   x 0.1 into the 5 % images) for rigid, affine and non-rigid, next to the least-squares
   affine fitted to the landmarks themselves (the floor for any affine method).
2. **Runtime** for a pair of 20 000 x 20 000 px pyramidal OME-TIFF slides (0.5 µm/px)
   synthesised once from the real ANHIR H&E and proSPC images (bilinear up-sampling; the
   IHC is turned upside down so the prealignment has to find it), cached under
   ``$LNMETA_BENCH_CACHE`` or ``~/.cache/lnmeta-bench``. Registration (default non-rigid
   configuration) and, unless ``--quick``, the tile-by-tile DAB mask transfer at 2 µm/px.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHARED = Path(os.environ.get("LNMETA_SHARED_DATA", ROOT.parent / "shared" / "data"))
ANHIR = SHARED / "anhir_cima_lung_lesion3_he_ihc"
PREFIX = "29-041-Izd2-w35-"
STAINS = ["CD31-3", "proSPC-4", "Cc10-5", "Ki67-7"]
BIG = 20_000
BIG_MPP = 0.5


def cache_dir() -> Path:
    d = Path(os.environ.get("LNMETA_BENCH_CACHE", Path.home() / ".cache" / "lnmeta-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def landmarks(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r["Y"]), float(r["X"])] for r in rows]) * 0.1


def accuracy(modes: list[str], threads: int | None) -> list[dict]:
    from napari_lnmeta.core.registration import RegistrationConfig, affine_from_points, register_job
    from napari_lnmeta.progress import run

    he = read_rgb(ANHIR / "images" / f"{PREFIX}He-les3.jpg")
    he_lm = landmarks(ANHIR / "landmarks" / f"{PREFIX}He-les3.csv")
    diag = math.hypot(*he.shape[:2])
    rows = []
    for stain in STAINS:
        ihc = read_rgb(ANHIR / "images" / f"{PREFIX}{stain}-les3.jpg")
        lm = landmarks(ANHIR / "landmarks" / f"{PREFIX}{stain}-les3.csv")
        fit = affine_from_points(lm, he_lm)
        floor = np.median(np.linalg.norm(lm @ fit[:2, :2].T + fit[:2, 2] - he_lm, axis=1)) / diag
        ident = np.median(np.linalg.norm(lm - he_lm, axis=1)) / diag
        row = {"pair": f"H&E <- {stain}", "identity": ident, "landmark-affine": floor}
        for mode in modes:
            t0 = time.perf_counter()
            t = run(register_job(he, ihc, RegistrationConfig(mode=mode, threads=threads)))
            dt = time.perf_counter() - t0
            err = np.linalg.norm(t.moving_to_fixed(lm) - he_lm, axis=1)
            row[mode] = float(np.median(err) / diag)
            row[f"{mode} s"] = dt
        rows.append(row)
        print(_fmt_row(row, modes), flush=True)
    return rows


def _fmt_row(row: dict, modes: list[str]) -> str:
    cells = [f"{row['pair']:<16}", f"{row['identity']:.4f}", f"{row['landmark-affine']:.4f}"]
    cells += [f"{row[m]:.4f} ({row[m + ' s']:.1f} s)" for m in modes]
    return " | ".join(cells)


def _write_pyramid(path: Path, src: np.ndarray, size: int, mpp: float, tile: int = 512) -> None:
    """A ``size`` x ``size`` pyramidal OME-TIFF up-sampled (bilinear) from ``src``, tile by tile."""
    import tifffile
    from scipy import ndimage as ndi

    sh, sw = src.shape[:2]
    # keep the aspect ratio of the source, centred on a white square canvas
    scale = size / max(sh, sw)
    oy, ox = (size - sh * scale) / 2, (size - sw * scale) / 2
    planes = [src[..., k].astype(np.float32) for k in range(3)]

    def tiles(level_size: int):
        f = size / level_size
        for r in range(0, level_size, tile):
            for c in range(0, level_size, tile):
                rr = (np.arange(r, min(r + tile, level_size)) + 0.5) * f - 0.5
                cc = (np.arange(c, min(c + tile, level_size)) + 0.5) * f - 0.5
                sy = (rr - oy) / scale - 0.5 + 0.5 / scale
                sx = (cc - ox) / scale - 0.5 + 0.5 / scale
                gy, gx = np.meshgrid(sy, sx, indexing="ij")
                out = np.full((tile, tile, 3), 255, np.uint8)
                vals = np.stack([ndi.map_coordinates(p, [gy, gx], order=1, cval=255.0)
                                 for p in planes], -1)
                out[:vals.shape[0], :vals.shape[1]] = np.clip(vals + 0.5, 0, 255).astype(np.uint8)
                yield out

    sizes = [size]
    while sizes[-1] > 1024:
        sizes.append(math.ceil(sizes[-1] / 2))
    kw = {"tile": (tile, tile), "photometric": "rgb", "compression": "jpeg",
          "compressionargs": {"level": 85}}
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        tw.write(tiles(size), shape=(size, size, 3), dtype=np.uint8, subifds=len(sizes) - 1,
                 metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **kw)
        for s in sizes[1:]:
            tw.write(tiles(s), shape=(s, s, 3), dtype=np.uint8, subfiletype=1, **kw)
    os.replace(tmp, path)


def big_pair() -> tuple[Path, Path]:
    d = cache_dir()
    fixed, moving = d / f"he_{BIG}.ome.tif", d / f"prospc_{BIG}_upside_down.ome.tif"
    if not fixed.exists():
        print(f"synthesising {fixed} (once)...", flush=True)
        _write_pyramid(fixed, read_rgb(ANHIR / "images" / f"{PREFIX}He-les3.jpg"), BIG, BIG_MPP)
    if not moving.exists():
        print(f"synthesising {moving} (once)...", flush=True)
        ihc = read_rgb(ANHIR / "images" / f"{PREFIX}proSPC-4-les3.jpg")[::-1, ::-1]
        _write_pyramid(moving, np.ascontiguousarray(ihc), BIG, BIG_MPP)
    return fixed, moving


def runtime(quick: bool, threads: int | None) -> dict:
    from napari_lnmeta.core.dab import transfer_mask_job
    from napari_lnmeta.core.registration import RegistrationConfig, register_job
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.progress import run

    fpath, mpath = big_pair()
    fixed, moving = open_slide(fpath), open_slide(mpath)
    out = {"slides": f"{fixed.shape[1]}x{fixed.shape[0]} px, {fixed.mpp} µm/px, "
                     f"{fixed.level_count} levels"}
    t0 = time.perf_counter()
    t = run(register_job(fixed, moving, RegistrationConfig(threads=threads)))
    out["register s"] = time.perf_counter() - t0
    out["timings"] = t.metrics["timings"]
    out["prealign"] = t.metrics["stages"]["prealign"]
    # check against the known answer: moving = fixed's section turned 180 degrees, so the
    # H&E/IHC landmarks map through the same up-sampling
    he_lm = landmarks(ANHIR / "landmarks" / f"{PREFIX}He-les3.csv")
    lm = landmarks(ANHIR / "landmarks" / f"{PREFIX}proSPC-4-les3.csv")
    he_shape = read_rgb(ANHIR / "images" / f"{PREFIX}He-les3.jpg").shape[:2]
    ihc_shape = read_rgb(ANHIR / "images" / f"{PREFIX}proSPC-4-les3.jpg").shape[:2]

    def to_big(p, shape, flip):
        s = BIG / max(shape)
        o = np.array([(BIG - shape[0] * s) / 2, (BIG - shape[1] * s) / 2])
        if flip:
            p = np.array(shape) - 1 - p
        return (p + 0.5) * s - 0.5 + o

    err = np.linalg.norm(t.moving_to_fixed(to_big(lm, ihc_shape, True))
                         - to_big(he_lm, he_shape, False), axis=1)
    out["median rTRE"] = float(np.median(err) / math.hypot(BIG, BIG))
    if not quick:
        import shutil

        mask = cache_dir() / "mask.ome.zarr"
        t0 = time.perf_counter()
        res = run(transfer_mask_job(fixed, moving, t, mask, overwrite=True))
        out["transfer s"] = time.perf_counter() - t0
        out["mask"] = f"{res.shape[1]}x{res.shape[0]} at {res.frame.mpp:g} µm/px"
        shutil.rmtree(mask, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the rigid mode and mask transfer")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    ap.add_argument("--skip-big", action="store_true", help="only the ANHIR accuracy table")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"load average {os.getloadavg()[0]:.1f}")
    modes = ["affine", "nonrigid"] if args.quick else ["rigid", "affine", "nonrigid"]
    print("\nmedian rTRE (TRE / fixed diagonal), moving landmarks mapped into the H&E")
    print(" | ".join(["pair            ", "none  ", "lm-aff"] + modes))
    rows = accuracy(modes, args.threads)
    for m in modes:
        vals = [r[m] for r in rows]
        print(f"{m:>9}: max {max(vals):.4f}, mean {np.mean(vals):.4f}; "
              f"pairs < 0.006: {sum(v < 0.006 for v in vals)}/{len(vals)}")
    if not args.skip_big:
        print(f"\nruntime, {BIG} x {BIG} px pair (cache: {cache_dir()})")
        for k, v in runtime(args.quick, args.threads).items():
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
