"""The "Pixel size" widget: µm/px set in the GUI, carried to masks and annotations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_lnmeta._qt.units_widget import PixelSizeWidget
from napari_lnmeta.io.slide import MppWarning

MPP5 = 7.776  # the OME-TIFF's µm/px of CAMELYON16 tumor_001 at level 5


def test_slide_mask_and_polygons_overlay_the_ome_tiff_in_um(make_napari_viewer, camelyon):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        (ome,) = viewer.open(camelyon / "tumor_001_level5.ome.tif", plugin="napari-lnmeta")
        (tif,) = viewer.open(camelyon / "tumor_001_level5_pyramid.tif", plugin="napari-lnmeta")
    (mask,) = viewer.open(camelyon / "tumor_001_level5_tumor_mask.png", plugin="napari-lnmeta")
    (polys,) = viewer.open(camelyon / "Tumor_001.json", plugin="napari-lnmeta")
    assert tuple(tif.scale) == (1.0, 1.0)  # the file does not say its pixel size
    w = PixelSizeWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.layer_combo.setCurrentText(tif.name)
    w.mpp.setValue(MPP5)
    w.set_pixel_size()
    np.testing.assert_allclose(tif.extent.world, ome.extent.world)
    assert str(tif.units[-1]) == "micrometer"
    assert tif.metadata["lnmeta"]["mpp"] == pytest.approx(MPP5)
    # the widgets re-open the slide with the µm/px set here
    from napari_lnmeta._napari.layers import slide_from_layer

    assert slide_from_layer(tif).mpp == pytest.approx(MPP5)
    # the 1/1 mask and the level-0 CAMELYON16 polygons (32x the level-5 pixels) are placed
    # with the slide: the mask as a grid of the slide's own pixels
    w.apply_to_others()
    assert mask.name in w.info.text() and polys.name in w.info.text()
    np.testing.assert_allclose(mask.extent.world, tif.extent.world)
    assert tuple(polys.scale) == pytest.approx((MPP5, MPP5))
    # polygons are in level-0 pixels of the full-resolution slide: set their own pixel size
    w.layer_combo.setCurrentText(polys.name)
    w.mpp.setValue(MPP5 / 32)
    w.set_pixel_size()
    top = min(float(np.min(np.asarray(d)[:, 0])) for d in polys.data) * MPP5 / 32
    tumour_rows = np.flatnonzero(np.asarray(mask.data).any(axis=1))
    assert top == pytest.approx(tumour_rows[0] * MPP5, abs=3 * MPP5)
    # nonsense is refused with a message, nothing changed
    w.mpp.setValue(0.0)
    w.set_pixel_size()
    assert w.info.text().startswith("error:")
    assert tuple(polys.scale) == pytest.approx((MPP5 / 32, MPP5 / 32))


def test_apply_refuses_a_mask_of_another_shape(make_napari_viewer, cmu1):
    viewer = make_napari_viewer()
    (slide,) = viewer.open(cmu1, plugin="napari-lnmeta")
    lab = viewer.add_labels(np.zeros((100, 400), np.uint8), name="other")
    w = PixelSizeWidget(viewer)
    w.layer_combo.setCurrentText(slide.name)
    w.apply_to_others()
    assert "aspect ratio" in w.info.text()
    assert tuple(lab.scale) == (1.0, 1.0)


def test_results_made_in_pixels_follow_their_slide(make_napari_viewer, camelyon):
    from napari_lnmeta._napari.layers import frame_kwargs
    from napari_lnmeta.io.frame import SlideFrame

    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        (tif,) = viewer.open(camelyon / "tumor_001_level5_pyramid.tif", plugin="napari-lnmeta")
    fr = SlideFrame(downsample=32, slide_mpp=None, slide=tif.name, slide_shape=(7168, 3072))
    grid = viewer.add_labels(np.ones((224, 96), np.uint8), name="Tissue", **frame_kwargs(fr))
    w = PixelSizeWidget(viewer)
    w.layer_combo.setCurrentText(tif.name)
    w.mpp.setValue(MPP5)
    w.set_pixel_size()
    w.apply_to_others()
    assert "Tissue" in w.info.text()
    # cell (i, j) covers slide pixels [32 i, 32 (i + 1)): its centre is slide pixel 32 i + 15.5
    np.testing.assert_allclose(grid.data_to_world((10, 20)),
                               tif.data_to_world((10 * 32 + 15.5, 20 * 32 + 15.5)))
    assert grid.metadata["lnmeta"]["frame"]["slide_mpp"] == pytest.approx(MPP5)
