"""Whole-slide inference: pipeline vs bare model, vs a naive loop, tissue scaling, peak RSS.

Prints, in one run on one device (no assertions):

1. **I/O hidden**: patches/s of the inference loop of :func:`run_inference_job` (tissue
   patches read by the thread pool, prefetched, preprocessed on the device) divided by
   the model's bare forward patches/s on in-memory batches of the same size (target
   >= 0.9);
2. **vs a naive loop**: the same loop divided by OpenSlide ``read_region`` per patch
   followed by the model on a batch of 1 (target >= 10x; on a CPU the model dominates
   both, so expect far less there: the gap comes from batching on a GPU);
3. **cost follows tissue**: a slide with 10 % tissue vs the same slide fully covered
   (inference loop and end to end; ~0.1 expected);
4. **peak RSS** of ``lnmeta predict``'s job on a 100 000 x 100 000 px slide, in a fresh
   process (target < 2 GB).

Slides are JPEG-tiled OME-TIFF pyramids of real H&E tiles (CMU-1) in a band of tissue,
generated once under ``~/.cache/lnmeta-bench`` or ``$LNMETA_BENCH_CACHE``. Models are built
with random weights (speed does not depend on them).

6. with ``--cohort N``: N copies of the 100 000 x 200 000 px slide through
   ``predict_to_folder_job`` in one fresh process: the cold first slide (from process start)
   and the warm ones (model cache, probed batch size), peak RSS (GPU targets: warm
   < 5 s resnet18, < 8 s resnet50; cold < 10 s).

Run: ``python benchmarks/bench_inference.py [--quick] [--device auto] [--arch resnet18]
[--patch 224] [--cohort 5 [--only-cohort]]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cache_dir, real_tiles

SLIDE_MPP = 0.25  # level-0 µm/px of the generated slides


def tissue_band_pyramid(size: int, fraction: float, *, width: int | None = None,
                        tile: int = 512, quality: int = 85) -> Path:
    """A ``size`` x ``width`` (default square) JPEG-tiled OME-TIFF pyramid with real H&E
    in a vertical band.

    The band (``fraction`` of the width, centred, aligned to level-0 tiles) is the same
    on every level (coarser levels hold 2x-downsampled tiles and mixed tiles at the band
    edges), so tissue detection at low resolution sees exactly the level-0 tissue.
    Tiles are JPEG-encoded once per level and written pre-compressed (fast even at
    100 000 px). Made once under the benchmark cache.
    """
    import imagecodecs
    import tifffile
    from PIL import Image

    width = width or size
    shape = f"{size}" if width == size else f"{size}x{width}"
    path = cache_dir() / f"inference_{shape}_{round(fraction * 100)}.ome.tif"
    if path.exists():
        return path
    srcs = real_tiles(16, tile)
    nt0 = -(-width // tile)
    band = max(1, round(nt0 * fraction))
    lo0 = (nt0 - band) // 2 * tile
    hi0 = lo0 + band * tile
    sizes = [(size, width)]
    while max(sizes[-1]) > 1024:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    white = np.full((tile, tile, 3), 243, np.uint8)

    def level_tiles(k: int, n: tuple[int, int]):
        ds = 2 ** k
        # real tiles downsampled by ds, tiled back to a full tile
        texture = []
        for t in srcs:
            small = np.asarray(Image.fromarray(t).resize((max(tile // ds, 1),) * 2, Image.BOX))
            reps = -(-tile // small.shape[0])
            texture.append(np.tile(small, (reps, reps, 1))[:tile, :tile])
        enc_t = [imagecodecs.jpeg_encode(t, level=quality) for t in texture]
        enc_w = imagecodecs.jpeg_encode(white, level=quality)
        lo, hi = lo0 / ds, hi0 / ds
        for ty in range(-(-n[0] // tile)):
            for tx in range(-(-n[1] // tile)):
                v = (ty * 7 + tx * 3) % len(srcs)
                a = int(np.clip(np.floor(lo - tx * tile), 0, tile))
                b = int(np.clip(np.ceil(hi - tx * tile), 0, tile))
                if a == 0 and b == tile:
                    yield enc_t[v]
                elif b <= a:
                    yield enc_w
                else:
                    mixed = white.copy()
                    mixed[:, a:b] = texture[v][:, a:b]
                    yield imagecodecs.jpeg_encode(mixed, level=quality)

    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        md = {"axes": "YXS", "PhysicalSizeX": SLIDE_MPP, "PhysicalSizeY": SLIDE_MPP}
        for k, n in enumerate(sizes):
            kw = dict(shape=(*n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg")
            if k == 0:
                tw.write(level_tiles(k, n), subifds=len(sizes) - 1, metadata=md, **kw)
            else:
                tw.write(level_tiles(k, n), subfiletype=1, **kw)
    tmp.rename(path)
    return path


def make_model(arch: str, patch: int, mpp: float, path: Path) -> Path:
    import torch

    from napari_lnmeta.models.io import ModelMeta, save_model
    from napari_lnmeta.models.registry import build_model

    torch.manual_seed(0)
    net = build_model(arch, 2).eval()
    meta = ModelMeta(architecture=arch, classes=["normal", "tumour"], patch_size=patch, mpp=mpp)
    return save_model(path, net, meta, overwrite=True)


def bare_forward_rate(model_path: Path, device: str, batch: int, n_batches: int,
                      cfg_kw: dict) -> tuple[float, float]:
    """(bare forward, forward + on-device preprocessing) patches/s on in-memory batches."""
    import torch

    from napari_lnmeta.core.inference import (
        InferenceConfig,
        PatchModel,
        load_inference_model,
        resolve_device,
        tumour_index,
    )

    dev = resolve_device(device)
    cfg = InferenceConfig(model=str(model_path), device=device, **cfg_kw)
    net, meta, _ = load_inference_model(cfg, dev)
    pm = PatchModel(net, meta, dev, tumour=tumour_index(meta), tta=cfg.tta, amp=cfg.amp,
                    channels_last=cfg.channels_last)
    s = meta.patch_size
    rng = np.random.default_rng(0)
    x_u8 = torch.from_numpy(rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)).to(dev)
    x = pm.prepare(x_u8)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def rate(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            fn()
        sync()
        return n_batches * batch / (time.perf_counter() - t0)

    views = 8 if cfg.tta else 1

    def bare():
        for _ in range(views):
            pm.bare_forward(x)

    return rate(bare), rate(lambda: pm.probs(x_u8))


def naive_rate(slide_path: Path, grid, model_path: Path, device: str, n: int) -> float:
    """OpenSlide read_region per patch, then the model on a batch of 1 (no overlap)."""
    import openslide
    import torch

    from napari_lnmeta.core.inference import InferenceConfig as Cfg
    from napari_lnmeta.core.inference import (
        PatchModel,
        load_inference_model,
        resolve_device,
        tumour_index,
    )

    dev = resolve_device(device)
    net, meta, _ = load_inference_model(Cfg(model=str(model_path)), dev)
    pm = PatchModel(net, meta, dev, tumour=tumour_index(meta), amp=True, channels_last=False)
    osr = openslide.OpenSlide(str(slide_path))
    s0 = int(round(grid.size0))
    s = grid.patch_size
    idx = np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)

    def one(k):
        y, x = grid.coords[k]
        img = osr.read_region((int(x), int(y)), 0, (s0, s0)).convert("RGB")
        if s0 != s:
            img = img.resize((s, s))
        t = torch.from_numpy(np.asarray(img).copy())[None].to(dev)
        return float(pm.probs(t)[0])

    one(idx[0])
    t0 = time.perf_counter()
    for k in idx:
        one(k)
    return len(idx) / (time.perf_counter() - t0)


def reader_rate(slide_path: Path, grid, batch: int, workers: int, n: int = 8192, *,
                reserve: bool = True, direct: bool = True) -> tuple[float, int]:
    """Patches/s of the batch reader alone (no model) over the first ``n`` patches, and
    the tiles it decoded (direct tile reads only). ``reserve=False`` skips the engine's
    tile-cache reservation; ``direct=False`` reads through tifffile's zarr store."""
    import os

    from napari_lnmeta.core.inference import BatchReader, tile_working_set
    from napari_lnmeta.io.slide import open_slide

    idx = np.arange(min(n, len(grid)))
    batches = [idx[i:i + batch] for i in range(0, len(idx), batch)]
    old = os.environ.get("LNMETA_TIFF_DIRECT")
    os.environ["LNMETA_TIFF_DIRECT"] = "1" if direct else "0"
    try:
        slide = open_slide(slide_path)
        if reserve:
            slide.reserve_tile_cache(tile_working_set(slide, grid, batches, 4))  # as the engine
        reader = BatchReader(slide, grid, batches, batch_size=batch, workers=workers)
        t0 = time.perf_counter()
        n = 0
        for i, _, slot in reader:
            n += len(i)
            reader.release(slot)
        reader.close()
        return n / (time.perf_counter() - t0), slide._cache.loads
    finally:
        if old is None:
            os.environ.pop("LNMETA_TIFF_DIRECT", None)
        else:
            os.environ["LNMETA_TIFF_DIRECT"] = old


def device_decode_rate(slide_path: Path, grid, batch: int, device: str,
                       n: int = 8192) -> float | None:
    """Patches/s of whole JPEG tiles decoded on the device (no model), or None."""
    import torch

    from napari_lnmeta.core.inference import make_reader
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.io import resolve_device

    dev = resolve_device(device)
    idx = np.arange(min(n, len(grid)))
    batches = [idx[i:i + batch] for i in range(0, len(idx), batch)]
    reader, name = make_reader(open_slide(slide_path), grid, batches, batch_size=batch,
                               device=dev, decode="device")
    if name == "threads":
        reader.close()
        return None
    t0 = time.perf_counter()
    m = 0
    for i, _, _slot in reader:
        m += len(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    reader.close()
    return m / (time.perf_counter() - t0)


def child_predict(slide: Path, cfg: dict, out: Path) -> dict:
    """``predict_to_folder_job`` in a fresh process: wall time, timing, peak RSS (and GPU)."""
    code = RSS_CHILD.format(bench=str(Path(__file__).resolve().parent), cfg=json.dumps(cfg),
                            slide=str(slide), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_slide(slide_path: Path, cfg):
    from napari_lnmeta.core.inference import run_inference_job
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.progress import run

    t0 = time.perf_counter()
    res = run(run_inference_job(open_slide(slide_path), cfg))
    return res, time.perf_counter() - t0


RSS_CHILD = r"""
import json, sys, time, resource, threading
sys.path.insert(0, {bench!r})
from _common import PeakRSS
from napari_lnmeta.core.inference import InferenceConfig
from napari_lnmeta.core.predict import predict_to_folder_job
from napari_lnmeta.progress import run
cfg = InferenceConfig(**json.loads({cfg!r}))
t0 = time.perf_counter()
with PeakRSS(interval=0.01) as rss:
    pred = run(predict_to_folder_job({slide!r}, {out!r}, cfg, overwrite=True))
wall = time.perf_counter() - t0
gpu = None
if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    gpu = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
print(json.dumps({{"peak_rss_mb": rss.peak, "start_rss_mb": rss.start, "gpu_peak_mb": gpu,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "wall_s": wall, "timing": pred.result.timing,
                  "grid_shape": list(pred.result.grid.grid_shape),
                  "patches": len(pred.result.grid)}}))
"""


COHORT_CHILD = r"""
import json, os, resource, sys, time
t_start = time.perf_counter()
sys.path.insert(0, {bench!r})
from _common import PeakRSS
from napari_lnmeta.core.inference import InferenceConfig
from napari_lnmeta.core.predict import predict_to_folder_job
from napari_lnmeta.progress import run
cfg = InferenceConfig(**json.loads({cfg!r}))
out = []
with PeakRSS(interval=0.01) as rss:
    for k, slide in enumerate(json.loads({slides!r})):
        t0 = time.perf_counter()
        pred = run(predict_to_folder_job(slide, os.path.join({out!r}, str(k)), cfg, overwrite=True))
        out.append({{"wall_s": time.perf_counter() - (t_start if k == 0 else t0),
                     "patches": len(pred.result.grid), "timing": pred.result.timing}})
gpu = None
if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    gpu = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
print(json.dumps({{"slides": out, "peak_rss_mb": rss.peak, "gpu_peak_mb": gpu,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_cohort(wsi: Path, n: int, cfg: dict, work: Path, arch: str) -> None:
    """``n`` copies (symbolic links) of ``wsi`` through ``predict_to_folder_job`` one after the
    other in one fresh process: the first is the cold slide (imports, CUDA start, model
    load), the others run warm (model cache, probed batch size)."""
    links = []
    for k in range(n):
        link = work / f"cohort_{k}{''.join(wsi.suffixes)}"
        link.unlink(missing_ok=True)
        link.symlink_to(wsi)
        links.append(str(link))
    code = COHORT_CHILD.format(bench=str(Path(__file__).resolve().parent), cfg=json.dumps(cfg),
                               slides=json.dumps(links), out=str(work / "cohort_out"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(f"[6] cohort failed: {proc.stderr.strip().splitlines()[-1]}")
        return
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    sl = r["slides"]
    warm = [s["wall_s"] for s in sl[1:]]
    gpu = f", GPU peak {r['gpu_peak_mb']:.0f} MB" if r["gpu_peak_mb"] else ""
    print(f"[6] cohort of {n} x {wsi.name} ({sl[0]['patches']} tissue patches each), {arch}, "
          f"one process: cold first slide **{sl[0]['wall_s']:.1f} s** (from process start; "
          f"model {sl[0]['timing']['model_s']:.1f} s, tissue {sl[0]['timing']['tissue_s']:.1f} s, "
          f"loop {sl[0]['timing']['inference_s']:.1f} s) | warm slides "
          + ", ".join(f"{w:.1f}" for w in warm)
          + (f" s, **mean {sum(warm) / len(warm):.1f} s per slide**" if warm else "")
          + f" (model cached: {[s['timing'].get('model_cached') for s in sl]}) | peak RSS "
          f"{r['ru_maxrss_mb']:.0f} MB{gpu} (targets: warm < 5 s resnet18, < 8 s resnet50; "
          "cold < 10 s)")
    for s in sl[1:2]:
        t = s["timing"]
        print(f"    a warm slide: model {t['model_s']:.2f} s, tissue {t['tissue_s']:.2f} s, "
              f"batch probe {t['batch_probe_s']:.2f} s, loop {t['inference_s']:.2f} s at "
              f"{t['patches_per_s']:.0f} patches/s, the rest (post-processing, writing) "
              f"{s['wall_s'] - t['total_s']:.2f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller slides, fewer patches")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="resnet18", help="model for ratios 1-3")
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--mpp", type=float, default=0.5, help="read µm/px of the model")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="reader threads (0 = default)")
    ap.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                    help="JPEG tiles decoded by the reader threads or on the device")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--wsi", action=argparse.BooleanOptionalAction, default=None,
                    help="time a 100 000 x 200 000 px slide end to end (default: on CUDA)")
    ap.add_argument("--wsi-tissue", type=float, default=0.4,
                    help="tissue fraction of that slide (a centred band)")
    ap.add_argument("--cohort", type=int, default=0, metavar="N",
                    help="[6]: N copies of the 100 000 x 200 000 px slide in one process "
                         "(cold first slide, then warm); e.g. 5 on a GPU")
    ap.add_argument("--only-cohort", action="store_true",
                    help="run [6] alone (with --cohort): the GPU acceptance run of one model")
    args = ap.parse_args(argv)

    import torch

    from napari_lnmeta.core.inference import InferenceConfig
    from napari_lnmeta.models.io import resolve_device

    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} torch threads)"
    print(f"device: {dev} = {name}; torch {torch.__version__}")
    if args.only_cohort:
        work = Path(tempfile.mkdtemp(prefix="lnmeta-bench-", dir=cache_dir()))
        model = make_model(args.arch, args.patch, args.mpp, work / "model.safetensors")
        wsi = tissue_band_pyramid(100_000, args.wsi_tissue, width=200_000)
        run_cohort(wsi, max(2, args.cohort), {"model": str(model), "device": args.device,
                                              "workers": args.workers, "decode": args.decode},
                   work, args.arch)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        return 0
    size = 5120 if args.quick else 10240  # 512-px tiles: a 10 % band is whole tiles
    if dev.type == "cuda":
        size *= 8  # ~33 000 patches: seconds of steady state on a GPU, not a ramp-up
    full = tissue_band_pyramid(size, 1.0)
    tenth = tissue_band_pyramid(size, 0.1)
    work = Path(tempfile.mkdtemp(prefix="lnmeta-bench-", dir=cache_dir()))
    model = make_model(args.arch, args.patch, args.mpp, work / "model.safetensors")
    cfg_kw = {"batch_size": args.batch_size, "workers": args.workers, "decode": args.decode}
    cfg = InferenceConfig(model=str(model), device=args.device, **cfg_kw)
    print(f"model: {args.arch}, {args.patch} px at {args.mpp} µm/px; slides {size}x{size} px "
          f"at {SLIDE_MPP} µm/px: {full.name}, {tenth.name}")

    # -- 1. pipeline vs bare forward -----------------------------------------------------
    # The bare forward is timed right before and right after the pipeline run (same batch
    # size, as many patches as the slide has) and averaged, so a machine whose load drifts
    # during the run biases neither side.
    bs = args.batch_size or (32 if dev.type == "cpu" else 0)
    if not bs:
        probe, _ = run_slide(tenth, cfg)
        bs = probe.batch_size
    cfg_kw["batch_size"] = bs
    cfg = InferenceConfig(model=str(model), device=args.device, **cfg_kw)
    n_b = 4 if args.quick else 8
    if dev.type == "cuda":
        n_b = 50
    bare1, prep1 = bare_forward_rate(model, args.device, bs, n_b, cfg_kw)
    res_full, wall_full = run_slide(full, cfg)
    bare2, prep2 = bare_forward_rate(model, args.device, bs, n_b, cfg_kw)
    bare, bare_prep = (bare1 + bare2) / 2, (prep1 + prep2) / 2
    t = res_full.timing
    pipe = t["patches_per_s"]
    print(f"[1] pipeline loop {pipe:.1f} patches/s ({t['patches_run']} patches, batch {bs}, "
          f"reader {t['reader']}, "
          f"read stall {t['read_wait_s']:.2f} s of {t['inference_s']:.1f} s) | bare forward "
          f"{bare:.1f} patches/s (before {bare1:.1f}, after {bare2:.1f}), with on-device "
          f"preprocessing {bare_prep:.1f} | ratio pipeline/bare = {pipe / bare:.3f} "
          f"(target >= 0.9); end to end {t['patches_run'] / wall_full:.1f} patches/s incl. "
          f"tissue {t['tissue_s']:.1f} s")

    # the reader alone, to see whether it or the model sets the pace
    from napari_lnmeta.core.inference import BatchReader

    default_w = BatchReader.default_workers()
    ws = sorted({1, default_w, *([default_w // 2] if dev.type == "cuda" else [])})
    rates = {w: reader_rate(full, res_full.grid, bs, w)[0] for w in ws}
    print("    reader alone (no model): " + ", ".join(
        f"{w} thread{'s' if w > 1 else ''} {r:.0f} patches/s" for w, r in rates.items())
        + f" | default {default_w} threads; reader/bare = {rates[default_w] / bare:.2f}")
    # what the direct tile reads and the cache reservation change, on a 40 960 px slide
    # with a 40 % band (3 367 patches): eight threads on batches of 1024, as on a GPU host
    from napari_lnmeta.core.tiling import make_grid
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.slide import open_slide

    band = tissue_band_pyramid(40960, 0.4)
    bslide = open_slide(band)
    bgrid = make_grid(bslide, patch_size=args.patch, mpp=args.mpp, tissue=tissue_mask(bslide))
    (_, kept), (_, thrash) = (reader_rate(band, bgrid, 1024, 8, reserve=r) for r in (True, False))
    direct1, zarr1 = (reader_rate(band, bgrid, bs, 1, direct=d)[0] for d in (True, False))
    print(f"    {band.name}, {len(bgrid)} patches: 8 threads on batches of 1024 decoded "
          f"{kept} tiles with the cache reservation, {thrash} without | one thread: "
          f"{direct1:.0f} patches/s with direct tile reads, {zarr1:.0f} through the zarr "
          f"store ({direct1 / zarr1:.2f}x)")
    if dev.type == "cuda":
        dr = device_decode_rate(full, res_full.grid, bs, args.device)
        print("    JPEG tiles decoded on the device (no model): "
              + (f"{dr:.0f} patches/s; decoder/bare = {dr / bare:.2f}" if dr else
                 "not available"))

    # -- 2. vs naive loop ----------------------------------------------------------------
    n_naive = 40 if args.quick else 120
    naive = naive_rate(full, res_full.grid, model, args.device, n_naive)
    print(f"[2] naive loop (OpenSlide read_region per patch + batch of 1) {naive:.1f} patches/s "
          f"on {min(n_naive, len(res_full.grid))} patches | ratio pipeline/naive = "
          f"{pipe / naive:.2f}x (target >= 10x)")

    # -- 3. cost follows tissue ----------------------------------------------------------
    res_10, wall_10 = run_slide(tenth, cfg)
    t10 = res_10.timing
    print(f"[3] 10% tissue: {t10['patches_run']} patches, loop {t10['inference_s']:.2f} s, "
          f"end to end {wall_10:.2f} s | full: {t['patches_run']} patches, loop "
          f"{t['inference_s']:.2f} s, end to end {wall_full:.2f} s | ratios: patches "
          f"{t10['patches_run'] / t['patches_run']:.3f}, loop time "
          f"{t10['inference_s'] / t['inference_s']:.3f}, end to end {wall_10 / wall_full:.3f} "
          f"(~0.1 expected)")

    # -- 5. seconds per 100 000 x 200 000 px slide (a GPU measurement) ------------------
    if args.wsi or (args.wsi is None and dev.type == "cuda"):
        t0 = time.perf_counter()
        wsi = tissue_band_pyramid(100_000, args.wsi_tissue, width=200_000)
        made = time.perf_counter() - t0
        wcfg = {"model": str(model), "device": args.device, "workers": args.workers,
                "decode": args.decode}
        for tta in (False, True) if dev.type == "cuda" else (False,):
            r = child_predict(wsi, {**wcfg, "tta": tta}, work / f"wsi_out_{int(tta)}")
            tt = r["timing"]
            gpu = f", GPU peak {r['gpu_peak_mb']:.0f} MB" if r["gpu_peak_mb"] else ""
            print(f"[5] 100000x200000 px slide ({wsi.stat().st_size / 2**30:.2f} GiB, "
                  f"{args.wsi_tissue:.0%} tissue band, ready in {made:.0f} s), {args.arch} "
                  f"{args.patch} px at {args.mpp} µm/px, stride = patch, TTA {'8x' if tta else 'off'}: "
                  f"{r['patches']} tissue patches, **{r['wall_s']:.1f} s per slide** end to end "
                  f"(model {tt['model_s']:.1f} s, tissue {tt['tissue_s']:.1f} s, loop "
                  f"{tt['inference_s']:.1f} s at {tt['patches_per_s']:.0f} patches/s, read stall "
                  f"{tt['read_wait_s']:.1f} s, batch {tt['forward_batch_size']}, reader "
                  f"{tt['reader']}) | peak RSS "
                  f"{r['ru_maxrss_mb']:.0f} MB{gpu} (goal < 20 s on one H100, bar 60 s)")

    # -- 6. a warm cohort of 100 000 x 200 000 px slides -------------------------------
    if args.cohort:
        wsi = tissue_band_pyramid(100_000, args.wsi_tissue, width=200_000)
        run_cohort(wsi, args.cohort, {"model": str(model), "device": args.device,
                                      "workers": args.workers, "decode": args.decode},
                   work, args.arch)

    # -- 4. peak RSS on a 100 000 x 100 000 px slide -------------------------------------
    if not args.skip_rss:
        t0 = time.perf_counter()
        big = tissue_band_pyramid(100_000, 0.4)
        made = time.perf_counter() - t0
        small = make_model("lnmeta_cnn_small", 64, SLIDE_MPP, work / "small.safetensors")
        stride = 2048 if args.quick else 1024
        rss_cfg = {"model": str(small), "device": args.device, "stride": stride}
        try:
            r = child_predict(big, rss_cfg, work / "big_out")
        except RuntimeError as e:
            print(f"[4] failed: {e}")
        else:
            tt = r["timing"]
            print(f"[4] 100000x100000 px slide ({big.stat().st_size / 2**30:.2f} GiB, ready in "
                  f"{made:.0f} s): lnmeta_cnn_small 64 px at level 0, stride {stride} px, "
                  f"{r['patches']} tissue patches of a {r['grid_shape'][0]}x{r['grid_shape'][1]} "
                  f"grid in {r['wall_s']:.1f} s (tissue {tt['tissue_s']:.1f} s, loop "
                  f"{tt['inference_s']:.1f} s, {tt['patches_per_s']:.0f} patches/s) | peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (ru_maxrss {r['ru_maxrss_mb']:.0f} MB; "
                  f"{r['start_rss_mb']:.0f} MB after imports) | ratio peak/2 GB = "
                  f"{r['ru_maxrss_mb'] / 2048:.2f} (target < 1)")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
