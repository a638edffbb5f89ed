"""Levels read through their JPEG tiles give exactly the pixels of the slower paths.

Aperio SVS and generic tiled TIFF are read by decoding their tiles directly instead of
through OpenSlide's read_region; large TIFF/OME-TIFF regions are decoded tile by tile in
threads instead of through the zarr store. ``LNMETA_TIFF_DIRECT=0`` gives the old paths,
which every read here is compared with, bit for bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from napari_lnmeta.io.slide import (
    CorruptTileError,
    OpenSlideSlide,
    TiffSlide,
    jpeg_problem,
    open_slide,
)


class _Slow:
    """The slide opened and read with ``LNMETA_TIFF_DIRECT=0`` (the old paths)."""

    def __init__(self, path, monkeypatch):
        self.mp = monkeypatch
        with self.mp.context() as m:
            m.setenv("LNMETA_TIFF_DIRECT", "0")
            self.slide = open_slide(path)

    def __getattr__(self, name):
        attr = getattr(self.slide, name)
        if not callable(attr):
            return attr

        def call(*a, **kw):
            with self.mp.context() as m:
                m.setenv("LNMETA_TIFF_DIRECT", "0")
                return attr(*a, **kw)

        return call


def _pair(path, monkeypatch, cls):
    fast, slow = open_slide(path), _Slow(path, monkeypatch)
    assert isinstance(fast, cls) and isinstance(slow.slide, cls)
    return fast, slow


def _regions(slide):
    """Level-0 locations and sizes: patches on and off whole level pixels, tile-crossing
    windows, windows over the edges, whole levels."""
    h0, w0 = slide.shape
    out = []
    for level, ds in enumerate(slide.level_downsamples):
        lh, lw = slide.level_shapes[level]
        out += [(level, (0, 0), (96, 96)), (level, (round(37 * ds), round(250 * ds)), (96, 224)),
                (level, (37, 251), (64, 64)),  # not on whole level pixels at level > 0
                (level, (h0 - round(50 * ds), w0 - round(30 * ds)), (128, 128)),
                (level, (-40, -17), (100, 80)),
                (level, (0, 0), (lh, lw))]
    return out


@pytest.mark.parametrize("name", ["cmu1_small_region_svs/CMU-1-Small-Region.svs",
                                  "camelyon16_tumor001_lowres/tumor_001_level5_pyramid.tif"])
def test_openslide_levels_read_through_tiles_match_openslide(shared_data, name, monkeypatch):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no µm/px in the pyramid TIFF
        fast, slow = _pair(shared_data / name, monkeypatch, OpenSlideSlide)
    for level in range(fast.level_count):
        assert fast._direct(level) is not None, level
        assert slow._direct(level) is None
    for level, loc, size in _regions(fast):
        a = fast.read_region(loc, size, level=level)
        b = slow.read_region(loc, size, level=level)
        assert a.shape == (*size, 3)
        assert np.array_equal(a, b), (level, loc, size)
    # mpp reads (resampled from the nearest finer level) and the low-resolution image
    if fast.mpp:
        assert np.array_equal(fast.read_region((100, 200), (50, 70), mpp=fast.mpp * 3),
                              slow.read_region((100, 200), (50, 70), mpp=slow.mpp * 3))
    for target in (2.0, 8.0):
        ra, da = fast.low_res(target)
        rb, db = slow.low_res(target)
        assert da == db and np.array_equal(ra, rb)


def test_large_tiff_regions_decoded_in_threads_match_the_zarr_store(camelyon, monkeypatch):
    fast, slow = _pair(camelyon / "tumor_001_level5.ome.tif", monkeypatch, TiffSlide)
    monkeypatch.setenv("LNMETA_REGION_THREADS", "3")
    for level, loc, size in _regions(fast):
        assert np.array_equal(fast.read_region(loc, size, level=level),
                              slow.read_region(loc, size, level=level)), (level, loc, size)


def test_a_level_that_openslide_paints_differently_stays_with_openslide(cmu1, monkeypatch):
    """The per-level cross-check: when the first tile decoded directly differs from
    OpenSlide's read of it, the level is read by OpenSlide."""
    slide = open_slide(cmu1)
    dec = slide._tiff_level(0)
    real = dec.tile

    def shifted(ty, tx, *, check=True):
        return real(ty, tx, check=check) ^ np.uint8(1)

    monkeypatch.setattr(dec, "tile", shifted)
    assert slide._direct(0) is None
    fresh = open_slide(cmu1)
    assert np.array_equal(slide.read_region((10, 10), (64, 64), level=0),
                          fresh.read_region((10, 10), (64, 64), level=0))


def _damaged_svs(cmu1, tmp_path, tile: tuple[int, int]):
    """A copy of CMU-1 whose level-0 ``tile`` has 20 flipped bytes; its tiled page."""
    import tifffile

    path = tmp_path / "damaged.svs"
    shutil.copy(cmu1, path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        k = tile[0] * (-(-page.imagewidth // page.tilewidth)) + tile[1]
        off, n = page.dataoffsets[k], page.databytecounts[k]
    data = bytearray(path.read_bytes())
    for j in range(20):
        data[off + n // 2 + 37 * j] ^= 0xFF
    path.write_bytes(bytes(data))
    return path, page


def test_a_damaged_svs_tile_is_named_by_the_direct_reads(cmu1, tmp_path):
    path, page = _damaged_svs(cmu1, tmp_path, (3, 2))
    slide = open_slide(path)
    assert slide._direct(0) is not None
    slide.read_region((0, 0), (200, 200), level=0)  # tile (0, 0) is intact
    with pytest.raises(CorruptTileError) as e:
        slide.read_region((3 * page.tilelength + 5, 2 * page.tilewidth + 5), (32, 32), level=0)
    assert e.value.tile == (3, 2) and e.value.level == 0
    with pytest.raises(CorruptTileError):  # a whole-level read meets it too
        slide.read_level(0)
    with slide.unchecked_reads():  # decoded as the decoder repairs it
        assert slide.read_level(0).shape == (*slide.shape, 3)


def test_ycbcr_tiles_are_checked_by_the_decode_that_makes_their_pixels(camelyon, tmp_path,
                                                                       monkeypatch):
    """OME-TIFF YCbCr JPEG tiles: one strict libjpeg-turbo decode both checks a tile and
    gives its pixels (the same pixels as tifffile's decoder, decided on the first tile);
    a tile whose Huffman data is damaged is still named."""
    import tifffile

    path = tmp_path / "t.ome.tif"
    shutil.copy(camelyon / "tumor_001_level5.ome.tif", path)
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        ntx = -(-page.imagewidth // page.tilewidth)
        k = 5 * ntx + 3  # tile (5, 3)
        off, n = page.dataoffsets[k], page.databytecounts[k]
    data = bytearray(path.read_bytes())
    tile = bytes(data[off:off + n])
    # a damage the marker-level check does not see: only the Huffman decode finds it
    for j in range(n // 3, n - 8):
        bad = bytearray(tile)
        bad[j] ^= 0x5A
        if 0xFF in (bad[j], bad[j - 1]) or tile[j - 1] == 0xFF:
            continue
        if (jpeg_problem(bytes(bad), strict=False) is None
                and jpeg_problem(bytes(bad)) is not None):
            break
    else:
        pytest.fail("no single-byte damage found that only the entropy check catches")
    data[off:off + n] = bad
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    a = slide.read_region((0, 0), (600, 900), level=0)
    dec = slide._tile_decoder(0)
    assert dec._strict_decode is True
    with monkeypatch.context() as m:
        m.setenv("LNMETA_TIFF_DIRECT", "0")
        assert np.array_equal(a, open_slide(path).read_region((0, 0), (600, 900), level=0))
    th, tw = page.tilelength, page.tilewidth
    with pytest.raises(CorruptTileError) as e:
        slide.read_region((5 * th + 3, 3 * tw + 3), (40, 40), level=0)
    assert e.value.tile == (5, 3) and "Huffman" in str(e.value)


def test_tiles_read_unchecked_are_not_served_to_checked_reads(cmu1, tmp_path):
    """A small read inside ``unchecked_reads`` (a damaged tile drawn as decoded) must not
    leave that tile in the cache for the checked reads that follow."""
    path, page = _damaged_svs(cmu1, tmp_path, (2, 1))
    slide = open_slide(path)
    loc = (2 * page.tilelength + 10, page.tilewidth + 10)
    with slide.unchecked_reads():
        slide.read_region(loc, (32, 32), level=0)
    with pytest.raises(CorruptTileError):
        slide.read_region(loc, (32, 32), level=0)
