"""DAB tumour mask: real IHC (scikit-image), thresholds, clean-up, tiles and transfer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_lnmeta.core.dab import (
    FIBROSIS,
    TUMOUR,
    DabParams,
    auto_threshold,
    dab_mask,
    mask_outlines,
    slide_threshold_job,
    transfer_mask_job,
)
from napari_lnmeta.core.registration import SlideInfo, Transform
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.slide import array_slide
from napari_lnmeta.progress import run


@pytest.fixture(scope="module")
def ihc(shared_data):
    from PIL import Image

    with Image.open(shared_data / "skimage_ihc_dab" / "ihc.png") as im:
        return np.asarray(im.convert("RGB"))


def colour_reference(rgb):
    """Brown and blue pixels by hue alone, independent of colour deconvolution.

    DAB is brown: red well above blue (R - B > 50 after a 5-px mean); haematoxylin-only
    stroma and nuclei are blue (B - R > 10). Pixels in between are left out of both.
    """
    from scipy import ndimage as ndi

    f = rgb.astype(np.float64)
    r, b = ndi.uniform_filter(f[..., 0], 5), ndi.uniform_filter(f[..., 2], 5)
    return (r - b) > 50, (b - r) > 10


def test_mask_covers_brown_epithelium_not_blue_stroma(ihc):
    labels, thr = dab_mask(ihc)
    brown, blue = colour_reference(ihc)
    assert brown.mean() > 0.2 and blue.mean() > 0.05  # the image has both
    tumour = labels == TUMOUR
    assert tumour[brown].mean() > 0.95
    assert tumour[blue].mean() < 0.05
    # Otsu over tissue splits DAB-positive from DAB-negative tissue well above the floor
    assert 0.04 < thr < 0.09
    assert auto_threshold(ihc) == pytest.approx(thr)


def test_slide_threshold_job_reads_a_bounded_image(ihc):
    slide = array_slide(ihc, mpp=0.5, name="ihc")
    steps = []
    thr = run(slide_threshold_job(slide), steps.append)
    assert thr == pytest.approx(auto_threshold(ihc, mpp=0.5))
    assert steps[-1].done == steps[-1].total and f"{thr:.3f}" in steps[-1].message
    # a smaller bound reads a smaller image: the threshold of that image, at its µm/px
    small = run(slide_threshold_job(slide, max_size=128))
    ds = max(ihc.shape[:2]) / 128
    from PIL import Image
    size = (round(ihc.shape[1] / ds), round(ihc.shape[0] / ds))
    low = np.asarray(Image.fromarray(ihc).resize(size, Image.BOX))
    assert small == pytest.approx(auto_threshold(low, mpp=0.5 * ds))
    # a fixed threshold is returned without reading anything
    assert run(slide_threshold_job(slide, DabParams(threshold=0.2))) == 0.2


def test_threshold_is_adjustable_and_monotonic(ihc):
    fractions = [float((dab_mask(ihc, DabParams(threshold=t))[0] == TUMOUR).mean())
                 for t in (0.03, 0.06, 0.1, 0.15)]
    assert all(a >= b for a, b in zip(fractions, fractions[1:], strict=False))
    assert fractions[0] > 0.4 and fractions[-1] < 0.2


def test_negative_stain_gives_an_empty_mask(shared_data):
    """An H&E has no DAB: Otsu would split noise, the floor keeps the mask empty."""
    from PIL import Image

    path = shared_data / "anhir_cima_lung_lesion3_he_ihc" / "images" / "29-041-Izd2-w35-He-les3.jpg"
    with Image.open(path) as im:
        he = np.asarray(im.convert("RGB"))
    labels, thr = dab_mask(he)
    assert thr == pytest.approx(DabParams().min_threshold)
    assert (labels == TUMOUR).mean() < 0.01


def test_min_area_and_fibrosis_ring(ihc):
    small = dab_mask(ihc, DabParams(min_area_um2=10))[0] == TUMOUR
    big = dab_mask(ihc, DabParams(min_area_um2=5000))[0] == TUMOUR
    assert big.sum() < small.sum()
    from scipy import ndimage as ndi

    _, n = ndi.label(big)
    sizes = np.bincount(ndi.label(big)[0].ravel())[1:]
    assert n >= 1 and sizes.min() >= 5000
    labels, _ = dab_mask(ihc, DabParams(fibrosis_um=10))
    ring = labels == FIBROSIS
    assert ring.any()
    tumour = labels == TUMOUR
    # the ring hugs the tumour: every ring pixel is within 10 px of it
    assert ndi.distance_transform_edt(~tumour)[ring].max() <= 10.0 + 1e-6
    # a user-drawn region becomes fibrosis where it is tissue and not tumour
    region = np.zeros(ihc.shape[:2], bool)
    region[300:400, 300:400] = True
    drawn, _ = dab_mask(ihc, fibrosis_region=region)
    assert (drawn[region] == FIBROSIS).any() and not (drawn[~region] == FIBROSIS).any()


def test_bad_input():
    with pytest.raises(InputError):
        dab_mask(np.zeros((10, 10)))


def _rot90_transform(shape):
    """The exact transform when the fixed image is ``np.rot90(moving)``."""
    h, w = shape  # moving shape
    # np.rot90 (counter-clockwise): fixed[r, c] = moving[c, w - 1 - r]
    m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0, 0, 1]])
    return Transform(m, SlideInfo("fixed", (w, h), None), SlideInfo("moving", (h, w), None))


def test_transfer_tile_by_tile_equals_whole_image(ihc, tmp_path):
    """Tiles with halos give the mask of the whole warped image; the OME-Zarr round-trips."""
    from napari_lnmeta.io.omezarr import read_ome_zarr

    fixed_rgb = np.ascontiguousarray(np.rot90(ihc))
    fixed, moving = array_slide(fixed_rgb, name="fixed"), array_slide(ihc, name="moving")
    t = _rot90_transform(ihc.shape[:2])
    np.testing.assert_array_equal(t.warp_slide_region(moving, (0, 0), fixed.shape, 1.0),
                                  fixed_rgb)
    whole = run(transfer_mask_job(fixed, moving, t, None, tile=4096))
    tiled = run(transfer_mask_job(fixed, moving, t, tmp_path / "m.ome.zarr", tile=128))
    # outside the slide is glass: the reference is the mask of the white-padded image
    pad = 100
    padded = np.pad(fixed_rgb, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    thr = auto_threshold(fixed_rgb)
    direct = dab_mask(padded, threshold=thr)[0][pad:-pad, pad:-pad]
    assert whole.threshold == pytest.approx(thr)
    np.testing.assert_array_equal(whole.labels, direct)
    res = read_ome_zarr(tmp_path / "m.ome.zarr")
    assert res.kind == "labels" and len(res.pyramid) >= 2
    np.testing.assert_array_equal(res.data.compute(), direct)
    assert res.attrs["lnmeta"]["dab_threshold"] == pytest.approx(thr)
    assert tiled.tumour_fraction == pytest.approx(float((direct == TUMOUR).mean()))
    polys = mask_outlines(direct, res.frame)
    assert polys and {p.label for p in polys} == {"tumour"}


def test_transfer_refuses_other_slides(ihc):
    t = _rot90_transform((100, 80))
    with pytest.raises(InputError, match="transform"):
        run(transfer_mask_job(array_slide(ihc), array_slide(ihc), t, None))
