"""Evaluate refuses what it cannot evaluate honestly: a picture as a mask, truth and
detections in different frames. It says why and shows no FROC number."""

from __future__ import annotations

import numpy as np

from napari_lnmeta._napari.prediction_layers import LESIONS_LAYER, lesions_layer_data
from napari_lnmeta._napari.units import apply_slide_mpp
from napari_lnmeta._qt.evaluate_widget import EvaluateWidget
from napari_lnmeta.core.lesions import Lesions

TUMOUR, FAR = (3927.0, 2226.0), (1500.0, 1200.0)  # level-5 (row, col)
MPP5 = 7.776


def _run(w, qtbot) -> str:
    w.summary.setText("")
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    return w.panel.status.text()


def test_wrong_frames_are_refused_with_a_message(make_napari_viewer, qtbot, camelyon):
    viewer = make_napari_viewer()
    (slide,) = viewer.open(camelyon / "tumor_001_level5.ome.tif", plugin="napari-lnmeta")
    (mask,) = viewer.open(camelyon / "tumor_001_level5_tumor_mask.png", plugin="napari-lnmeta")
    (polys,) = viewer.open(camelyon / "Tumor_001.json", plugin="napari-lnmeta")
    (rgb,) = viewer.open(camelyon / "tumor_001_level5.tif", plugin="napari-lnmeta")
    coords = np.array([TUMOUR, FAR])
    les = Lesions(coords=coords, cells=coords.astype(np.int64) // 32,
                  probability=np.array([0.9, 0.8], np.float32), threshold=0.5,
                  radius_um=200.0, radius_px=200.0 / MPP5, slide_mpp=MPP5, slide="tumor_001")
    d, kw, _ = lesions_layer_data(les)
    viewer.add_points(d, **kw)
    w = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(w)
    truths = [w.truth_combo.itemText(i) for i in range(w.truth_combo.count())]
    assert mask.name in truths and polys.name in truths  # a mask PNG is offered as truth
    assert rgb.name not in truths  # a picture is not
    w.slide_combo.setCurrentText(slide.name)
    w.pred_combo.setCurrentText(LESIONS_LAYER)
    # the mask still in pixels, the slide in µm: refused, no number
    w.truth_combo.setCurrentText(mask.name)
    status = _run(w, qtbot)
    assert status.startswith("error:") and "share a frame" in status, status
    assert "FROC" not in w.summary.text()
    # placed over the slide with the Pixel size widget's logic: evaluated, the tumour hit
    apply_slide_mpp(viewer, slide, [mask])
    assert _run(w, qtbot) == "done"
    assert w.session.report.froc["n_tumours"] == 2 and "FROC score" in w.summary.text()
    # CAMELYON16 polygons are in level-0 pixels of the full scan (32x): given the level-5
    # slide's µm/px they land far outside it -> refused, not FROC 0 with false positives
    w.session.report = None
    apply_slide_mpp(viewer, slide, [polys])
    w.truth_combo.setCurrentText(polys.name)
    status = _run(w, qtbot)
    assert status.startswith("error:") and "outside" in status, status
    assert w.session.report is None and "FROC" not in w.summary.text()
    # at their own pixel size (1/32 of the slide's) they evaluate like the mask
    from napari_lnmeta._napari.units import set_layer_mpp

    set_layer_mpp(polys, MPP5 / 32)
    assert _run(w, qtbot) == "done"
    assert w.session.report.froc["n_tumours"] == 2


def test_truth_scale_control_reaches_the_folder_evaluation(make_napari_viewer):
    viewer = make_napari_viewer()
    w = EvaluateWidget(viewer)
    w.mode.setCurrentText("folders")
    assert w.truth_scale.isEnabled()
    w.truth_scale.setValue(1 / 32)
    assert w.config().truth_scale == 0.03125
