"""Writing a whole-slide prediction's outputs (CPU): the result folder of a 100 000 x 200 000 px slide.

Prints, in one run, the seconds :func:`napari_lnmeta.core.predict.write_prediction` takes
for the results of a 100 000 x 200 000 px slide at 0.25 µm/px (40 % tissue), and where
they go (probability/binary/tiers/analysed OME-Zarr, lesions GeoJSON, overview PNG,
summary), plus :func:`postprocess` (maps, score, lesions) beside it. Target: writing
< 0.5 s. Two grids: 224 px patches at 0.5 µm/px (448 level-0 px, ~10^5 cells, the issue's
benchmark) and 96 px at 0.5 µm/px (192 level-0 px, ~5 x 10^5 cells).

The inference result is synthetic (a smooth probability field with tumour blobs over a
band of tissue); the slide is the JPEG-tiled OME-TIFF pyramid of bench_inference (made
once under the benchmark cache), so the overview reads a real low-resolution level.

Run: ``python benchmarks/bench_outputs.py [--quick] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

SLIDE_SHAPE = (100_000, 200_000)
SLIDE_MPP = 0.25


def synthetic_result(slide, stride0: int, *, tissue: float = 0.4, seed: int = 0):
    """An InferenceResult of the right size for ``slide`` on a ``stride0`` grid."""
    from napari_lnmeta.core.inference import InferenceConfig, InferenceResult
    from napari_lnmeta.core.tiling import PatchGrid
    from napari_lnmeta.core.tissue import TissueMask
    from napari_lnmeta.io.frame import SlideFrame
    from napari_lnmeta.models.io import ModelMeta

    h0, w0 = slide.shape
    gh, gw = math.ceil(h0 / stride0), math.ceil(w0 / stride0)
    rng = np.random.default_rng(seed)
    # tissue: a centred vertical band, as in the slide
    cols = np.arange(gw)
    band = (cols >= gw * (1 - tissue) / 2) & (cols < gw * (1 + tissue) / 2)
    scored = np.broadcast_to(band[None, :], (gh, gw)).copy()
    # probability: low noise plus a few dozen Gaussian tumour blobs
    prob = rng.random((gh, gw), dtype=np.float32) * 0.3
    yy, xx = np.mgrid[0:gh, 0:gw]
    for _ in range(40):
        cy, cx = rng.integers(0, gh), rng.integers(int(gw * 0.3), int(gw * 0.7))
        r = rng.uniform(2, 12)
        sl = (slice(max(0, cy - 40), cy + 40), slice(max(0, cx - 40), cx + 40))
        prob[sl] = np.maximum(prob[sl], np.exp(-((yy[sl] - cy) ** 2 + (xx[sl] - cx) ** 2)
                                                / (2 * r * r)).astype(np.float32))
    prob = np.where(scored, prob, 0).astype(np.float32)
    idx = np.argwhere(scored)
    grid = PatchGrid(coords=idx * stride0, index=idx, grid_shape=(gh, gw), origin=(0, 0),
                     patch_size=stride0 // 2, stride=stride0 // 2, downsample=2.0, level=None,
                     mpp=2 * SLIDE_MPP, slide=slide.name, slide_shape=(h0, w0))
    tm = TissueMask(mask=scored, downsample=float(stride0), slide_mpp=SLIDE_MPP, threshold=0.1,
                    method="otsu", slide=slide.name, slide_shape=(h0, w0))
    frame = SlideFrame(downsample=float(stride0), origin=(0.0, 0.0), slide_mpp=SLIDE_MPP,
                       slide=slide.name, slide_shape=(h0, w0))
    meta = ModelMeta(architecture="resnet18", classes=["normal", "tumour"],
                     patch_size=stride0 // 2, mpp=2 * SLIDE_MPP)
    return InferenceResult(probability=prob, scored=scored, frame=frame, grid=grid, tissue=tm,
                           meta=meta, params={"patch_size": stride0 // 2}, timing={},
                           device="cpu", batch_size=256, slide_path=str(slide.path),
                           model_path=None, config=InferenceConfig())


def time_outputs(slide, result, out: Path) -> dict[str, float]:
    """Seconds of postprocess and of each part of write_prediction (one run)."""
    import napari_lnmeta.core.heatmap as hm
    import napari_lnmeta.core.predict as pr
    import napari_lnmeta.io.omezarr as oz
    from napari_lnmeta.core import lesions as les

    parts: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                key = name if name != "zarr" else f"zarr {Path(a[0]).name.split('.')[0]}"
                parts[key] = parts.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    patches = [(oz, "write_ome_zarr", "zarr"), (pr, "overview_image", "overview image"),
               (pr, "write_png", "overview png"), (pr, "write_lesions_geojson", "lesions"),
               (hm, "write_png", None), (les, "write_lesions_geojson", None)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, label in patches:
            if label:
                setattr(m, n, timed(label, getattr(m, n)))
        t = time.perf_counter()
        pred = pr.postprocess(result)
        parts["postprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        pr.write_prediction(pred, out, overwrite=True, slide=slide)
        parts["write_prediction"] = time.perf_counter() - t
    finally:
        for m, n, f in saved:
            setattr(m, n, f)
    named = sum(v for k, v in parts.items() if k not in ("postprocess", "write_prediction"))
    parts["summary + rest"] = parts["write_prediction"] - named
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one grid, one repeat")
    ap.add_argument("--repeat", type=int, default=3, help="runs per grid (best is printed)")
    args = ap.parse_args(argv)

    from bench_inference import tissue_band_pyramid

    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.slide import open_slide

    path = tissue_band_pyramid(SLIDE_SHAPE[0], 0.4, width=SLIDE_SHAPE[1])
    slide = open_slide(path)
    tissue_mask(slide)  # the process state the writer meets in a run (imports, slide open)
    strides = [448] if args.quick else [448, 192]
    repeat = 1 if args.quick else max(1, args.repeat)
    print(f"slide {slide.shape[0]} x {slide.shape[1]} px at {slide.mpp} µm/px, 40 % tissue")
    with tempfile.TemporaryDirectory() as td:
        for stride0 in strides:
            result = synthetic_result(slide, stride0)
            runs = [time_outputs(slide, result, Path(td) / f"out{stride0}")
                    for _ in range(repeat)]
            best = min(runs, key=lambda r: r["write_prediction"])
            gh, gw = result.probability.shape
            size = sum(f.stat().st_size for f in (Path(td) / f"out{stride0}").rglob("*")
                       if f.is_file())
            print(f"grid {gh} x {gw} = {gh * gw:,} cells ({int(result.scored.sum()):,} analysed, "
                  f"stride {stride0} level-0 px): write_prediction "
                  f"{best['write_prediction']:.3f} s (best of {repeat}; in order, the first "
                  "in this process: "
                  + ", ".join(f"{r['write_prediction']:.3f}" for r in runs)
                  + f"; target < 0.5 s), postprocess {best['postprocess']:.3f} s, "
                  f"{size / 2**20:.1f} MiB on disk")
            for k, v in best.items():
                if k not in ("write_prediction", "postprocess"):
                    print(f"    {k:<22} {v:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
