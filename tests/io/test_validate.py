"""The pixel-size rule, the strict JSON writer and the JPEG tile checks."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from napari_lnmeta.errors import InputError, SlideError
from napari_lnmeta.io import jsonio
from napari_lnmeta.io.slide import CorruptTileError, jpeg_problem, open_slide
from napari_lnmeta.io.validate import MPP_MAX, MPP_MIN, check_mpp, mpp_problem


@pytest.mark.parametrize("v", [MPP_MIN, 0.243, "0.5", 7.776, 100, MPP_MAX])
def test_pixel_sizes_inside_the_rule_pass(v):
    assert check_mpp(v, what="--mpp") == float(v)


@pytest.mark.parametrize("v", [0, -0.5, 0.00999, 1000.01, 1e9, 1e-300, 1e300, math.inf,
                               -math.inf, math.nan, "abc", "", None, True, [0.5]])
def test_pixel_sizes_outside_the_rule_are_refused_in_one_line(v, tmp_path):
    assert mpp_problem(v) is not None
    with pytest.raises(InputError) as e:
        check_mpp(v, what="OME PhysicalSize", path=tmp_path / "s.ome.tif")
    msg = str(e.value)
    assert "s.ome.tif" in msg and "OME PhysicalSize" in msg and "\n" not in msg
    with pytest.raises(SlideError):
        check_mpp(v, what="--mpp", path=tmp_path / "s.svs", error=SlideError)


def test_json_writer_never_writes_nan_or_infinity(tmp_path):
    obj = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": np.float32("nan"),
           "d": np.arange(3), "e": np.float64(0.25), "f": np.int64(7), "g": np.bool_(True),
           "h": tmp_path, 3: "int key"}
    text = jsonio.dumps(obj)

    def refuse(name):
        raise ValueError(name)

    back = json.loads(text, parse_constant=refuse)
    assert back == {"a": None, "b": [1.0, None, None], "c": None, "d": [0, 1, 2], "e": 0.25,
                    "f": 7, "g": True, "h": str(tmp_path), "3": "int key"}
    p = jsonio.write_json(tmp_path / "x.json", {"score": math.nan})
    assert json.loads(p.read_text(), parse_constant=refuse) == {"score": None}
    with pytest.raises(TypeError):  # nothing unknown is written as something else
        jsonio.dumps({"x": object()})


# --------------------------------------------------------------------------------------
# JPEG tile checks on the real CAMELYON16 OME-TIFF
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ome_tiles(camelyon):
    """Stored bytes of every level-2 tile of the CAMELYON16 OME-TIFF."""
    import tifffile

    with tifffile.TiffFile(camelyon / "tumor_001_level5.ome.tif") as tf:
        page = tf.series[0].levels[2].keyframe
        out = []
        for off, n in zip(page.dataoffsets, page.databytecounts, strict=True):
            tf.filehandle.seek(off)
            out.append(tf.filehandle.read(n))
    return out


def test_every_real_tile_passes_the_checks(ome_tiles):
    assert all(jpeg_problem(t) is None for t in ome_tiles)


def test_structural_damage_is_named(ome_tiles):
    t = ome_tiles[10]
    assert "SOI" in jpeg_problem(b"\0\0" + t[2:])
    assert "EOI" in jpeg_problem(t[: len(t) // 2])
    sos = t.find(b"\xff\xda")
    bad = bytearray(t)
    bad[sos + 200] = 0xFF  # a marker that cannot appear in entropy-coded data
    bad[sos + 201] = 0xC8
    assert "marker" in jpeg_problem(bytes(bad), strict=False)
    assert jpeg_problem(bytes(bad[:-2]) + b"\xff\xd9" + bytes(16)) is not None
    assert jpeg_problem(t + bytes(16)) is None  # zero padding after EOI is allowed


def test_flipped_bytes_are_detected_in_most_tiles(ome_tiles):
    """20 flipped bytes (the hostile case) in every tile: each one is caught."""
    caught = 0
    for t in ome_tiles:
        b = bytearray(t)
        for k in range(20):
            b[len(b) // 2 + 37 * k] ^= 0xFF
        caught += jpeg_problem(bytes(b)) is not None
    assert caught == len(ome_tiles)


def test_a_corrupt_tile_is_named_with_level_index_and_region(camelyon, tmp_path):
    import tifffile

    path = tmp_path / "t.ome.tif"
    shutil.copy(camelyon / "tumor_001_level5.ome.tif", path)
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[2].keyframe
        off, n = page.dataoffsets[10], page.databytecounts[10]
    data = bytearray(path.read_bytes())
    data[off:off + n] = bytes(n)  # a zeroed tile
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    with pytest.raises(CorruptTileError) as e:
        slide.read_region((3100, 1100), (16, 16), level=2)
    err = e.value
    assert (err.level, err.tile, err.region) == (2, (3, 1), (3072, 1024, 4096, 2048))
    assert "level 2, tile (3, 1)" in str(err) and "rows 3072-4096" in str(err)
    # a large read through the zarr store names the same tile
    with pytest.raises(CorruptTileError) as e:
        slide.read_region((0, 0), (1792, 768), level=2)
    assert e.value.tile == (3, 1)
    # neighbouring tiles still read
    assert slide.read_region((0, 0), (16, 16), level=2).shape == (16, 16, 3)


def test_the_strict_decode_refuses_every_stream_the_marker_scan_refuses(ome_tiles):
    """YCbCr tiles are checked by the strict decode alone (the marker scan only names the
    damage): on damaged real tiles, nothing the scan catches gets past the decode."""
    import random

    import simplejpeg

    from napari_lnmeta.io._tiles import _ends_problem, _structure_problem

    rng = random.Random(7)
    caught_by_scan = 0
    for _rep in range(60):
        for t in ome_tiles:
            b = bytearray(t)
            for _ in range(rng.choice([1, 3, 20])):
                b[rng.randrange(300, len(b) - 2)] ^= rng.randrange(1, 256)
            b = bytes(b)
            problem, end = _ends_problem(b)
            if problem is not None or _structure_problem(b, end) is None:
                continue
            caught_by_scan += 1
            with pytest.raises(ValueError):
                simplejpeg.decode_jpeg(b, colorspace="RGB", strict=True)
    assert caught_by_scan > 20
