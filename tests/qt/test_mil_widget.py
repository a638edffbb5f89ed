"""The "Slide-level MIL" widget: real viewer, real slide, score, attention layer, gallery."""

from __future__ import annotations

import numpy as np
import pytest
from tests._mil_helpers import crop_features, random_mil_file

from napari_lnmeta._napari.layers import slide_layer_data, viewer_camera
from napari_lnmeta._qt.mil_widget import ATTENTION_SUFFIX, MILWidget
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.clinical import ClinicalEncoder


@pytest.fixture
def setup(make_napari_viewer, tmp_path):
    path, cache_dir, cache = crop_features()
    enc = ClinicalEncoder.fit([{"age": "40", "ER": "positive"}, {"age": "70", "ER": "negative"}],
                              numeric=["age"], categorical=["ER"])
    model = random_mil_file(tmp_path / "mil.safetensors", cache.backbone, clinical=enc)
    viewer = make_napari_viewer()
    slide = open_slide(path)
    data, kw, _ = slide_layer_data(slide)
    viewer.add_image(data, **kw)
    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model_path.setText(str(model))
    w.load_model_info()
    w.device.setCurrentText("cpu")
    w.bags.setValue(6)
    w.top_k.setValue(5)
    w.cache_dir.setText(str(cache_dir))
    return viewer, w, slide, cache


def test_run_shows_score_aligned_attention_and_gallery(setup, qtbot, tmp_path):
    viewer, w, slide, cache = setup
    assert w.selected_slide_names() == [slide.name]
    assert "gated_attention MIL" in w.model_info.text() and w.clinical_box.isVisibleTo(w)
    assert set(w.clinical_fields) == {"age", "ER"}
    # an empty clinical value is refused before anything runs
    w.run()
    assert not w.panel.running and "'age' is empty/missing" in w.panel.status.text()
    w.set_clinical({"age": 52, "ER": "negative"})
    with pytest.raises(Exception, match="not a category the model knows"):
        w.set_clinical({"ER": "weak"})
    w.out_dir.setText(str(tmp_path / "results"))
    w.run()
    assert w.panel.running
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    res = w.session.results[slide.name]
    assert res.features_path == str(cache.path)  # the cache was reused
    assert "N0" in w.scores.text() and "N+" in w.scores.text()
    assert (tmp_path / "results" / "tumor001_crop.mil" / "summary.json").is_file()
    layer = viewer.layers[slide.name + ATTENTION_SUFFIX]
    np.testing.assert_allclose(layer.data, res.heatmap)
    # every heatmap cell sits on its patch: cell (i, j) centre == patch centre in world units
    slide_layer = viewer.layers[slide.name]
    grid = res.grid
    for k in (0, len(grid) // 3, len(grid) - 1):
        i, j = grid.index[k]
        centre = grid.coords[k] + (grid.size0 - 1) / 2
        np.testing.assert_allclose(layer.data_to_world((i, j)),
                                   slide_layer.data_to_world(tuple(centre)), atol=1e-9)
        assert layer.data[i, j] == pytest.approx(res.patch_attention[k])
    # the gallery: the 5 most attended patches, highest first; a click centres the view
    assert w.gallery.count() == 5
    top = res.top(5)
    assert [int(w.gallery.item(r).data(0x0100)) for r in range(5)] == list(top)
    w._go_to_patch(w.gallery.item(0))
    centre = grid.coords[top[0]] + (grid.size0 - 1) / 2
    np.testing.assert_allclose(viewer_camera(viewer).center[-2:],
                               slide_layer.data_to_world(tuple(centre)), atol=1e-6)
    assert "note:" not in w.scores.text()
    # a second run re-uses the layer; with a model file of an older version (no feature
    # statistics) the scores say so
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(w.model_path.text(), "pt") as f:
        md, names = f.metadata(), f.keys()
        tensors = {k: f.get_tensor(k) for k in names if not k.startswith("feature_")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=md)
    w.model_path.setText(str(old))
    w.load_model_info()
    w.set_clinical({"age": 52, "ER": "negative"})
    n_layers = len(viewer.layers)
    w.run()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "done", w.panel.status.text()
    assert len(viewer.layers) == n_layers
    assert "without feature statistics" in w.scores.text()


def test_cancel_and_csv_rows(setup, qtbot, tmp_path):
    viewer, w, slide, _ = setup
    csv = tmp_path / "clinical.csv"
    csv.write_text(f"slide,age,ER\n{slide.name},61,positive\n")
    w.load_clinical_csv(csv)
    assert w.clinical_fields["age"].text() == "61"
    assert w.clinical_for(slide.name) == {"slide": slide.name, "age": "61", "ER": "positive"}
    w.cache_dir.setText(str(tmp_path / "fresh-cache"))  # forces a feature extraction
    w.run()
    assert w.panel.running
    w.panel.cancel()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=60_000)
    assert w.panel.status.text() == "cancelled"
    assert not any(ly.name.endswith(ATTENTION_SUFFIX) for ly in viewer.layers)
