"""The "Register IHC" and "Transfer mask" widgets in a real napari viewer."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from napari_lnmeta._napari.layers import slide_layer_data
from napari_lnmeta._napari.registration_layers import (
    CHECK_LAYER,
    MASK_LAYER,
    NUDGE_FIXED,
    NUDGE_MOVING,
    PREVIEW_LAYER,
    REGISTERED_LAYER,
)
from napari_lnmeta._qt.register_widget import RegisterWidget
from napari_lnmeta._qt.transfer_widget import TransferMaskWidget
from napari_lnmeta.core.dab import TUMOUR, dab_mask
from napari_lnmeta.io.frame import layer_transform
from napari_lnmeta.io.omezarr import read_ome_zarr
from napari_lnmeta.io.slide import MppWarning, open_slide


@pytest.fixture
def viewer_pair(make_napari_viewer, ihc_png, tmp_path):
    """The IHC sample as the 'fixed' slide and a rotated copy of it as the 'moving' one.

    Both are opened from files by our reader (0.5 µm/px), as a user would.
    """
    from PIL import Image

    with Image.open(ihc_png) as im:
        rgb = np.asarray(im.convert("RGB"))
    moving_path = tmp_path / "ihc_rotated.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, -1))).save(moving_path)
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        fixed = open_slide(ihc_png, mpp=0.5)
        moving = open_slide(moving_path, mpp=0.5)
    for slide, name in ((fixed, "H&E"), (moving, "IHC")):
        data, kw, _ = slide_layer_data(slide, name=name)
        kw["metadata"]["lnmeta"]["mpp"] = 0.5
        viewer.add_image(data, **kw)
    return viewer, rgb


def _wait(qtbot, panel, timeout=60_000):
    qtbot.waitUntil(lambda: not panel.running, timeout=timeout)
    assert panel.last_error is None, panel.last_error


def test_register_judge_nudge_and_transfer(viewer_pair, qtbot, tmp_path):
    viewer, rgb = viewer_pair
    reg = RegisterWidget(viewer)
    qtbot.addWidget(reg)
    assert reg.fixed_combo.currentText() == "H&E" and reg.moving_combo.currentText() == "IHC"
    reg.mode.setCurrentText("affine")
    reg.run_registration()
    _wait(qtbot, reg.panel)
    t = reg.session.transform
    assert t is not None and t.mode == "affine"
    # the rotation was found: fixed (r, c) shows moving (c, h - 1 - r) of the rotated copy
    h = rgb.shape[0]
    p = np.array([[100.0, 200.0], [400.0, 50.0]])
    expect = np.column_stack([p[:, 1], h - 1 - p[:, 0]])
    np.testing.assert_allclose(t.fixed_to_moving(p), expect, atol=1.0)

    layer = viewer.layers[REGISTERED_LAYER]
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, viewer.layers["H&E"].scale)
    assert layer.metadata["lnmeta"]["registration"]["transform"] is t
    # the lazily warped IHC is the fixed image again (both are the same pixels)
    warped = np.asarray(layer.data[0][100:300, 100:300])
    assert np.abs(warped.astype(int) - rgb[100:300, 100:300]).mean() < 8
    reg.opacity.setValue(30)
    assert layer.opacity == pytest.approx(0.3)

    reg.view_mode.setCurrentText("checkerboard")  # made in the worker
    _wait(qtbot, reg.panel)
    check = viewer.layers[CHECK_LAYER]
    assert check.rgb and not layer.visible
    reg.view_mode.setCurrentText("difference")
    _wait(qtbot, reg.panel)
    assert not viewer.layers[CHECK_LAYER].rgb
    assert float(np.median(viewer.layers[CHECK_LAYER].data)) < 0.1
    reg.view_mode.setCurrentText("overlay")
    assert CHECK_LAYER not in viewer.layers and layer.visible

    # manual nudge: one pair shifts the IHC so that its feature lands on the H&E point
    reg.start_nudge()
    scale = np.asarray(viewer.layers["H&E"].scale)
    viewer.layers[NUDGE_MOVING].add(np.array([250.0, 260.0]) * scale)
    viewer.layers[NUDGE_FIXED].add(np.array([254.0, 257.0]) * scale)
    before = reg.session.transform
    reg.apply_nudge()
    after = reg.session.transform
    np.testing.assert_allclose(after.fixed_to_moving([[254.0, 257.0]]),
                               before.fixed_to_moving([[250.0, 260.0]]), atol=1e-6)
    assert len(viewer.layers[NUDGE_FIXED].data) == 0
    reg.save_transform(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["pre"] is not None
    reg.load_transform(tmp_path / "t.json")  # undo the nudge by loading... the same file
    np.testing.assert_allclose(reg.session.transform.pre, after.pre)

    # ---- Transfer mask ---------------------------------------------------------------
    tw = TransferMaskWidget(viewer)
    qtbot.addWidget(tw)
    assert tw.source_combo.currentText() == REGISTERED_LAYER
    assert tw.session.transform is reg.session.transform
    tw.auto_threshold()  # computed in the worker
    _wait(qtbot, tw.panel)
    thr = tw.session.threshold
    assert 0.04 < thr < 0.09 and tw.threshold_spin.value() == pytest.approx(thr, abs=1e-3)
    viewer.reset_view()
    tw.preview()
    prev = viewer.layers[PREVIEW_LAYER]
    low = float((np.asarray(prev.data) == TUMOUR).mean())
    assert 0.3 < low < 0.8
    tw.threshold_slider.setValue(150)  # 0.150 DAB OD: live preview after a debounce
    assert tw.threshold_spin.value() == pytest.approx(0.15)
    qtbot.waitUntil(lambda: float((np.asarray(viewer.layers[PREVIEW_LAYER].data)
                                   == TUMOUR).mean()) < low / 2, timeout=5000)

    tw.set_threshold(thr)
    tw.run_mask()
    _wait(qtbot, tw.panel)
    mask = viewer.layers[MASK_LAYER]
    assert mask._type_string == "labels"
    frame = tw.session.frame
    np.testing.assert_allclose(mask.scale, layer_transform(frame)["scale"])
    np.testing.assert_allclose(mask.translate, layer_transform(frame)["translate"])
    # the mask is made at 2 µm/px (4 slide px): compare with the full-resolution mask
    d = int(frame.downsample)
    assert d == 4
    ref = dab_mask(rgb, mpp=0.5, threshold=thr)[0][d // 2::d, d // 2::d] == TUMOUR
    got = np.asarray(mask.data) == TUMOUR
    assert got.shape == ref.shape
    iou = (got & ref).sum() / max((got | ref).sum(), 1)
    assert iou > 0.75, iou

    # the user edits the mask (paints fibrosis), then saves and exports
    data = np.asarray(mask.data).copy()
    data[:5, :5] = 2
    mask.data = data
    out = tw.save_mask(tmp_path / "mask.ome.zarr")
    res = read_ome_zarr(out)
    assert res.kind == "labels"
    np.testing.assert_array_equal(res.data.compute(), data)
    gj = tw.export_geojson(tmp_path / "mask.geojson")
    feats = json.loads(gj.read_text())["features"]
    names = {f["properties"]["classification"]["name"] for f in feats}
    assert names == {"tumour", "fibrosis"}


def test_clear_errors_without_layers(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    reg = RegisterWidget(viewer)
    tw = TransferMaskWidget(viewer)
    qtbot.addWidget(reg)
    qtbot.addWidget(tw)
    reg.run_registration()
    assert "pick an H&E" in reg.panel.status.text()
    tw.run_mask()
    assert "no registered pair" in tw.panel.status.text()
