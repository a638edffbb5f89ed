"""Helpers shared by the benchmarks: cache folder, shared data, RSS sampling."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LNMETA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """Large generated inputs live outside the repository (made once, reused)."""
    d = Path(os.environ.get("LNMETA_BENCH_CACHE", Path.home() / ".cache" / "lnmeta-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class PeakRSS:
    """Sample this process's RSS every few ms; ``peak - start`` is the growth."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth(self) -> float:
        return self.peak - self.start


def real_tiles(n: int = 16, size: int = 512):
    """``n`` real H&E tiles cut from the CMU-1 sample (tissue-rich ones first)."""
    import numpy as np
    import openslide

    osr = openslide.OpenSlide(str(SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"))
    w, h = osr.dimensions
    tiles = []
    for y in range(0, h - size, size // 2):
        for x in range(0, w - size, size // 2):
            t = np.asarray(osr.read_region((x, y), 0, (size, size)).convert("RGB"))
            tiles.append(t)
    tiles.sort(key=lambda t: t.mean())
    return tiles[:n]


def synthetic_pyramid(name: str, size: int, *, tissue_fraction: float = 1.0,
                      tile: int = 512, quality: int = 85) -> Path:
    """A JPEG-tiled OME-TIFF pyramid ``size`` x ``size`` px of real tissue tiles.

    The tiles are encoded once and written pre-compressed, so a 100 000 px slide takes
    seconds, not an hour. Outside the tissue fraction (a centred band) tiles are white.
    Levels are SubIFDs down to < 1024 px; µm/px is 0.25.
    """
    import imagecodecs
    import numpy as np
    import tifffile

    path = cache_dir() / f"{name}_{size}_{int(tissue_fraction * 100)}.ome.tif"
    if path.exists():
        return path
    tiles = [imagecodecs.jpeg_encode(t, level=quality) for t in real_tiles(16, tile)]
    white = imagecodecs.jpeg_encode(np.full((tile, tile, 3), 243, np.uint8), level=quality)
    shapes = [size]
    while shapes[-1] > 1024:
        shapes.append(shapes[-1] // 2)
    tmp = path.with_suffix(".tmp")

    def gen(n):
        ntiles = -(-n // tile)
        band = ntiles * tissue_fraction
        lo = (ntiles - band) / 2
        for ty in range(ntiles):
            for tx in range(ntiles):
                inside = lo <= tx < lo + band
                yield tiles[(ty * 7 + tx * 3) % len(tiles)] if inside else white

    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        md = {"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}
        for i, n in enumerate(shapes):
            kw = dict(shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg")
            if i == 0:
                tw.write(gen(n), subifds=len(shapes) - 1, metadata=md, **kw)
            else:
                tw.write(gen(n), subfiletype=1, **kw)
    tmp.rename(path)
    return path
