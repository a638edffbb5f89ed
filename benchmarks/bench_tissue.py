"""Tissue mask + patch grid on a 100 000 x 100 000 px pyramid; torch vs numpy stain normalisers.

Prints, in one run:

* wall time of ``tissue_mask`` + ``make_grid`` (256 px patches at 0.5 µm/px over tissue)
  on a JPEG-tiled OME-TIFF pyramid of 100 000 x 100 000 px at 0.25 µm/px (target < 5 s),
  the level it analysed and the peak RSS growth (bounded by that low-resolution level,
  not by level 0);
* patches/s of the stain normalisers on batches of real 256 px H&E tiles: numpy
  (:func:`normalize`, one tile at a time) vs :class:`TorchStainNormalizer` (whole batch)
  on the CPU and, when there is one, on the GPU; the ratio torch / numpy.

The pyramid is generated once (pre-compressed JPEG tiles, tifffile) under
``~/.cache/lnmeta-bench`` or ``$LNMETA_BENCH_CACHE``, never in the repository.

Run: ``python benchmarks/bench_tissue.py [--quick] [--device cuda]``.
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
        TorchStainNormalizer,
        fit_target,
        normalize,
    )

    tiles = real_tiles(16, 256)
    data = np.stack([tiles[i % len(tiles)] for i in range(batch)])
    print(f"normalisers: batches of {batch} real H&E tiles of 256 px, torch "
          f"{torch.__version__} ({torch.get_num_threads()} CPU threads)")
    for method in NORMALISERS:
        target = fit_target(tiles[0], method)
        np_rate = _rate(lambda t=target: [normalize(x, t) for x in data], batch, 1)
        line = f"  {method:9s} numpy {np_rate:8.1f} patches/s"
        for dev in devices:
            norm = TorchStainNormalizer(target, device=dev)
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
    args = p.parse_args(argv)
    import torch

    size = args.size or (25_000 if args.quick else 100_000)
    bench_tissue_grid(size, 1 if args.quick else 3)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    bench_normalisers(16 if args.quick else 64, 1, devices)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
