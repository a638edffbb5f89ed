"""Slide I/O against OpenSlide and tifffile on the real shared slides."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import openslide
import pytest
import tifffile

from napari_lnmeta.errors import SlideError
from napari_lnmeta.io.slide import MppWarning, OpenSlideSlide, TiffSlide, ZarrSlide, open_slide


def _openslide_rgb(osr, location_xy, level, size_wh):
    rgba = np.asarray(osr.read_region(location_xy, level, size_wh))
    assert rgba[..., 3].min() == 255  # the regions below are inside the slide
    return rgba[..., :3]


def test_cmu1_matches_openslide_every_level(cmu1):
    slide = open_slide(cmu1)
    osr = openslide.OpenSlide(str(cmu1))
    assert isinstance(slide, OpenSlideSlide)
    assert slide.mpp == pytest.approx(0.499)
    assert slide.objective_power == 20
    assert slide.vendor == "aperio"
    assert set(slide.associated_images) >= {"label", "macro", "thumbnail"}
    assert slide.level_dimensions == list(osr.level_dimensions)
    for level in range(osr.level_count):
        for (y, x), (h, w) in [((0, 0), (512, 512)), ((1001, 733), (300, 257))]:
            ours = slide.read_region((y, x), (h, w), level=level)
            ref = _openslide_rgb(osr, (x, y), level, (w, h))
            np.testing.assert_array_equal(ours, ref)


def test_pyramid_tiff_matches_openslide_every_level(camelyon):
    path = camelyon / "tumor_001_level5_pyramid.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(path)
    osr = openslide.OpenSlide(str(path))
    assert slide.level_count == osr.level_count == 5
    pyr = slide.pyramid(tile=512)
    for level in range(osr.level_count):
        ds = osr.level_downsamples[level]
        y, x = int(3000 // ds * ds), int(1000 // ds * ds)
        lw, lh = osr.level_dimensions[level]
        h, w = min(200, lh - int(y / ds)), min(180, lw - int(x / ds))
        ref = _openslide_rgb(osr, (x, y), level, (w, h))
        np.testing.assert_array_equal(slide.read_region((y, x), (h, w), level=level), ref)
        ly, lx = int(y / ds), int(x / ds)
        np.testing.assert_array_equal(pyr[level][ly:ly + h, lx:lx + w].compute(), ref)


def test_ome_tiff_matches_tifffile_every_level(camelyon):
    path = camelyon / "tumor_001_level5.ome.tif"
    slide = open_slide(path)
    assert isinstance(slide, TiffSlide)
    assert slide.format == "ome-tiff"
    assert slide.mpp == pytest.approx(7.776)
    assert slide.level_count == 5
    pyr = slide.pyramid(tile=512)
    for level in range(5):
        ref = tifffile.imread(path, level=level)
        assert pyr[level].shape == ref.shape
        assert pyr[level].chunksize[:2] == tuple(min(512, n) for n in ref.shape[:2])
        np.testing.assert_array_equal(pyr[level].compute(), ref)
        ds = slide.level_downsamples[level]
        y, x = 100, 37
        np.testing.assert_array_equal(
            slide.read_region((int(y * ds), int(x * ds)), (64, 96), level=level),
            ref[y:y + 64, x:x + 96])


def test_tile_cache_reads_equal_direct_reads_and_stay_bounded(camelyon, monkeypatch):
    """Random small reads through the decoded-tile cache equal the file's pixels."""
    path = camelyon / "tumor_001_level5.ome.tif"
    ref = tifffile.imread(path, level=0)
    monkeypatch.setenv("LNMETA_TILE_CACHE_MB", "2")
    slide = open_slide(path)
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = rng.integers(1, 300, 2)
        y = int(rng.integers(0, ref.shape[0] - h))
        x = int(rng.integers(0, ref.shape[1] - w))
        got = slide.read_region((y, x), (int(h), int(w)), level=0)
        np.testing.assert_array_equal(got, ref[y:y + h, x:x + w])
    # the edge tiles are partial; a read past the edge is white
    edge = slide.read_region((ref.shape[0] - 10, ref.shape[1] - 10), (20, 20), level=0)
    np.testing.assert_array_equal(edge[:10, :10], ref[-10:, -10:])
    assert (edge[10:] == 255).all()
    cache = slide._cache
    assert len(cache) > 0 and cache._size <= cache.capacity == 2 * 2**20
    monkeypatch.setenv("LNMETA_TILE_CACHE_MB", "0")  # disabled: same pixels, nothing kept
    off = open_slide(path)
    np.testing.assert_array_equal(off.read_region((100, 200), (50, 60), level=0),
                                  ref[100:150, 200:260])
    assert len(off._cache) == 0


@pytest.mark.parametrize("compression", ["jpeg", None, "zlib"])
def test_direct_tile_reads_equal_the_zarr_store(pyramid_factory, compression, monkeypatch):
    """Tiles read at their file offsets and decoded in the calling thread give exactly
    the zarr store's pixels, edge tiles and padding included, on every level."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (1000, 1300, 3), dtype=np.uint8)
    img[200:600, 300:900] = (200, 80, 160)  # smooth areas: JPEG artefacts differ there
    path = pyramid_factory(img, levels=3, compression=compression, tile=256)
    fast = open_slide(path)
    assert all(fast._tile_decoder(lv) is not None for lv in range(fast.level_count))
    monkeypatch.setenv("LNMETA_TIFF_DIRECT", "0")
    store = open_slide(path)
    assert store._tile_decoder(0) is None
    for _ in range(80):
        level = int(rng.integers(0, store.level_count))
        ds = store.level_downsamples[level]
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        y, x = (int(v) for v in rng.integers(-50, 1000, 2))
        loc = (int(y * ds), int(x * ds))
        np.testing.assert_array_equal(fast.read_region(loc, (h, w), level=level),
                                      store.read_region(loc, (h, w), level=level))
    if compression is None:
        np.testing.assert_array_equal(fast.read_region((0, 0), (1000, 1300)), img)
    fast.close()  # file handles go; reads open them again
    np.testing.assert_array_equal(fast.read_region((5, 6), (7, 8), level=1),
                                  store.read_region((5, 6), (7, 8), level=1))


def test_a_tile_wanted_by_many_threads_is_decoded_once():
    import threading
    import time

    from napari_lnmeta.io._tiles import TileCache

    cache = TileCache(2**20, 2**22)
    calls = []
    start = threading.Barrier(6)

    def load():
        calls.append(1)
        time.sleep(0.05)
        return np.ones((16, 16, 3), np.uint8)

    def want():
        start.wait()
        assert cache.get_or_load("t", load).shape == (16, 16, 3)

    threads = [threading.Thread(target=want) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.loads == 1
    # reserve grows up to the maximum and never shrinks; a disabled cache stays off
    assert cache.reserve(3 * 2**20) == 3 * 2**20
    assert cache.reserve(2**30) == 2**22 and cache.reserve(10) == 2**22
    assert TileCache(0, 2**22).reserve(2**21) == 0


def test_subifd_pyramid_with_user_mpp_and_padding(pyramid_factory):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = pyramid_factory(img, levels=3, mpp=None, compression=None, ome=False)
    with pytest.warns(MppWarning):
        slide = open_slide(path)
    assert slide.mpp is None
    assert slide.level_count == 3
    np.testing.assert_array_equal(slide.read_region((10, 20), (50, 60)), img[10:60, 20:80])
    # outside the slide reads as white
    edge = slide.read_region((680, 880), (40, 40))
    np.testing.assert_array_equal(edge[:20, :20], img[680:, 880:])
    assert (edge[20:] == 255).all() and (edge[:, 20:] == 255).all()
    slide2 = open_slide(path, mpp=0.25)
    assert slide2.mpp == 0.25 and slide2.mpp_source == "user"
    # read at 0.5 µm/px = level 1 exactly
    np.testing.assert_array_equal(slide2.read_region((0, 0), (100, 100), mpp=0.5),
                                  slide2.read_region((0, 0), (100, 100), level=1))
    # between levels: resampled from the finer one, right size
    assert slide2.read_region((0, 0), (30, 40), mpp=0.7).shape == (30, 40, 3)


def test_single_level_gets_lazy_coarse_levels(cmu1):
    slide = open_slide(cmu1)
    pyr = slide.pyramid(tile=512, min_size=512)
    assert [p.shape[:2] for p in pyr] == [(2967, 2220), (1484, 1110), (742, 555), (371, 278)]
    assert all(p.dtype == np.uint8 for p in pyr)
    full = pyr[0].compute()
    coarse = pyr[1][:100, :100].compute().astype(float)
    expect = full[:200, :200].reshape(100, 2, 100, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(coarse - expect).max() <= 1


def test_plain_image_and_zarr(ihc_png, tmp_path):
    import zarr

    with pytest.warns(MppWarning):
        slide = open_slide(ihc_png)
    assert slide.format == "image" and slide.shape == (512, 512)
    img = slide.read_region((0, 0), (512, 512))
    store = tmp_path / "rgb.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=2)
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 0.5, 0.5]}]}]}]
    g.create_array("0", data=np.moveaxis(img, -1, 0), chunks=(3, 128, 128))
    z = open_slide(store)
    assert isinstance(z, ZarrSlide) and z.mpp == 0.5
    np.testing.assert_array_equal(z.read_region((5, 7), (100, 90)), img[5:105, 7:97])


def test_parallel_reads_are_consistent(camelyon):
    from concurrent.futures import ThreadPoolExecutor

    slide = open_slide(camelyon / "tumor_001_level5.ome.tif")
    locs = [(y, x) for y in range(0, 6000, 700) for x in range(0, 2500, 600)]
    serial = [slide.read_region(loc, (256, 256)) for loc in locs]
    with ThreadPoolExecutor(8) as ex:
        par = list(ex.map(lambda loc: slide.read_region(loc, (256, 256)), locs))
    for a, b in zip(serial, par, strict=True):
        np.testing.assert_array_equal(a, b)


def test_slides_pickle_for_dask_workers(cmu1, camelyon):
    for path in (cmu1, camelyon / "tumor_001_level5.ome.tif"):
        slide = open_slide(path)
        clone = pickle.loads(pickle.dumps(slide))
        np.testing.assert_array_equal(clone.read_region((50, 60), (64, 64)),
                                      slide.read_region((50, 60), (64, 64)))


@pytest.mark.parametrize("make, problem", [
    (lambda d, s: d / "missing.svs", "no such file"),
    (lambda d, s: _write(d / "empty.svs", b""), "empty"),
    (lambda d, s: _write(d / "trunc.svs", s.read_bytes()[:150_000]), "truncated or corrupt"),
    (lambda d, s: _write(d / "notes.tif", b"this is a text file\n" * 10), "not a TIFF"),
    (lambda d, s: _mkdir(d / "folder"), "not a zarr store"),
    (lambda d, s: _write(d / "notes.txt", b"text"), "unsupported file type"),
])
def test_bad_input_names_file_and_problem(tmp_path, cmu1, make, problem):
    path = make(tmp_path, cmu1)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and problem in msg
    assert "\n" not in msg


def _write(path, data):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def test_tile_shape_and_cache_hint_on_openslide(cmu1):
    slide = open_slide(cmu1)
    assert isinstance(slide, OpenSlideSlide)
    assert slide.tile_shape(0) == (240, 240)  # the SVS's own JPEG tiles
    before = slide.read_region((100, 200), (64, 64), level=0)
    slide.reserve_tile_cache(100 * 2**20)  # a bigger OpenSlide cache, same pixels
    np.testing.assert_array_equal(slide.read_region((100, 200), (64, 64), level=0), before)
    again = pickle.loads(pickle.dumps(slide))  # a worker's copy starts with its own cache
    np.testing.assert_array_equal(again.read_region((100, 200), (64, 64), level=0), before)


def test_dropped_slides_release_their_file_descriptors(camelyon):
    import gc
    import os
    from pathlib import Path

    path = camelyon / "tumor_001_level5.ome.tif"
    fds = Path("/proc/self/fd")

    def open_fds():
        return len(os.listdir(fds)) if fds.exists() else 0

    before = open_fds()
    for _ in range(30):
        slide = open_slide(path)
        slide.read_region((100, 100), (300, 300), level=1)  # direct tile reads open the file
        del slide
    gc.collect()
    assert open_fds() <= before + 2
