"""The "Evaluate" widget: real viewer, real CAMELYON16 slide and expert mask, real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lnmeta._napari.layers import frame_kwargs, slide_layer_data, viewer_camera
from napari_lnmeta._napari.prediction_layers import LESIONS_LAYER, lesions_layer_data
from napari_lnmeta._qt.evaluate_widget import (
    DETECTIONS_LAYER,
    GRADCAM_LAYER,
    MODE_FOLDERS,
    REGIONS_LAYER,
    EvaluateWidget,
)
from napari_lnmeta.core.lesions import Lesions, write_lesions_geojson
from napari_lnmeta.io.frame import SlideFrame, layer_transform
from napari_lnmeta.io.slide import open_slide

#: level-0 (row, col) of tumor_001_level5 points: in the tumour, next to it, far from it
TUMOUR, NEAR, FAR = (3927.0, 2226.0), (3931.0, 2229.0), (1500.0, 1200.0)


@pytest.fixture(scope="module")
def mask(camelyon):
    from PIL import Image

    return np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0


def _lesions(mpp: float) -> Lesions:
    coords = np.array([TUMOUR, NEAR, FAR])
    return Lesions(coords=coords, cells=coords.astype(np.int64) // 32,
                   probability=np.array([0.9, 0.6, 0.8], np.float32), threshold=0.5,
                   radius_um=200.0, radius_px=200.0 / mpp, slide_mpp=mpp,
                   slide="tumor_001_level5")


def _viewer(make_napari_viewer, camelyon, mask):
    viewer = make_napari_viewer()
    slide = open_slide(camelyon / "tumor_001_level5.ome.tif")
    data, kw, _ = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    fk = frame_kwargs(SlideFrame(downsample=1.0, slide_mpp=slide.mpp, slide=slide.name))
    viewer.add_labels(mask.astype(np.uint8), name="expert tumour", **fk)
    d, lk, _ = lesions_layer_data(_lesions(slide.mpp))
    viewer.add_points(d, **lk)
    w = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(w)
    return viewer, slide, w


def test_evaluate_layers_table_and_jump(make_napari_viewer, qtbot, camelyon, mask):
    viewer, slide, w = _viewer(make_napari_viewer, camelyon, mask)
    assert w.pred_combo.currentText() == LESIONS_LAYER
    w.truth_combo.setCurrentText("expert tumour")
    assert w.slide_combo.currentText() == slide.name
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    rep = w.session.report
    assert rep.froc is not None and rep.froc["n_tumours"] == 2
    t = w.det_table
    assert t.rowCount() == 3
    assert [t.item(i, 2).text() for i in range(3)] == ["TP", "duplicate", "FP"]
    assert "FROC score" in w.summary.text() and not w.froc_label.pixmap().isNull()
    assert DETECTIONS_LAYER in viewer.layers and REGIONS_LAYER in viewer.layers
    regions = viewer.layers[REGIONS_LAYER]
    # the regions lie on the slide: the tumour point's region label is non-zero
    world = viewer.layers[slide.name].data_to_world(TUMOUR)
    assert regions.get_value(world, world=True) > 0
    # clicking the FP row centres the view on it and selects it
    rect = t.visualItemRect(t.item(2, 0))
    qtbot.mouseClick(t.viewport(), 1, pos=rect.center())  # Qt.LeftButton
    cam = viewer_camera(viewer)
    np.testing.assert_allclose(cam.center[-2:], np.asarray(FAR) * slide.mpp, rtol=1e-6)
    det = viewer.layers[DETECTIONS_LAYER]
    assert det.selected_data == {2} and viewer.layers.selection.active is det
    assert det.features["outcome"][2] == "FP"
    # another row, by API
    w.jump_to(0)
    np.testing.assert_allclose(cam.center[-2:], np.asarray(TUMOUR) * slide.mpp, rtol=1e-6)
    # a tumour-free slide: everything is a false positive, no FROC (a note says why)
    w.truth_combo.setCurrentText("(none: tumour-free slide)")
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert [t.item(i, 2).text() for i in range(3)] == ["FP"] * 3
    assert "FROC not computed" in w.summary.text() and REGIONS_LAYER not in viewer.layers


def test_evaluate_folders_and_gradcam(make_napari_viewer, qtbot, camelyon, mask, tmp_path):
    viewer, slide, w = _viewer(make_napari_viewer, camelyon, mask)
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    folder = pred / "tumor_001_level5"
    folder.mkdir(parents=True)
    truth.mkdir()
    write_lesions_geojson(folder / "lesions.geojson", _lesions(slide.mpp))
    (folder / "summary.json").write_text(json.dumps({
        "format": "lnmeta-prediction", "complete": True,
        "slide": {"path": str(slide.path), "shape": list(slide.shape), "mpp": slide.mpp},
        "score": {"max": 0.9}}))
    (pred / "normal_001.csv").write_text("0.3,100,100\n")
    from PIL import Image

    Image.fromarray(mask.astype(np.uint8) * 255).save(truth / "tumor_001_level5_mask.png")
    w.mode.setCurrentText(MODE_FOLDERS)
    w.pred_dir.setText(str(pred))
    w.truth_dir.setText(str(truth))
    w.negatives.setText("normal_001")
    w.out_dir.setText(str(tmp_path / "report"))
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    rep = w.session.report
    assert len(rep.slides) == 2 and rep.roc["AUC"] == 1.0
    assert (tmp_path / "report" / "report.json").is_file()
    assert w.slide_table.rowCount() == 4  # 2 slides + mean + sd
    assert not w.roc_label.pixmap().isNull()
    # the open slide's detections are shown
    assert w.session.shown.slide == "tumor_001_level5" and w.det_table.rowCount() == 3
    # clicking the other slide's row shows its detections
    w.slide_table.cellClicked.emit(0, 0)
    assert w.session.shown.slide == "normal_001" and w.det_table.rowCount() == 1
    # a second run into the same report folder is refused, with a message
    w.panel.run_button.click()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert "already exists" in w.panel.status.text()

    # Grad-CAM of a box around the tumour with the bundled model
    box = (3800.0, 2100.0, 4100.0, 2400.0)  # 19 x 19 patches of 16 px
    w.max_patches.setValue(400)
    w.run_gradcam(box)
    qtbot.waitUntil(lambda: not w.cam_panel.running, timeout=60_000)
    assert w.cam_panel.status.text() == "done", w.cam_panel.status.text()
    cam = viewer.layers[GRADCAM_LAYER]
    assert cam.data.min() >= 0 and cam.data.max() <= 1
    frame = SlideFrame.from_json(cam.metadata["lnmeta"]["frame"])
    tr = layer_transform(frame)
    np.testing.assert_allclose(cam.scale, tr["scale"])
    np.testing.assert_allclose(cam.translate, tr["translate"])
    # the map covers the box: its first pixel starts at the box corner (level-0)
    assert frame.origin == (3800.0, 2100.0)
    assert cam.data.shape[0] * frame.downsample >= 300
    assert "patches explained" in w.cam_info.text()
    # the view: the camera on the tumour
    viewer_camera(viewer).center = tuple(np.asarray(TUMOUR) * slide.mpp)
    viewer_camera(viewer).zoom = 2.0
    r0, c0, r1, c1 = w.view_box()
    assert r0 < TUMOUR[0] < r1 and c0 < TUMOUR[1] < c1
