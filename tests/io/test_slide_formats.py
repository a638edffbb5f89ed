"""Content-based format detection, DICOM slides, the size limit and synthetic levels."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
from tests._dicom_helpers import cached_dicom
from tests._tiff_helpers import huge_tiff

from napari_lnmeta.errors import SlideError
from napari_lnmeta.io import slide as slide_mod
from napari_lnmeta.io.slide import (
    SLIDE_SUFFIXES,
    MppWarning,
    OpenSlideSlide,
    TiffSlide,
    downsample2x,
    open_slide,
    sniff,
)


@pytest.fixture(scope="module")
def dicom_file(cmu1):
    return cached_dicom(cmu1, levels=1)


@pytest.fixture(scope="module")
def dicom_series(cmu1):
    return cached_dicom(cmu1, levels=2)




# -- DICOM ----------------------------------------------------------------------------
def test_dicom_file_opens_through_openslide_with_its_pixel_size(dicom_file, cmu1):
    assert sniff(dicom_file) == "openslide"
    slide = open_slide(dicom_file)
    assert isinstance(slide, OpenSlideSlide)
    assert slide.format == "openslide:dicom"
    assert slide.shape == (2967, 2220)
    assert slide.mpp == pytest.approx(0.499)
    svs = open_slide(cmu1)
    ref = svs.read_region((1000, 700), (256, 300)).astype(int)
    ours = slide.read_region((1000, 700), (256, 300)).astype(int)
    # the same real pixels, in place, after one JPEG (4:2:2) re-encoding
    err = np.abs(ours - ref).mean()
    assert err < 5
    assert np.abs(ours.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 1.5
    shifted = svs.read_region((1006, 706), (256, 300)).astype(int)
    assert np.abs(ours - shifted).mean() > 2 * err


def test_dicom_series_folder_is_one_slide_with_its_levels(dicom_series, tmp_path):
    assert sniff(dicom_series) == "openslide"
    slide = open_slide(dicom_series)
    assert slide.path == dicom_series and slide.format == "openslide:dicom"
    assert slide.level_count == 2
    assert slide.level_downsamples[1] == pytest.approx(2, rel=1e-3)
    assert slide.mpp == pytest.approx(0.499)
    # a folder of something else is refused in one line naming it
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("x")
    with pytest.raises(SlideError, match="not a zarr store.*nor a DICOM series"):
        open_slide(other)


def test_dicom_that_is_not_a_slide_is_refused(tmp_path, dicom_file):
    fake = tmp_path / "ct.dcm"
    fake.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\x00" * 4)
    with pytest.raises(SlideError) as err:
        open_slide(fake)
    assert str(fake) in str(err.value) and "DICOM" in str(err.value)
    assert "\n" not in str(err.value)


def test_lnmeta_info_and_tissue_on_dicom(dicom_file, dicom_series, tmp_path, capsys):
    from napari_lnmeta.cli import main

    assert main(["info", str(dicom_file), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "openslide:dicom" and d["mpp"] == pytest.approx(0.499)
    assert d["level_dimensions"] == [[2220, 2967]]
    series = shutil.copytree(dicom_series, tmp_path / "series")
    assert main(["tissue", str(series), "-o", str(tmp_path / "t.ome.zarr")]) == 0
    assert (tmp_path / "t.ome.zarr").is_dir()


def test_napari_reader_opens_dicom_file_and_series(dicom_file, dicom_series):
    from napari_lnmeta._napari.reader import napari_get_reader

    for p in (dicom_file, dicom_series):
        reader = napari_get_reader(str(p))
        assert reader is not None, p
        [(data, kw, kind)] = reader(str(p))
        assert kind == "image" and data[0].shape == (2967, 2220, 3)
        assert kw["scale"] == pytest.approx((0.499, 0.499))


# -- content, not suffix ----------------------------------------------------------------
def test_type_is_decided_by_content_not_name(cmu1, ihc_png, tmp_path):
    svs_as_dat = shutil.copy(cmu1, tmp_path / "scan.dat")
    assert sniff(svs_as_dat) == "tiff"
    assert open_slide(svs_as_dat).format == "openslide:aperio"
    png_as_svs = shutil.copy(ihc_png, tmp_path / "image.svs")
    assert sniff(png_as_svs) == "image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        assert open_slide(png_as_svs).shape == (512, 512)
    text_as_tif = tmp_path / "notes.tif"
    text_as_tif.write_text("hello\n" * 20)
    with pytest.raises(SlideError, match="not a TIFF"):
        open_slide(text_as_tif)


def test_one_list_of_slide_suffixes_used_by_batch(dicom_file, dicom_series, tmp_path):
    from napari_lnmeta.cohort import load_cohort

    assert {".dcm", ".vmu", ".ome.tif", ".svs", ".ndpi", ".mrxs"} <= set(SLIDE_SUFFIXES)
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(dicom_file, folder / "a.dcm")
    shutil.copytree(dicom_series, folder / "b_series")
    (folder / "readme.txt").write_text("not a slide")
    items = load_cohort(folder)
    assert sorted(it.id for it in items) == ["a", "b_series"]


# -- the size limit -----------------------------------------------------------------------
def test_a_tiny_tiff_declaring_a_trillion_pixels_is_refused_at_once(tmp_path, monkeypatch):
    path = huge_tiff(tmp_path / "huge.tif")
    assert path.stat().st_size == 138
    t0 = time.perf_counter()
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg and "1000000 x 1000000" in msg and "limit" in msg
    assert "\n" not in msg
    assert time.perf_counter() - t0 < 30  # generous: a regression is minutes of decoding
    # within the limit, a level stored as one giant strip is refused too
    monkeypatch.setenv("LNMETA_MAX_SLIDE_PIXELS", "1e13")
    with pytest.raises(SlideError, match="one piece"):
        open_slide(path)
    # and a normal slide under a lowered limit
    monkeypatch.setenv("LNMETA_MAX_SLIDE_PIXELS", "1000")
    with pytest.raises(SlideError, match="beyond the limit"):
        open_slide(huge_tiff(tmp_path / "small.tif", side=100))


# -- synthetic levels -----------------------------------------------------------------------
class _Counting:
    """Counts the file-level reads of a slide (and the largest one)."""

    def __init__(self, slide, monkeypatch):
        self.calls, self.largest = 0, 0
        orig = slide._read_level

        def read(level, y, x, h, w):
            self.calls += 1
            self.largest = max(self.largest, h * w)
            return orig(level, y, x, h, w)

        monkeypatch.setattr(slide, "_read_level", read)


def test_synthetic_levels_are_built_once_tile_by_tile_and_equal_the_lazy_chain(
        cmu1, monkeypatch):
    slide = open_slide(cmu1)
    reads = _Counting(slide, monkeypatch)
    shapes = slide.synthetic_shapes()
    assert shapes[:3] == [(1484, 1110), (742, 555), (371, 278)]
    assert max(shapes[-1]) <= 16
    lvl4 = slide.synthetic_level(4)
    assert lvl4.shape == (186, 139, 3)
    first = reads.calls
    assert first == 4  # 2967 x 2220 in 2048 px blocks
    assert reads.largest <= 2048 * 2048  # never level 0 whole
    # every later use is a lookup: tissue, low_res, the viewer pyramid
    for k in range(1, len(shapes) + 1):
        slide.synthetic_level(k)
    img, ds = slide.low_res(8.0)
    assert ds == pytest.approx(16, rel=0.01) and img.shape == (186, 139, 3)
    pyr = slide.pyramid(tile=512, min_size=512)
    assert [p.shape[:2] for p in pyr] == [(2967, 2220), *shapes[:3]]
    pyr[3].compute()
    assert reads.calls == first
    # the cached levels are exactly the lazy 2x2-mean chain from level 0
    lazy = pyr[0]
    for k in range(1, 4):
        lazy = downsample2x(lazy, 512)
        np.testing.assert_array_equal(slide.synthetic_level(k), lazy.compute())


def test_big_synthetic_levels_stay_lazy(cmu1, monkeypatch):
    monkeypatch.setenv("LNMETA_SYNTHETIC_LEVEL_PIXELS", "500000")
    slide = open_slide(cmu1)
    assert slide._first_kept_synthetic() == 2  # 1484 x 1110 is above the budget
    pyr = slide.pyramid(tile=512, min_size=512)
    assert [p.shape[:2] for p in pyr] == [(2967, 2220), (1484, 1110), (742, 555),
                                          (371, 278)]
    np.testing.assert_array_equal(pyr[2].compute(), slide.synthetic_level(2))
    with pytest.raises(ValueError, match="not kept"):
        slide.synthetic_level(1)


def test_tissue_reads_near_its_analysis_resolution(cmu1, camelyon, monkeypatch):
    from napari_lnmeta.core.tissue import tissue_mask

    slide = open_slide(cmu1)
    reads = _Counting(slide, monkeypatch)
    tm = tissue_mask(slide)  # 10 µm/px wanted: the 16x level (8 µm/px)
    assert tm.mpp == pytest.approx(0.499 * 16, rel=0.01)
    assert reads.largest <= 2048 * 2048
    n = reads.calls
    tissue_mask(slide)
    assert reads.calls == n  # the reduced level is kept on the slide
    # a file with its own pyramid: its level is read, nothing is built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        pyr_slide = open_slide(camelyon / "tumor_001_level5_pyramid.tif", mpp=7.776)
    assert not isinstance(pyr_slide, TiffSlide)
    tm = tissue_mask(pyr_slide)
    assert tm.downsample in pyr_slide.level_downsamples
    assert pyr_slide not in slide_mod._SYNTH_CACHE
