"""Slide I/O on a 102 400 x 102 400 px JPEG-tiled OME-TIFF pyramid.

Prints, in one run:
* time to open the slide and draw a first view in a real napari viewer (target < 1 s);
* peak RSS growth for that (target < 300 MB);
* random 512 px level-0 tile reads/s through ``Slide.read_region`` vs OpenSlide's own
  ``read_region`` on the same file (target ratio >= 0.9).

Run: ``python benchmarks/bench_io.py [--quick]`` (under xvfb-run when headless).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import PeakRSS, synthetic_pyramid


def first_view(path) -> tuple[float, float]:
    from qtpy.QtWidgets import QApplication

    import napari
    from napari_lnmeta._napari.reader import napari_get_reader

    viewer = napari.Viewer(show=True)
    QApplication.processEvents()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        layer_data = napari_get_reader(str(path))(str(path))
        data, kw, _ = layer_data[0]
        viewer.add_image(data, **kw)
        viewer.reset_view()
        viewer.screenshot(canvas_only=True, flash=False)  # forces the first draw
        dt = time.perf_counter() - t0
    viewer.close()
    return dt, rss.growth


def tile_throughput(path, n: int) -> tuple[float, float]:
    import openslide

    from napari_lnmeta.io.slide import open_slide

    slide = open_slide(path)
    osr = openslide.OpenSlide(str(path))
    h, w = slide.shape
    rng = np.random.default_rng(0)
    locs = [(int(y), int(x)) for y, x in zip(rng.integers(0, h - 512, n),
                                             rng.integers(0, w - 512, n), strict=True)]
    slide.read_region(locs[0], (512, 512))
    osr.read_region(locs[0][::-1], 0, (512, 512))
    t0 = time.perf_counter()
    for loc in locs:
        slide.read_region(loc, (512, 512))
    ours = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for y, x in locs:
        osr.read_region((x, y), 0, (512, 512))
    theirs = n / (time.perf_counter() - t0)
    return ours, theirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tile reads")
    args = ap.parse_args(argv)
    size = 102_400
    t0 = time.perf_counter()
    path = synthetic_pyramid("io", size)
    print(f"[io] slide {size} x {size} px, JPEG tiles: {path} (ready in {time.perf_counter() - t0:.1f}s)")
    # The first layer of a napari session also pays one-off imports (dask.array, pint's
    # unit registry, zarr): ~1 s on this machine whatever the slide. Reported apart.
    cold, cold_growth = first_view(path)
    dt, growth = first_view(path)
    print(f"[io] open + first napari view: {dt:.3f} s (target < 1 s); peak RSS growth {growth:.0f} MB "
          f"(target < 300 MB)")
    print(f"[io]   first slide of a fresh napari session (one-off imports included): {cold:.3f} s, "
          f"RSS growth {cold_growth:.0f} MB")
    ours, theirs = tile_throughput(path, 100 if args.quick else 400)
    print(f"[io] random 512 px level-0 reads: ours {ours:.0f}/s, OpenSlide {theirs:.0f}/s, "
          f"ratio {ours / theirs:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
