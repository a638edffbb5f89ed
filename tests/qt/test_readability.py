"""Readable results in napari: top-N lesion labels, tier legend, colour bar, once-only
µm/px warning, no private napari attributes from dock widgets, no stale errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from napari_lnmeta._napari.layers import add_or_update, canvas_size, layer_kind, slide_layer_data
from napari_lnmeta._napari.prediction_layers import (
    heatmap_layer_data,
    lesion_labels,
    lesions_layer_data,
    relabel_lesions,
    show_colorbar,
)
from napari_lnmeta.core.lesions import Lesions
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.io.slide import MppWarning, open_slide


def _reference_labels(p, top):
    """Restatement: the ``top`` largest probabilities are labelled; ties go to the earlier."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))[:max(top, 0)]
    return [f"{p[i]:.2f}" if i in order else "" for i in range(len(p))]


def test_lesion_labels_top_n_against_a_restatement():
    assert lesion_labels([0.6, 0.99, 0.7, 0.99, 0.8], 2) == ["", "0.99", "", "0.99", ""]
    assert lesion_labels([0.6, 0.9], 0) == ["", ""]
    assert lesion_labels([], 10) == []
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        p = np.round(rng.random(n), int(rng.integers(1, 3)))  # rounding makes ties
        top = int(rng.integers(0, 15))
        assert lesion_labels(p, top) == _reference_labels(list(p), top)


def _lesions(n=30, mpp=0.5):
    rng = np.random.default_rng(1)
    prob = np.sort(rng.uniform(0.5, 1.0, n))[::-1].astype(np.float32)
    coords = rng.uniform(0, 2000, (n, 2))
    return Lesions(coords=coords, cells=(coords // 16).astype(np.int64), probability=prob,
                   threshold=0.5, radius_um=200.0, radius_px=200.0 / mpp, slide_mpp=mpp,
                   slide="s")


def test_only_top_n_lesions_are_labelled_and_relabel(make_napari_viewer):
    viewer = make_napari_viewer()
    les = _lesions()
    data, kw, kind = lesions_layer_data(les)
    layer = add_or_update(viewer, data, kw, kind)
    texts = list(layer.text.values)
    assert sum(bool(t) for t in texts) == 10 and texts[:10] == [f"{p:.2f}" for p in
                                                                 les.probability[:10]]
    relabel_lesions(layer, 3)
    assert [bool(t) for t in layer.text.values] == [True] * 3 + [False] * 27
    # a second run replaces the points and their labels together
    les2 = _lesions(n=5)
    data, kw, kind = lesions_layer_data(les2, label_top=2)
    layer = add_or_update(viewer, data, kw, kind)
    assert len(layer.data) == 5 and [bool(t) for t in layer.text.values] == [True, True] + [False] * 3
    np.testing.assert_allclose(layer.features["probability"], les2.probability)


def test_detect_widget_has_tier_legend_and_heatmap_colour_bar(make_napari_viewer):
    from napari_lnmeta._qt.predict_widget import PredictWidget
    from napari_lnmeta.core.heatmap import TIER_NAMES

    viewer = make_napari_viewer()
    w = PredictWidget(viewer)
    assert w.tier_legend.wordWrap()
    assert all(name in w.tier_legend.text() for name in TIER_NAMES.values())
    assert w.label_top.value() == 10
    frame = SlideFrame(downsample=32.0, slide_mpp=0.5, slide="s", slide_shape=(640, 640))
    layer = add_or_update(viewer, *heatmap_layer_data(np.zeros((20, 20), np.float32), frame))
    assert not layer.colorbar.visible
    show_colorbar(layer)
    assert layer.colorbar.visible


def test_no_private_napari_attributes_behind_the_plugin_proxy(make_napari_viewer, cmu1):
    """Dock widgets get napari's public-only proxy; our helpers must not warn through it."""
    from napari.utils._proxies import PublicOnlyProxy

    from napari_lnmeta._napari.registration_layers import visible_region
    from napari_lnmeta._qt.tissue_widget import visible_box

    viewer = make_napari_viewer()
    proxy = PublicOnlyProxy(viewer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        slide = open_slide(cmu1)
    frame = SlideFrame(downsample=32.0, slide_mpp=slide.mpp, slide=slide.name,
                       slide_shape=slide.shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Private attribute access")
        data, kw, kind = slide_layer_data(slide)
        add_or_update(proxy, data, kw, kind)
        grid = np.zeros((93, 70), np.float32)
        add_or_update(proxy, *heatmap_layer_data(grid, frame))
        layer = add_or_update(proxy, *heatmap_layer_data(grid + 0.5, frame))  # reused
        assert layer_kind(proxy.layers[slide.name]) == "image"
        assert canvas_size(proxy)[0] > 0
        box = visible_box(proxy, slide, proxy.layers[slide.name])
        region = visible_region(proxy, proxy.layers[slide.name], slide.shape)
    assert float(np.asarray(layer.data).max()) == 0.5
    assert box[2] > 0 and box[3] > 0 and region[1][0] > 0


def test_mpp_warning_once_per_file(make_napari_viewer, camelyon, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_lnmeta._napari.layers import slide_from_layer

    path = tmp_path / "no_mpp_slide.tif"
    os.symlink(camelyon / "tumor_001_level5_pyramid.tif", path)
    viewer = make_napari_viewer()

    def shown():
        return sum(str(path) in str(r.message) for r in notification_manager.records)

    before = shown()
    layer = viewer.open(str(path), plugin="napari-lnmeta")[0]
    assert shown() - before == 1
    viewer.open(str(path), plugin="napari-lnmeta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide_from_layer(layer)
    assert not [w for w in caught if issubclass(w.category, MppWarning)]
    assert shown() - before == 1


def test_a_new_run_clears_stale_errors(make_napari_viewer, qtbot):
    from napari_lnmeta._qt.evaluate_widget import EvaluateWidget
    from napari_lnmeta.progress import Progress

    viewer = make_napari_viewer()
    w = EvaluateWidget(viewer)
    qtbot.addWidget(w)
    w.run_gradcam()  # no slide: an error in the Grad-CAM status line
    assert w.cam_panel.status.text().startswith("error")

    def job():
        yield Progress(1, 1, "x")
        return 1

    w.panel.start(job)
    assert w.cam_panel.status.text() == ""
    qtbot.waitUntil(lambda: not w.panel.running, timeout=30_000)


@pytest.mark.parametrize("text,breaks", [("short", 0), ("a" * 40, 0),
                                         ("/x/" + "y" * 30 + "/z.tif: missing", 4)])
def test_long_paths_get_break_opportunities(text, breaks):
    from napari_lnmeta._qt.base import WrapLabel, breakable

    assert breakable(text).count("\u200b") == breaks
    assert breakable(text).replace("\u200b", "") == text
    if breaks:
        label = WrapLabel(text)
        assert label.text() == text and label.wordWrap()
