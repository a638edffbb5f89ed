"""What the JPEG tile checks cost and catch, on the real CAMELYON16 OME-TIFF tiles.

Prints, for every level-0 tile (256 x 256): the time of a decode, of the structure check,
of the default full check (structure + a strict libjpeg-turbo decode of the entropy-coded
data) and of the ``transcode`` check (full + the JPEG XL transcoder), as ratios to the
decode measured in this run; and how many damaged copies of the tiles (1 and 20 flipped
bytes, a truncated stream) each check catches.

    python benchmarks/bench_jpeg_checks.py [--quick]
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = Path(os.environ.get("LNMETA_SHARED_DATA", ROOT.parent / "shared" / "data"))


def main(argv: list[str]) -> int:
    import imagecodecs
    import tifffile

    from napari_lnmeta.io.slide import jpeg_problem

    quick = "--quick" in argv
    path = SHARED / "camelyon16_tumor001_lowres" / "tumor_001_level5.ome.tif"
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        tiles = []
        for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
            tf.filehandle.seek(off)
            tiles.append(tf.filehandle.read(n))
    if quick:
        tiles = tiles[::4]

    def per_tile(fn) -> float:
        best = float("inf")
        for _ in range(2 if quick else 3):
            t0 = time.perf_counter()
            for t in tiles:
                fn(t)
            best = min(best, time.perf_counter() - t0)
        return best / len(tiles)

    dec = per_tile(imagecodecs.jpeg8_decode)
    st = per_tile(lambda t: jpeg_problem(t, strict=False))
    full = per_tile(jpeg_problem)
    trans = per_tile(lambda t: jpeg_problem(t, transcode=True))
    print(f"{len(tiles)} real JPEG tiles {page.tilelength}x{page.tilewidth} of {path.name}")
    print(f"decode {dec * 1e3:.2f} ms/tile; structure check {st / dec:.2f}x decode; "
          f"full check {full / dec:.2f}x decode ({full * 1e3:.2f} ms/tile); transcode check "
          f"{trans / dec:.2f}x decode ({trans * 1e3:.2f} ms/tile)")
    alarms = [sum(jpeg_problem(t, **kw) is not None for t in tiles)
              for kw in ({}, {"transcode": True})]
    print(f"false alarms on the intact tiles: full {alarms[0]}, transcode {alarms[1]}")
    # a first read of every tile through the slide's tile reader: YCbCr tiles are checked
    # by the strict decode that makes their pixels, instead of a check and then a decode
    from napari_lnmeta.io.slide import open_slide

    def first_reads(fused: bool) -> float:
        best = float("inf")
        for _ in range(2 if quick else 3):
            dec = open_slide(path)._tile_decoder(0)
            if not fused:
                dec._strict_decode = False
            t0 = time.perf_counter()
            for ty in range(-(-dec.h // dec.th)):
                for tx in range(dec.ntx):
                    dec.tile(ty, tx)
            best = min(best, time.perf_counter() - t0)
        return best

    one, two = first_reads(True), first_reads(False)
    print(f"first read of the {len(page.dataoffsets)} tiles (full check + pixels): one strict "
          f"decode {one:.3f} s, check then decode {two:.3f} s ({two / one:.2f}x)")
    rng = random.Random(0)

    def damaged(kind: str, t: bytes) -> bytes:
        b = bytearray(t)
        if kind == "1 flipped byte":
            b[rng.randrange(700, len(b) - 4)] ^= 0xFF
        elif kind == "20 flipped bytes":
            for k in range(20):
                b[len(b) // 2 + 37 * k] ^= 0xFF
        else:
            b = b[: len(b) * 3 // 4]
        return bytes(b)

    for kind in ("1 flipped byte", "20 flipped bytes", "truncated to 3/4"):
        bad = [damaged(kind, t) for t in tiles]
        s = sum(jpeg_problem(b, strict=False) is not None for b in bad)
        f = sum(jpeg_problem(b) is not None for b in bad)
        x = sum(jpeg_problem(b, strict=False, transcode=True) is not None for b in bad)
        u = sum(jpeg_problem(b, transcode=True) is not None for b in bad)
        print(f"{kind:>18}: structure catches {s}/{len(bad)}, full check {f}/{len(bad)}, "
              f"structure + transcoder alone {x}/{len(bad)}, transcode check {u}/{len(bad)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
