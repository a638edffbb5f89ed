"""The "Detect metastases" widget: real viewer, real model file, layers exactly on the slide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._inference_helpers import make_synthetic_slide, small_model_file

from napari_lnmeta._napari.layers import slide_layer_data
from napari_lnmeta._napari.prediction_layers import (
    BINARY_LAYER,
    HEATMAP_LAYER,
    LESIONS_LAYER,
    TIERS_LAYER,
)
from napari_lnmeta._qt.predict_widget import FROM_FILE, PredictWidget
from napari_lnmeta.io.slide import open_slide


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, camelyon):
    d = tmp_path_factory.mktemp("widget")
    return make_synthetic_slide(d, camelyon), small_model_file(d / "model.safetensors")


def _widget(make_napari_viewer, synth, model):
    viewer = make_napari_viewer()
    slide = open_slide(synth.path)
    data, kw, _ = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model_combo.setCurrentText(FROM_FILE)
    w.model_path.setText(str(model))
    w.load_model_meta()
    return viewer, slide, w


def test_widget_runs_and_layers_lie_on_the_slide(make_napari_viewer, qtbot, inputs, tmp_path):
    synth, model = inputs
    viewer, slide, w = _widget(make_napari_viewer, synth, model)
    assert w.slide_combo.currentText() == slide.name
    # pre-filled from the model's metadata
    assert w.patch.value() == 32 and w.mpp.value() == pytest.approx(2.0)
    w.stride.setValue(16)
    w.device.setCurrentText("cpu")
    w.batch.setValue(16)
    w.panel.run_button.click()
    assert w.panel.running
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    assert w.session.partial_updates >= 1  # the heatmap was shown while running
    for name in (HEATMAP_LAYER, BINARY_LAYER, TIERS_LAYER, LESIONS_LAYER):
        assert name in viewer.layers
    pred = w.session.prediction
    heat = viewer.layers[HEATMAP_LAYER]
    assert heat.data.shape == pred.result.grid.grid_shape
    # cell (i, j) of the heatmap is centred on the centre of patch (i, j) of the grid
    grid = pred.result.grid
    slide_layer = viewer.layers[slide.name]
    for k in (0, len(grid) // 2, len(grid) - 1):
        i, j = grid.index[k]
        y, x = grid.coords[k] + (grid.size0 - 1) / 2
        np.testing.assert_allclose(heat.data_to_world((i, j)), slide_layer.data_to_world((y, x)),
                                   atol=1e-9)
    tiers = viewer.layers[TIERS_LAYER]
    np.testing.assert_allclose(tiers.scale, heat.scale)
    np.testing.assert_allclose(tiers.translate, heat.translate)
    assert tuple(np.round(tiers.colormap.map(np.array([3]))[0] * 255)) == (255, 0, 0, 255)
    assert tuple(np.round(tiers.colormap.map(np.array([2]))[0] * 255)) == (0, 255, 0, 255)
    assert tuple(np.round(tiers.colormap.map(np.array([1]))[0] * 255)) == (0, 0, 255, 255)
    # hovering shows the probability: the layer value at a cell is the probability there
    i, j = grid.index[0]
    assert heat.get_value(heat.data_to_world((i, j)), world=True) == pytest.approx(
        pred.probability[i, j])
    # results can be saved; an existing result is not overwritten
    out = w.save_results(tmp_path / "saved")
    assert (out / "summary.json").is_file() and (out / "probability.ome.zarr").is_dir()
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert w.save_results(tmp_path / "saved") is None
    # a second run reuses the layers instead of stacking new ones
    n = len(viewer.layers)
    w.stride.setValue(0)  # = patch size
    w.lesion_method.setCurrentText("components")
    w.lesion_threshold.setValue(0.05)
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert len(viewer.layers) == n
    lesions = w.session.prediction.lesions
    assert w.session.prediction.result.config.lesion_method == "components"
    assert lesions.n_cells is not None and len(lesions) == len(viewer.layers[LESIONS_LAYER].data)


def test_widget_cancel_and_bad_input(make_napari_viewer, qtbot, inputs):
    synth, model = inputs
    viewer, slide, w = _widget(make_napari_viewer, synth, model)
    w.stride.setValue(4)  # many patches: time to cancel
    w.device.setCurrentText("cpu")
    w.batch.setValue(8)
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: w.session.partial_updates >= 1 or not w.panel.running,
                    timeout=60_000)
    w.panel.cancel_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "cancelled"
    assert w.session.prediction is None and not w.save_button.isEnabled()
    assert TIERS_LAYER not in viewer.layers and HEATMAP_LAYER not in viewer.layers
    if w.session.partial_updates:  # the partial heatmap says it is incomplete
        assert f"{HEATMAP_LAYER} (incomplete)" in viewer.layers
    # a patch size the model was not trained on: a one-line error, widget usable again
    w.patch.setValue(48)
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert "trained on 32 px patches" in w.panel.status.text()
    assert w.panel.run_button.isEnabled()
