"""The "Train patch classifier" widget in a real napari viewer, on real CAMELYON16 pixels."""

from __future__ import annotations

import numpy as np
import pytest
from tests._inference_helpers import make_synthetic_slide

from napari_lnmeta._napari.layers import slide_layer_data
from napari_lnmeta._qt.train_widget import TrainWidget, labels_from_layer, parse_names
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.io import load_model


@pytest.fixture
def viewer_with_labels(make_napari_viewer, camelyon, tmp_path):
    """A synthetic slide of real tumour / node pixels, and a Labels layer of its tumour."""
    syn = make_synthetic_slide(tmp_path, camelyon)
    slide = open_slide(syn.path)
    viewer = make_napari_viewer()
    data, kw, _ = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    # labels drawn at 1/4 resolution over the slide (napari scale = 4 * mpp)
    d = 4
    lab = syn.truth[::d, ::d].astype(np.uint8)
    layer = viewer.add_labels(lab, name="tumour labels", scale=(d * slide.mpp,) * 2,
                              translate=((d - 1) / 2 * slide.mpp,) * 2)
    return viewer, slide, syn, layer, tmp_path


def _wait(qtbot, w, timeout=60_000):
    qtbot.waitUntil(lambda: not w.panel.running, timeout=timeout)


def test_labels_layer_to_label_mask(viewer_with_labels):
    viewer, slide, syn, layer, _ = viewer_with_labels
    lm = labels_from_layer(layer, viewer.layers[0], parse_names("1=tumour"))
    assert lm.frame.downsample == pytest.approx(4.0)
    np.testing.assert_allclose(lm.frame.origin, (0.0, 0.0), atol=1e-9)
    assert lm.names == {1: "tumour"}
    wrong = viewer.add_labels(np.zeros((10, 10), np.uint8), name="tiny",
                              scale=layer.scale)
    with pytest.raises(InputError, match="does not match"):
        labels_from_layer(wrong, viewer.layers[0], {1: "tumour"})
    with pytest.raises(InputError, match="VALUE=NAME"):
        parse_names("tumour")
    assert SlideFrame  # frame type used by the widget


def test_train_then_evaluate_in_widget(viewer_with_labels, qtbot):
    viewer, slide, syn, layer, tmp_path = viewer_with_labels
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    assert w.slide_combo.currentText() == slide.name
    assert w.labels_combo.currentText() == "tumour labels"
    w.add_pair()
    w.patch_size.setValue(32)
    w.stride.setValue(32)
    w.arch.setCurrentText("lnmeta_cnn_small")
    w.epochs.setValue(2)
    w.batch_size.setValue(16)
    w.out_dir.setText(str(tmp_path / "run"))
    w.val_slide_combo.setCurrentText(slide.name)
    w.val_labels_combo.setCurrentText("tumour labels")
    w.panel.run_button.click()
    _wait(qtbot, w)
    assert w.panel.last_error is None, w.panel.last_error
    res = w.session.result
    assert res is not None and res.last.is_file() and len(res.history) == 2
    model, meta = load_model(res.last)
    assert meta.patch_size == 32 and meta.mpp == pytest.approx(slide.mpp)
    assert w.plot.pixmap() is not None and not w.plot.pixmap().isNull()
    assert "saved" in w.summary.text()
    w.eval_button.click()
    _wait(qtbot, w)
    assert w.panel.last_error is None, w.panel.last_error
    assert "AUC" in w.summary.text()


def test_cancel_and_bad_input(viewer_with_labels, qtbot):
    viewer, slide, syn, layer, tmp_path = viewer_with_labels
    viewer.add_labels(np.zeros_like(layer.data), name="empty", scale=layer.scale,
                      translate=layer.translate)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    w.labels_combo.setCurrentText("empty")
    w.patch_size.setValue(32)
    w.out_dir.setText(str(tmp_path / "bad"))
    w.panel.run_button.click()
    assert not w.panel.running and "is empty" in w.panel.status.text()
    # a long run, cancelled: the worker stops and the widget is usable again
    w.labels_combo.setCurrentText("tumour labels")
    w.arch.setCurrentText("lnmeta_cnn_small")
    w.epochs.setValue(200)
    w.batch_size.setValue(8)
    w.out_dir.setText(str(tmp_path / "cancel"))
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: len(w.session.steps) >= 2, timeout=60_000)
    w.panel.cancel()
    _wait(qtbot, w)
    assert w.panel.status.text() == "cancelled"
    assert w.panel.run_button.isEnabled()
