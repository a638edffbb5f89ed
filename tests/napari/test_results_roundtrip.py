"""Results come back: result folders, styled stores, GeoJSON in and out, Labels colours,
mask images as Labels (real viewers, real files written by the engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lnmeta._napari.prediction_layers import (
    BINARY_LAYER,
    HEATMAP_LAYER,
    LESIONS_LAYER,
    TIERS_LAYER,
)
from napari_lnmeta._napari.reader import napari_get_reader
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.io.omezarr import read_ome_zarr, write_ome_zarr

_MAKE_FOLDER = """
import sys
from pathlib import Path
from tests._inference_helpers import make_synthetic_slide, small_model_file
from napari_lnmeta.core.inference import InferenceConfig
from napari_lnmeta.core.predict import predict_to_folder_job
from napari_lnmeta.progress import run

d, camelyon = Path(sys.argv[1]), Path(sys.argv[2])
synth = make_synthetic_slide(d, camelyon)
model = small_model_file(d / "m.safetensors")
cfg = InferenceConfig(model=str(model), device="cpu", batch_size=64, lesion_threshold=0.0)
run(predict_to_folder_job(synth.path, d / "synthetic.lnmeta", cfg))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory, camelyon):
    """A real ``lnmeta predict`` result folder (small model, synthetic slide), made in a
    separate process: torch is never imported into this napari test process."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    d = tmp_path_factory.mktemp("pred")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _MAKE_FOLDER, str(d), str(camelyon)], check=True,
                   cwd=root, env=env, timeout=600)
    return SimpleNamespace(path=d / "synthetic.ome.tif"), d / "synthetic.lnmeta"


def test_prediction_folder_opens_as_all_its_layers_styled(make_napari_viewer, folder):
    synth, out = folder
    summary = json.loads((out / "summary.json").read_text())
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(synth.path, plugin="napari-lnmeta")
    layers = viewer.open(out, plugin="napari-lnmeta")
    names = [ly.name for ly in layers]
    for n in (HEATMAP_LAYER, BINARY_LAYER, TIERS_LAYER, LESIONS_LAYER):
        assert n in names, names
    heat = viewer.layers[HEATMAP_LAYER]
    assert heat.colormap.name == "lnmeta tumour probability"  # not grey
    assert heat.opacity == pytest.approx(0.7)  # not opaque over the slide
    assert tuple(heat.contrast_limits) == pytest.approx((0.0, 1.0))
    tiers = viewer.layers[TIERS_LAYER]
    assert tuple(np.round(np.asarray(tiers.get_color(3)) * 255)) == (255, 0, 0, 255)
    assert tuple(np.round(np.asarray(tiers.get_color(1)) * 255)) == (0, 0, 255, 255)
    pts = viewer.layers[LESIONS_LAYER]
    assert len(pts.data) == summary["counts"]["lesions"] > 0
    p = np.asarray(pts.features["probability"])
    assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    # in place: every layer is in µm and the heatmap covers the slide's extent
    for ly in layers:
        assert tuple(ly.scale[-1:]) != (1.0,), ly.name
    ext_slide = slide_layer.extent.world
    ext_heat = heat.extent.world
    assert np.all(ext_heat[1] <= ext_slide[1] + 64 * 0.5)
    assert np.all(ext_heat[1] >= ext_slide[1] - 64 * 0.5)


def test_probability_store_alone_reopens_styled(make_napari_viewer, folder):
    _synth, out = folder
    viewer = make_napari_viewer()
    (heat,) = viewer.open(out / "probability.ome.zarr", plugin="napari-lnmeta")
    assert heat.colormap.name == "lnmeta tumour probability"
    assert heat.opacity < 1.0 and heat.blending == "translucent"


def test_edited_lesions_go_to_geojson_and_back(make_napari_viewer, folder, tmp_path):
    from napari_lnmeta.io.annotations import read_points_geojson

    _synth, out = folder
    viewer = make_napari_viewer()
    viewer.open(out, plugin="napari-lnmeta")
    pts = viewer.layers[LESIONS_LAYER]
    before = np.asarray(pts.data).copy()
    pts.add([[100.0, 120.0]])  # a lesion added by hand (layer data: level-0 pixels)
    saved = tmp_path / "edited.geojson"
    assert pts.save(str(saved), plugin="napari-lnmeta")
    back = read_points_geojson(saved)
    assert len(back["coords"]) == len(before) + 1
    # level-0 pixels (world µm / 0.5 µm/px), probabilities kept
    assert tuple(pts.scale) == pytest.approx((0.5, 0.5))
    np.testing.assert_allclose(back["coords"][-1], [100.0, 120.0])
    np.testing.assert_allclose(back["coords"][:-1], before, atol=1e-3)
    np.testing.assert_allclose(back["probability"][:-1], pts.features["probability"][:-1],
                               rtol=1e-6)
    # and the file reopens as points (QuPath reads the same file)
    (again,) = viewer.open(saved, plugin="napari-lnmeta")
    assert again._type_string == "points" and len(again.data) == len(before) + 1


def test_labels_colours_survive_save_and_reopen(make_napari_viewer, tmp_path):
    from napari.utils.colormaps import DirectLabelColormap

    viewer = make_napari_viewer()
    data = np.zeros((64, 80), np.int32)
    data[5:20, 7:30] = 1
    data[30:40, 40:60] = 2
    cmap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                                           1: (1.0, 0.5, 0.0, 1.0), 2: (0.0, 0.0, 1.0, 1.0)})
    layer = viewer.add_labels(data, name="mask", scale=(0.5, 0.5), colormap=cmap)
    out = tmp_path / "mask.ome.zarr"
    assert layer.save(str(out), plugin="napari-lnmeta")
    (back,) = viewer.open(out, plugin="napari-lnmeta")
    assert back._type_string == "labels"
    for v in (1, 2):
        np.testing.assert_allclose(back.get_color(v), layer.get_color(v), atol=1 / 255)


def test_camelyon_and_qupath_annotations_open_as_shapes(make_napari_viewer, camelyon, tmp_path):
    from napari_lnmeta.io.annotations import Polygon, write_geojson

    viewer = make_napari_viewer()
    (shapes,) = viewer.open(camelyon / "Tumor_001.json", plugin="napari-lnmeta")
    assert shapes._type_string == "shapes" and len(shapes.data) == 2
    ymin = min(float(np.min(np.asarray(d)[:, 0])) for d in shapes.data)
    assert 122_000 < ymin < 123_000  # level-0 pixels of the CAMELYON16 slide
    gj = write_geojson(tmp_path / "roi.geojson",
                       [Polygon(np.array([[10, 10], [10, 50], [40, 50]], float), label="Tumor")])
    (roi,) = viewer.open(gj, plugin="napari-lnmeta")
    assert roi._type_string == "shapes"
    np.testing.assert_allclose(np.asarray(roi.data[0])[:3], [[10, 10], [10, 50], [40, 50]])
    assert napari_get_reader(str(tmp_path / "missing.geojson")) is None
    (tmp_path / "other.json").write_text('{"not": "an annotation"}')
    assert napari_get_reader(str(tmp_path / "other.json")) is None


def test_mask_png_opens_as_labels_and_converts(make_napari_viewer, camelyon):
    from napari.layers._layer_actions import _convert

    viewer = make_napari_viewer()
    (mask,) = viewer.open(camelyon / "tumor_001_level5_tumor_mask.png", plugin="napari-lnmeta")
    assert mask._type_string == "labels"
    assert mask.data.shape == (7168, 3072)
    assert (np.asarray(mask.data) > 0).sum() == 11_571
    # napari's layer-list Convert to Image / to Labels work on it (no axis_labels error)
    viewer.layers.selection = {mask}
    _convert(viewer.layers, "image")
    assert viewer.layers[-1]._type_string == "image"
    viewer.layers.selection = {viewer.layers[-1]}
    _convert(viewer.layers, "labels")
    assert viewer.layers[-1]._type_string == "labels"
    # an RGB picture is still an RGB image, not a mask
    (pic,) = viewer.open(camelyon / "tumor_001_level5.tif", plugin="napari-lnmeta")
    assert pic.rgb


def test_result_store_written_by_hand_keeps_frame(make_napari_viewer, tmp_path):
    frame = SlideFrame(downsample=16, slide_mpp=0.5, slide="s", slide_shape=(320, 320))
    p = write_ome_zarr(tmp_path / "t.ome.zarr", np.eye(20, dtype=np.uint8), frame=frame,
                       kind="labels", colors={1: (255, 0, 0, 255)})
    assert read_ome_zarr(p).attrs["image-label"]["colors"][0]["rgba"] == [255, 0, 0, 255]
    viewer = make_napari_viewer()
    (ly,) = viewer.open(p, plugin="napari-lnmeta")
    assert tuple(np.round(np.asarray(ly.get_color(1)) * 255)) == (255, 0, 0, 255)
    assert tuple(ly.scale) == pytest.approx((8.0, 8.0))


def test_mil_folder_opens_attention_styled(make_napari_viewer, tmp_path):
    out = tmp_path / "mil"
    out.mkdir()
    frame = SlideFrame(downsample=64, slide_mpp=0.5, slide="s", slide_shape=(640, 640))
    att = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    write_ome_zarr(out / "attention.ome.zarr", att, frame=frame, kind="image",
                   attrs={"mil": {"classes": ["normal", "tumour"], "probabilities": [0.2, 0.8]}})
    (out / "summary.json").write_text(json.dumps({"probabilities": {"tumour": 0.8}}))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(out, plugin="napari-lnmeta")
    assert layer.colormap.name == "inferno" and layer.opacity == pytest.approx(0.6)
    assert tuple(layer.scale) == pytest.approx((32.0, 32.0))
