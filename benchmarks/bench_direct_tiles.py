"""Aperio SVS and generic tiled TIFF read through their JPEG tiles vs through OpenSlide.

Both paths give the same pixels (tests/io/test_direct_tiles.py); this prints how much
faster the direct one is, measured in one run on the same files and the same reads:

* a whole level (what tissue detection and the overview read on a single-level file);
* random patches of 96, 224 and 512 px at level 0 (what inference and training read);
* tissue detection on a freshly opened slide (read + analysis at 8 µm/px).

``LNMETA_TIFF_DIRECT=0`` gives the OpenSlide path. JPEG checks as configured
(``LNMETA_JPEG_CHECK``, default ``full``), on both paths.

    python benchmarks/bench_direct_tiles.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
import warnings

from _common import ROOT, SHARED

sys.path.insert(0, str(ROOT / "src"))

FILES = [("CMU-1-Small-Region.svs (Aperio)",
          SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs", None),
         ("tumor_001_level5_pyramid.tif (generic TIFF)",
          SHARED / "camelyon16_tumor001_lowres" / "tumor_001_level5_pyramid.tif", 7.776)]


def _open(path, mpp, direct: bool):
    from napari_lnmeta.io.slide import open_slide

    os.environ["LNMETA_TIFF_DIRECT"] = "1" if direct else "0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_slide(path, mpp=mpp)


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare(path, mpp, reps: int, n_patches: int) -> list[tuple[str, float, float]]:
    """``(what, direct s, OpenSlide s)`` rows for one file."""
    import numpy as np

    from napari_lnmeta.core.tissue import tissue_mask

    def fresh(direct: bool):
        return _open(path, mpp, direct)

    h0, w0 = fresh(True).shape
    # each timing on a freshly opened slide: no warm tile caches from the previous one
    rows = [(f"whole level 0 ({w0} x {h0})", _best(lambda: fresh(True).read_level(0), reps),
             _best(lambda: fresh(False).read_level(0), reps))]
    rng = np.random.default_rng(0)
    for size in (96, 224, 512):
        locs = [(int(rng.integers(0, h0 - size)), int(rng.integers(0, w0 - size)))
                for _ in range(n_patches)]

        def reads(direct: bool, locs=locs, size=size) -> None:
            s = fresh(direct)
            for loc in locs:
                s.read_region(loc, (size, size), level=0)

        rows.append((f"{n_patches} random {size} px patches",
                     _best(lambda: reads(True), reps), _best(lambda: reads(False), reps)))
    rows.append(("tissue detection, fresh slide",
                 _best(lambda: tissue_mask(fresh(True), target_mpp=8.0), reps),
                 _best(lambda: tissue_mask(fresh(False), target_mpp=8.0), reps)))
    return rows


def main(argv: list[str]) -> int:
    from napari_lnmeta.core.tissue import tissue_mask

    quick = "--quick" in argv
    reps = 2 if quick else 3
    n_patches = 100 if quick else 300
    tissue_mask(_open(*FILES[0][1:], True), target_mpp=8.0)  # imports paid once, outside
    for label, path, mpp in FILES:
        print(label)
        for what, a, b in compare(path, mpp, reps, n_patches):
            print(f"  {what:<34} direct {a:.3f} s | OpenSlide {b:.3f} s | "
                  f"OpenSlide / direct {b / a:.2f}x")
    os.environ.pop("LNMETA_TIFF_DIRECT", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
