"""What the batch reader can feed a model: patches/s of the reader alone, no model.

224 px patches at 0.5 µm/px of a 40 960 px JPEG-tiled OME-TIFF (512 px YCbCr tiles of
real H&E in a 40 % band, as ``bench_inference.py`` builds), batches of 256, with 1 .. N reader
threads (N = the default, one per core), JPEG tile checks as shipped (``full``) and off.
On a GPU host this is the ceiling of the pipeline: a resnet18 forward on an H100 takes
about 42 000 patches/s. The ratio ``checks off / full`` is what the integrity checks cost.

    python benchmarks/bench_reader.py [--quick]
"""

from __future__ import annotations

import os
import sys

from _common import ROOT

sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str]) -> int:
    from bench_inference import reader_rate, tissue_band_pyramid

    from napari_lnmeta.core.inference import BatchReader
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.slide import open_slide

    quick = "--quick" in argv
    path = tissue_band_pyramid(40960, 0.4)
    slide = open_slide(path)
    grid = make_grid(slide, patch_size=224, stride=224, mpp=0.5,
                     tissue=tissue_mask(slide, target_mpp=8.0))
    n = min(len(grid), 1024 if quick else 4096)
    top = BatchReader.default_workers()
    threads = sorted({1, top} | ({2} if top >= 2 else set()))
    print(f"{path.name}: {len(grid)} patches of 224 px at 0.5 µm/px, first {n}, batches of 256")
    for w in threads:
        rates = {}
        for check in ("full", "off"):
            os.environ["LNMETA_JPEG_CHECK"] = check
            rates[check] = max(reader_rate(path, grid, 256, w, n=n)[0] for _ in range(2))
        os.environ.pop("LNMETA_JPEG_CHECK", None)
        print(f"  {w:>2} reader thread(s): {rates['full']:8.0f} patches/s with the JPEG "
              f"checks, {rates['off']:8.0f} without (checks off / full = "
              f"{rates['off'] / rates['full']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
