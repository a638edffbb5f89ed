"""The napari contributions with real viewers: reader, writers, sample data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_lnmeta._napari.layers import (
    frame_kwargs,
    is_slide_layer,
    slide_layer_names,
    view_box,
    viewer_camera,
)
from napari_lnmeta._napari.reader import napari_get_reader
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.io.omezarr import read_ome_zarr, write_ome_zarr
from napari_lnmeta.io.slide import MppWarning

SAMPLES = [
    ("cmu1_small_region_svs/CMU-1-Small-Region.svs", 0.499),
    ("camelyon16_tumor001_lowres/tumor_001_level5.tif", None),
    ("camelyon16_tumor001_lowres/tumor_001_level5_pyramid.tif", None),
    ("camelyon16_tumor001_lowres/tumor_001_level5.ome.tif", 7.776),
    ("skimage_ihc_dab/ihc.png", None),
    ("anhir_cima_lung_lesion3_he_ihc/images/29-041-Izd2-w35-He-les3.jpg", None),
]


@pytest.mark.parametrize("rel, mpp", SAMPLES)
def test_viewer_opens_each_shared_sample(make_napari_viewer, shared_data, rel, mpp):
    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        layers = viewer.open(shared_data / rel, plugin="napari-lnmeta")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.rgb and layer.multiscale
    assert tuple(layer.contrast_limits) == (0, 255)
    expect = mpp if mpp is not None else 1.0
    assert tuple(layer.scale) == pytest.approx((expect, expect))
    assert layer.metadata["lnmeta"]["path"] == str(shared_data / rel)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.std() > 5  # tissue is visible, not a blank canvas


def test_reader_declines_bad_files(tmp_path, cmu1):
    bad = {
        "missing.svs": None,
        "empty.svs": b"",
        "trunc.svs": cmu1.read_bytes()[:150_000],
        "text.tif": b"not a tiff\n",
        "notes.txt": b"hello",
    }
    for name, content in bad.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        assert napari_get_reader(str(tmp_path / name)) is None, name
    (tmp_path / "dir").mkdir()
    assert napari_get_reader(str(tmp_path / "dir")) is None
    assert napari_get_reader([str(cmu1), str(cmu1)]) is None


def test_result_layers_overlay_the_slide(make_napari_viewer, tmp_path, cmu1):
    viewer = make_napari_viewer()
    viewer.open(cmu1, plugin="napari-lnmeta")
    mask = np.zeros((2967 // 16 + 1, 2220 // 16 + 1), np.uint8)
    mask[10:20, 30:40] = 1
    frame = SlideFrame(downsample=16, slide_mpp=0.499, slide=cmu1.name, slide_shape=(2967, 2220))
    p = write_ome_zarr(tmp_path / "tumour.ome.zarr", mask, frame=frame, kind="labels")
    (labels,) = viewer.open(p, plugin="napari-lnmeta")
    assert labels._type_string == "labels"
    slide_layer = viewer.layers[0]
    # the world position of mask cell (10, 30)'s top-left corner is slide pixel (160, 480)'s
    world_cell = np.asarray(labels.data_to_world((10 - 0.5, 30 - 0.5)))
    world_px = np.asarray(slide_layer.data_to_world((160 - 0.5, 480 - 0.5)))
    np.testing.assert_allclose(world_cell, world_px)
    # a heatmap opened from its store is a result over the slide, not a slide
    kw = frame_kwargs(frame)
    kw["metadata"]["lnmeta"]["path"] = str(tmp_path / "heat.ome.zarr")
    viewer.add_image(mask.astype(np.float32), name="heat", **kw)
    assert [is_slide_layer(ly) for ly in viewer.layers] == [True, False, False]
    assert slide_layer_names(viewer) == [slide_layer.name]
    # what is in view, in each layer's own pixels: the same level-0 box
    viewer_camera(viewer).center = (1000 * 0.499, 700 * 0.499)
    viewer_camera(viewer).zoom = 1.0
    r0, c0, r1, c1 = view_box(viewer, slide_layer)
    assert r0 < 1000 < r1 and c0 < 700 < c1
    np.testing.assert_allclose(np.asarray(view_box(viewer, labels)) * 16 + 7.5,
                               (r0, c0, r1, c1))


def test_writers_roundtrip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    data = np.zeros((64, 80), np.int32)
    data[5:20, 7:30] = 2
    layer = viewer.add_labels(data, name="mask", scale=(0.5, 0.5))
    out = tmp_path / "mask.ome.zarr"
    written = layer.save(str(out), plugin="napari-lnmeta")
    assert written
    res = read_ome_zarr(out)
    np.testing.assert_array_equal(res.data.compute(), data)
    assert res.frame.slide_mpp == 0.5 and res.kind == "labels"
    img = viewer.add_image(np.random.default_rng(0).random((40, 30), dtype=np.float32), name="hm")
    img.save(str(tmp_path / "hm.ome.zarr"), plugin="napari-lnmeta")
    assert read_ome_zarr(tmp_path / "hm.ome.zarr").data.shape == (40, 30)


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-lnmeta", "cmu1_small_region")
    layer = viewer.layers[-1]
    assert layer.data[0].shape == (2967, 2220, 3)
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    viewer.open_sample("napari-lnmeta", "ihc_dab")
    assert viewer.layers[-1].data[0].shape == (512, 512, 3)


def test_shapes_to_qupath_geojson(make_napari_viewer, tmp_path, cmu1):
    import json

    from napari_lnmeta.io.annotations import read_geojson

    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(cmu1, plugin="napari-lnmeta")
    # a rectangle drawn in µm over the slide: rows 100-200 µm, cols 50-150 µm
    rect = np.array([[100, 50], [100, 150], [200, 150], [200, 50]], float)
    shapes = viewer.add_shapes([rect], shape_type="rectangle", name="roi",
                               metadata={"lnmeta": dict(slide_layer.metadata["lnmeta"])})
    out = tmp_path / "roi.geojson"
    shapes.save(str(out), plugin="napari-lnmeta")
    gj = json.loads(out.read_text())
    ring = np.asarray(gj["features"][0]["geometry"]["coordinates"][0])
    # x, y in level-0 pixels = µm / 0.499
    np.testing.assert_allclose(ring[:, 0].min(), 50 / 0.499, rtol=1e-4)
    np.testing.assert_allclose(ring[:, 1].max(), 200 / 0.499, rtol=1e-4)
    (poly,) = read_geojson(out)
    np.testing.assert_allclose(poly.bbox, (100 / 0.499, 50 / 0.499, 200 / 0.499, 150 / 0.499), rtol=1e-4)
