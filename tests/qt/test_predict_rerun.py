"""Detect metastases re-runs: a cancelled run never replaces a complete result, the
layers of one run are replaced together, the tissue mask of Tissue & stain is re-used,
and the progress bar is busy from the first moment."""

from __future__ import annotations

import numpy as np
from tests._inference_helpers import make_synthetic_slide, small_model_file

from napari_lnmeta._napari.prediction_layers import (
    BINARY_LAYER,
    HEATMAP_LAYER,
    LESIONS_LAYER,
    TIERS_LAYER,
)
from napari_lnmeta._qt.predict_widget import FROM_FILE, INCOMPLETE, PredictWidget
from napari_lnmeta._qt.tissue_widget import TissueStainWidget

RUN_LAYERS = (HEATMAP_LAYER, BINARY_LAYER, TIERS_LAYER, LESIONS_LAYER)


def test_rerun_cancel_keeps_the_complete_result(make_napari_viewer, qtbot, tmp_path, camelyon):
    synth = make_synthetic_slide(tmp_path, camelyon)
    model = small_model_file(tmp_path / "model.safetensors")
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(synth.path, plugin="napari-lnmeta")
    # Tissue & stain computes the tissue mask with its default parameters...
    tw = TissueStainWidget(viewer)
    viewer.window.add_dock_widget(tw)
    tw.slide_combo.setCurrentText(slide_layer.name)
    tw.run_tissue()
    qtbot.waitUntil(lambda: not tw.panel.running, timeout=60_000)
    assert tw.session.tissue is not None
    # ...and Detect re-uses it
    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model_combo.setCurrentText(FROM_FILE)
    w.model_path.setText(str(model))
    w.load_model_meta()
    w.device.setCurrentText("cpu")
    w.batch.setValue(16)
    messages = []
    worker = w.run()
    worker.yielded.connect(lambda p: messages.append(p.message))
    assert w.panel.bar.maximum() == 0  # busy from the first moment, not 0 % "starting…"
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    assert "tissue (already computed)" in messages, messages
    assert w.panel.bar.maximum() == 1000 and w.panel.bar.value() == 1000
    first = w.session.prediction
    before = np.asarray(viewer.layers[HEATMAP_LAYER].data).copy()
    assert all(viewer.layers[n].metadata["lnmeta"]["run"] == 1 for n in RUN_LAYERS)
    # a second, slower run, cancelled once its heatmap shows
    w.stride.setValue(4)
    w.batch.setValue(8)
    w.run()
    qtbot.waitUntil(lambda: w.session.partial_updates >= 1 or not w.panel.running,
                    timeout=60_000)
    assert np.array_equal(np.asarray(viewer.layers[HEATMAP_LAYER].data), before)
    w.panel.cancel_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "cancelled"
    # the complete result of the first run is untouched and still saved by Save results…
    assert w.session.prediction is first and w.save_button.isEnabled()
    np.testing.assert_array_equal(np.asarray(viewer.layers[HEATMAP_LAYER].data), before)
    assert all(viewer.layers[n].metadata["lnmeta"]["run"] == 1 for n in RUN_LAYERS)
    if w.session.partial_updates:
        assert f"{HEATMAP_LAYER} {INCOMPLETE}" in viewer.layers
    # a third run that completes replaces all four layers together, and the partial goes
    w.stride.setValue(0)
    w.batch.setValue(16)
    w.run()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done"
    assert all(viewer.layers[n].metadata["lnmeta"]["run"] == 3 for n in RUN_LAYERS)
    assert not any(INCOMPLETE in ly.name or "(running)" in ly.name for ly in viewer.layers)
