"""The "Tissue & stain" widget in a real napari viewer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_lnmeta._napari.layers import slide_layer_data
from napari_lnmeta._qt.tissue_widget import (
    GRID_LAYER,
    PREVIEW_LAYER,
    TISSUE_LAYER,
    TissueStainWidget,
    read_box,
)
from napari_lnmeta.io.frame import layer_transform
from napari_lnmeta.io.slide import MppWarning, open_slide


@pytest.fixture
def viewer_with_slide(make_napari_viewer, cmu1):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(cmu1)
    data, kw, _ = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    return viewer, slide


def _wait(qtbot, widget, timeout=30_000):
    qtbot.waitUntil(lambda: not widget.panel.running, timeout=timeout)
    assert widget.panel.last_error is None, widget.panel.last_error


def test_tissue_grid_and_preview(viewer_with_slide, qtbot):
    viewer, slide = viewer_with_slide
    w = TissueStainWidget(viewer)
    qtbot.addWidget(w)
    assert w.slide_combo.currentText() == slide.name

    w.run_tissue()
    _wait(qtbot, w)
    layer = viewer.layers[TISSUE_LAYER]
    assert layer._type_string == "labels"
    tm = w.session.tissue
    assert tm is not None and tm.mask.any()
    assert np.allclose(layer.scale, layer_transform(tm.frame)["scale"])
    assert np.allclose(layer.translate, layer_transform(tm.frame)["translate"])

    w.patch_size.setValue(128)
    w.patch_mpp.setValue(1.0)
    w.run_grid()
    _wait(qtbot, w)
    grid = w.session.grid
    glayer = viewer.layers[GRID_LAYER]
    assert glayer._type_string == "shapes" and len(glayer.data) == len(grid) > 0
    assert np.allclose(glayer.scale, (slide.mpp, slide.mpp))
    # recomputing reuses the layer name, never stacks duplicates
    w.run_grid()
    _wait(qtbot, w)
    assert [lyr.name for lyr in viewer.layers].count(GRID_LAYER) == 1

    w.stain_method.setCurrentText("reinhard")
    w.run_fit()
    _wait(qtbot, w)
    assert w.session.target is not None and w.session.target.method == "reinhard"

    viewer.reset_view()
    w.run_preview()
    _wait(qtbot, w)
    prev = viewer.layers[PREVIEW_LAYER]
    assert prev.rgb and prev.data.dtype == np.uint8 and max(prev.data.shape[:2]) <= 1024
    assert prev.metadata["lnmeta"]["stain"]["method"] == "reinhard"


def test_no_slide_layer_is_a_clear_error(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="plain")
    w = TissueStainWidget(viewer)
    qtbot.addWidget(w)
    w.run_tissue()
    assert "no slide layer" in w.panel.status.text()
    assert not w.panel.running


def test_cancel_grid_with_entropy(viewer_with_slide, qtbot):
    viewer, _ = viewer_with_slide
    w = TissueStainWidget(viewer)
    qtbot.addWidget(w)
    w.patch_size.setValue(32)
    w.min_tissue.setValue(0.0)
    w.entropy_min.setValue(1.0)  # thousands of patches to read: long enough to cancel
    w.run_grid()
    w.panel.cancel()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=30_000)
    assert w.panel.status.text() in ("cancelled", "done")
    assert all(b.isEnabled() for b in w._job_buttons)


def test_read_box(cmu1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(cmu1)
    rgb, ds = read_box(slide, (0, 0, 2000, 1000), max_size=500)
    assert max(rgb.shape[:2]) == 500 and ds == pytest.approx(4.0)
