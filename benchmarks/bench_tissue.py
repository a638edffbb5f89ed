"""Tissue mask + patch grid on a 100 000 x 100 000 px pyramid; torch vs numpy stain normalisers.

Prints, in one run:

* wall time of ``tissue_mask`` + ``make_grid`` (256 px patches at 0.5 µm/px over tissue)
  on a JPEG-tiled OME-TIFF pyramid of 100 000 x 100 000 px at 0.25 µm/px (target < 5 s),
  the level it analysed and the peak RSS growth (bounded by that low-resolution level,
  not by level 0);
* patches/s of the stain normalisers on batches of real 256 px H&E tiles: numpy
  (:func:`normalise`, one tile at a time) vs :class:`TorchStainNormaliser` (whole batch)
  on the CPU and, when there is one, on the GPU; the ratio torch / numpy.

The pyramid is generated once (pre-compressed JPEG tiles, tifffile) under
``~/.cache/lnmeta-bench`` or ``$LNMETA_BENCH_CACHE``, never in the repository.

* single-level files (CMU-1-Small-Region.svs, the single-level tumor_001 TIFF, the same
  CMU-1 pixels as a PNG): open, tissue detection (first call, which builds the kept
  synthetic levels, and a second), and the coarsest pyramid level a viewer shows
  first, twice; beside the same work done the way it was before synthetic levels were
  kept (the lazy 2x2-mean chain recomputed from level 0 each time), with the ratio.

* the tissue analysis alone (the low-resolution RGB already in memory: threshold, pen
  removal, holes and small objects, dilation) on tumor_001's 7168 x 3072 analysis level
  and on that image tiled 2 x 2 (a bigger slide): the whole-image implementation it
  replaced (``_reference_*`` in tests/core/test_tissue_fast.py) and the current one,
  alternated in one process on the same image, best of the runs, with the ratio; every
  mask is checked to be identical; then the current one's stages.

Run: ``python benchmarks/bench_tissue.py [--quick] [--device cuda] [--single-only]
[--analysis-only]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import PeakRSS, real_tiles, synthetic_pyramid


def bench_tissue_grid(size: int, repeats: int) -> None:
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.slide import open_slide

    t0 = time.perf_counter()
    path = synthetic_pyramid("tissue", size, tissue_fraction=0.4)
    made = time.perf_counter() - t0
    print(f"slide: {path} ({path.stat().st_size / 2**30:.2f} GiB; ready in {made:.1f} s)")
    times = []
    for r in range(repeats):
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            slide = open_slide(path)
            tm = tissue_mask(slide)
            t1 = time.perf_counter()
            grid = make_grid(slide, patch_size=256, mpp=0.5, tissue=tm, min_tissue=0.5)
            t2 = time.perf_counter()
        times.append(t2 - t0)
        h, w = tm.mask.shape
        low_mb = h * w * 3 / 2**20
        print(f"run {r + 1}: tissue {t1 - t0:.2f} s + grid {t2 - t1:.3f} s = {t2 - t0:.2f} s; "
              f"mask {w}x{h} at {tm.mpp:.1f} µm/px ({100 * tm.area_fraction:.1f}% tissue); "
              f"{len(grid)} patches of {grid.grid_shape[0] * grid.grid_shape[1]}; "
              f"peak RSS growth {rss.growth:.0f} MB (low-res RGB level {low_mb:.0f} MB)")
    best = min(times)
    print(f"tissue + grid on {slide.shape[1]}x{slide.shape[0]} px: best {best:.2f} s "
          f"(target < 5 s: ratio {best / 5.0:.2f})")


def _lazy_chain_level(slide, want_ds: float):
    """The level at ``want_ds`` the way it was made before: from level 0, through the lazy
    dask 2x2-mean chain, recomputed on every call."""
    import dask.array as da

    from napari_lnmeta.io.slide import DEFAULT_TILE, _LevelArray, downsample2x

    lvl = da.from_array(_LevelArray(slide, 0), chunks=(DEFAULT_TILE, DEFAULT_TILE, 3),
                        asarray=False, fancy=False, lock=False,
                        meta=np.empty((0, 0, 0), np.uint8))
    ds = 1
    while ds < want_ds:
        lvl = downsample2x(lvl)
        ds *= 2
    return lvl.compute(scheduler="threads")


def bench_single_level(repeats: int) -> None:
    import warnings

    from _common import SHARED, cache_dir
    from PIL import Image

    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.slide import MppWarning, open_slide

    cmu1 = SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
    png = cache_dir() / "cmu1_level0.png"
    if not png.exists():
        Image.fromarray(open_slide(cmu1).read_level(0)).save(png)
    files = [(cmu1, None),
             (SHARED / "camelyon16_tumor001_lowres" / "tumor_001_level5.tif", 7.776),
             (png, 0.499)]
    print(f"single-level files (best of {repeats} runs; 'before' = the lazy chain from "
          "level 0, recomputed on each use):")
    for path, mpp in files:
        best: dict[str, float] = {}

        def keep(k, t, best=best):
            best[k] = min(best.get(k, float("inf")), t)

        for _ in range(repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MppWarning)
                t0 = time.perf_counter()
                slide = open_slide(path, mpp=mpp)
                keep("open", time.perf_counter() - t0)
            t0 = time.perf_counter()
            tm = tissue_mask(slide)
            keep("tissue1", time.perf_counter() - t0)
            t0 = time.perf_counter()
            tissue_mask(slide)
            keep("tissue2", time.perf_counter() - t0)
            pyr = slide.pyramid()
            t0 = time.perf_counter()
            pyr[-1].compute()
            pyr[-1].compute()
            keep("view2", time.perf_counter() - t0)
            t0 = time.perf_counter()
            old = _lazy_chain_level(slide, tm.downsample)
            keep("old_tissue", time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(2):
                _lazy_chain_level(slide, slide.shape[0] / pyr[-1].shape[0])
            keep("old_view2", time.perf_counter() - t0)
        h, w = slide.shape
        print(f"  {path.name} ({w}x{h}, 1 level): open {best['open'] * 1e3:.0f} ms; "
              f"tissue at {tm.mpp:.1f} µm/px ({tm.mask.shape[1]}x{tm.mask.shape[0]}) "
              f"first {best['tissue1']:.3f} s, again {best['tissue2']:.3f} s; "
              f"coarsest view level twice {best['view2']:.3f} s")
        print(f"    before: reading the {old.shape[1]}x{old.shape[0]} level from level 0 "
              f"{best['old_tissue']:.3f} s per use, view level twice {best['old_view2']:.3f} s "
              f"(ratio now/before: tissue first call {best['tissue1'] / best['old_tissue']:.2f}, "
              f"view {best['view2'] / best['old_view2']:.2f})", flush=True)


def _reference_module():
    """tests/core/test_tissue_fast.py, which keeps the whole-image implementation."""
    import importlib.util

    from _common import ROOT

    path = ROOT / "tests" / "core" / "test_tissue_fast.py"
    spec = importlib.util.spec_from_file_location("_tissue_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_analysis(repeats: int) -> None:
    import warnings

    from _common import SHARED
    from scipy import ndimage  # noqa: F401  (import cost is not analysis time)

    from napari_lnmeta.core import tissue
    from napari_lnmeta.io.slide import MppWarning, open_slide

    ref = _reference_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(SHARED / "camelyon16_tumor001_lowres" / "tumor_001_level5.ome.tif")
    rgb, ds = slide.low_res(8.0)
    cases = [("tumor_001", rgb, "otsu"), ("tumor_001", rgb, "od"), ("tumor_001", rgb, "hsv"),
             ("tumor_001 tiled 2x2", np.tile(rgb, (2, 2, 1)), "otsu")]
    print(f"tissue analysis (RGB in memory; pen removal, µm/px; best of {repeats}; "
          "before = the whole-image implementation, same process, same image):")
    for name, img, method in cases:
        best = {"before": float("inf"), "now": float("inf")}
        for _ in range(repeats):
            for key, fn in (("before", ref._reference_analysis), ("now", ref._analysis)):
                t0 = time.perf_counter()
                mask, thr = fn(img, method=method, pen=True, mpp=slide.mpp, ds=ds)
                best[key] = min(best[key], time.perf_counter() - t0)
                if key == "before":
                    want = (mask, thr)
                else:
                    assert thr == want[1] and np.array_equal(mask, want[0]), "masks differ"
        h, w = img.shape[:2]
        print(f"  {name} ({w}x{h}, {h * w / 1e6:.0f} Mpx), {method}: before {best['before']:.3f} s, "
              f"now {best['now']:.3f} s (ratio now/before {best['now'] / best['before']:.2f}; "
              "masks identical)", flush=True)
    # the current implementation's stages on the tumor_001 level
    stages = {"threshold + pen": 0.0, "holes + small objects": 0.0, "dilation": 0.0}
    best_stage = dict.fromkeys(stages, float("inf"))
    px_um2 = (slide.mpp * ds) ** 2
    radius = max(1, round(16.0 / (slide.mpp * ds)))
    for _ in range(repeats):
        t0 = time.perf_counter()
        fg, _ = tissue.tissue_mask_from_rgb(rgb)
        t1 = time.perf_counter()
        clean = tissue.clean_mask(fg, min_object_px=20_000 / px_um2, max_hole_px=250_000 / px_um2)
        t2 = time.perf_counter()
        tissue.dilate(clean, radius)
        t3 = time.perf_counter()
        for k, t in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            best_stage[k] = min(best_stage[k], t)
    print("  now, by stage on tumor_001: " + ", ".join(
        f"{k} {v:.3f} s" for k, v in best_stage.items()), flush=True)


def _rate(fn, n_patches: int, repeats: int) -> float:
    fn()  # warm-up (imports, CUDA context, allocator)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_patches * repeats / (time.perf_counter() - t0)


def bench_normalisers(batch: int, repeats: int, devices: list[str]) -> None:
    import torch

    from napari_lnmeta.core.stain import (
        NORMALISERS,
        TorchStainNormaliser,
        fit_target,
        normalise,
    )

    tiles = real_tiles(16, 256)
    data = np.stack([tiles[i % len(tiles)] for i in range(batch)])
    print(f"normalisers: batches of {batch} real H&E tiles of 256 px, torch "
          f"{torch.__version__} ({torch.get_num_threads()} CPU threads)")
    for method in NORMALISERS:
        target = fit_target(tiles[0], method)
        np_rate = _rate(lambda t=target: [normalise(x, t) for x in data], batch, 1)
        line = f"  {method:9s} numpy {np_rate:8.1f} patches/s"
        for dev in devices:
            norm = TorchStainNormaliser(target, device=dev)
            x = torch.from_numpy(data).to(dev)

            def run(norm=norm, x=x, dev=dev):
                norm(x)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()

            rate = _rate(run, batch, repeats)
            line += f" | torch {dev} {rate:9.1f} patches/s (x{rate / np_rate:.1f})"
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a 25 000 px slide, one run, smaller batches")
    p.add_argument("--device", action="append", default=None,
                   help="torch device(s) for the normaliser (default: cpu, and cuda if present)")
    p.add_argument("--size", type=int, default=None, help="slide side in px (default 100000)")
    p.add_argument("--single-only", action="store_true",
                   help="only the single-level files (no torch, no big pyramid)")
    p.add_argument("--analysis-only", action="store_true",
                   help="only the tissue analysis, before and now")
    args = p.parse_args(argv)
    bench_analysis(2 if args.quick else 5)
    if args.analysis_only:
        return 0
    bench_single_level(1 if args.quick else 3)
    if args.single_only:
        return 0
    import torch

    size = args.size or (25_000 if args.quick else 100_000)
    bench_tissue_grid(size, 1 if args.quick else 3)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    bench_normalisers(16 if args.quick else 64, 1, devices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
