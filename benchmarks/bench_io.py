"""Slide I/O on a 102 400 x 102 400 px JPEG-tiled OME-TIFF pyramid.

Prints, in one run:
* time to open the slide and draw a first view in a real napari viewer (target < 1 s);
* peak RSS growth for that (target < 300 MB);
* random 512 px level-0 tile reads/s through ``Slide.read_region`` vs OpenSlide's own
  ``read_region`` on the same file (target ratio >= 0.9);
* single-level files (CMU-1-Small-Region.svs, the single-level tumor_001 TIFF) in one
  napari viewer: open + first view, then a zoomed view and the whole view again, with
  the kept synthetic levels vs the lazy chain from level 0 they replaced (ratio).

Run: ``python benchmarks/bench_io.py [--quick] [--single-only]`` (under xvfb-run when
headless).
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


def _old_pyramid(slide, tile=1024):
    """The pyramid a single-level file got before synthetic levels were kept: every
    coarser level a lazy 2x2-mean chain from level 0, recomputed on each use."""
    import dask.array as da

    from napari_lnmeta.io.slide import MIN_PYRAMID_SIZE, _LevelArray, downsample2x

    levels = [da.from_array(_LevelArray(slide, 0), chunks=(tile, tile, 3), asarray=False,
                            fancy=False, lock=False, meta=np.empty((0, 0, 0), np.uint8))]
    while max(levels[-1].shape[:2]) > MIN_PYRAMID_SIZE:
        levels.append(downsample2x(levels[-1], tile))
    return levels


def single_level_views(viewer_cls) -> None:
    """Open + first view, then two more views (zoomed in on the centre, whole slide
    again) of single-level files in one napari viewer: kept synthetic levels vs the
    lazy chain from level 0 they replace."""
    import warnings

    from _common import SHARED
    from qtpy.QtWidgets import QApplication

    from napari_lnmeta._napari.layers import slide_layer_data
    from napari_lnmeta.io.slide import MppWarning, open_slide

    viewer = viewer_cls(show=True)
    QApplication.processEvents()
    with warnings.catch_warnings():  # one-off imports and GL set-up, paid by neither side
        warnings.simplefilter("ignore", MppWarning)
        wdata, wkw, _ = slide_layer_data(open_slide(SHARED / "skimage_ihc_dab" / "ihc.png"))
        warm = viewer.add_image(wdata, **wkw)
    viewer.screenshot(canvas_only=True, flash=False)
    viewer.layers.remove(warm)
    files = [SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs",
             SHARED / "camelyon16_tumor001_lowres" / "tumor_001_level5.tif"]
    for path in files:
        res = {}
        for how in ("before", "now"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MppWarning)
                t0 = time.perf_counter()
                slide = open_slide(path)
                data, kw, _ = slide_layer_data(slide)
                if how == "before":
                    data = _old_pyramid(slide)
                layer = viewer.add_image(data, **kw)
                viewer.reset_view()
                viewer.screenshot(canvas_only=True, flash=False)
                first = time.perf_counter() - t0
                viewer.camera.zoom *= 3
                viewer.screenshot(canvas_only=True, flash=False)
                viewer.reset_view()
                viewer.screenshot(canvas_only=True, flash=False)
                res[how] = (first, time.perf_counter() - t0)
                viewer.layers.remove(layer)
        h, w = slide.shape
        print(f"[io] single-level {path.name} ({w}x{h}): open + first view "
              f"{res['now'][0]:.2f} s (before {res['before'][0]:.2f} s), + zoom in + whole "
              f"view {res['now'][1]:.2f} s (before {res['before'][1]:.2f} s): ratio "
              f"{res['now'][1] / res['before'][1]:.2f}", flush=True)
    viewer.close()


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
    ap.add_argument("--single-only", action="store_true",
                    help="only the single-level files in napari")
    args = ap.parse_args(argv)
    import napari

    single_level_views(napari.Viewer)
    if args.single_only:
        return 0
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
