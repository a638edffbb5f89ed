"""Label sources -> level-0 polygons and rasters (CAMELYON JSON, ASAP XML, GeoJSON, CSV, OME-Zarr)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_lnmeta.errors import InputError
from napari_lnmeta.io.annotations import (
    LabelMask,
    Polygon,
    load_labels,
    mask_to_polygons,
    polygons_to_mask,
    read_asap_xml,
    read_camelyon_json,
    read_geojson,
    read_polygons,
    read_roi_rectangles,
    write_geojson,
)
from napari_lnmeta.io.frame import SlideFrame
from napari_lnmeta.io.omezarr import write_ome_zarr

SHAPE5 = (7168, 3072)  # tumor_001 at level 5 (rows, cols)


def test_camelyon_json_matches_reference_mask(camelyon):
    polys = read_camelyon_json(camelyon / "Tumor_001.json", scale=1 / 32)
    assert [p.label for p in polys] == ["tumour", "tumour"]
    # x, y in the file -> (row, col): the tumour bounding box of PROVENANCE.md
    r0, c0, r1, c1 = np.min([p.bbox for p in polys], 0)[:2].tolist() + \
        np.max([p.bbox for p in polys], 0)[2:].tolist()
    assert 3831 <= r0 <= 3832 and 4205 <= r1 <= 4206 and 2184 <= c0 <= 2185 and 2288 <= c1 <= 2289
    lm = polygons_to_mask(polys, SHAPE5, 1.0, slide_mpp=7.776)
    ref = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0
    mine = lm.labels == 1
    iou = (mine & ref).sum() / (mine | ref).sum()
    assert iou > 0.93, iou  # PIL's ImageDraw also fills boundary pixels
    assert lm.names == {1: "tumour"}


def test_geojson_write_read_roundtrip_xy_order(tmp_path):
    outer = np.array([[10, 100], [10, 200], [60, 200], [60, 100]], float)  # (row, col)
    hole = np.array([[20, 120], [20, 140], [40, 140], [40, 120]], float)
    polys = [Polygon(outer, "tumour", "t1", [hole]), Polygon(outer + 300, "normal", "n1")]
    path = write_geojson(tmp_path / "a.geojson", polys)
    raw = json.loads(path.read_text())
    ring = raw["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == [100, 10] and ring[0] == ring[-1]  # x, y and closed
    assert raw["features"][0]["properties"]["classification"]["name"] == "tumour"
    back = read_geojson(path)
    np.testing.assert_allclose(back[0].vertices, outer)
    np.testing.assert_allclose(back[0].holes[0], hole)
    assert [p.label for p in back] == ["tumour", "normal"]
    frame, shape = SlideFrame(downsample=2.0), (200, 300)
    lm = polygons_to_mask(back, (400, 600), 2.0)
    assert lm.labels.shape == shape and frame.downsample == lm.frame.downsample
    tum = lm.values_for("tumour")[0]
    assert lm.labels[17, 75] == tum and lm.labels[15, 65] == 0  # inside vs in the hole
    with pytest.raises(Exception, match="already exists"):
        write_geojson(path, polys)


def test_asap_xml_groups(tmp_path):
    xml = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
 <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
  <Coordinates><Coordinate Order="0" X="100" Y="50"/><Coordinate Order="2" X="200" Y="150"/>
   <Coordinate Order="1" X="200" Y="50"/><Coordinate Order="3" X="100" Y="150"/></Coordinates>
 </Annotation>
 <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
  <Coordinates><Coordinate Order="0" X="120" Y="70"/><Coordinate Order="1" X="140" Y="70"/>
   <Coordinate Order="2" X="140" Y="90"/></Coordinates>
 </Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>"""
    p = tmp_path / "t.xml"
    p.write_text(xml)
    polys = read_asap_xml(p, scale=0.5)
    assert [q.label for q in polys] == ["tumour", "normal"]
    np.testing.assert_allclose(polys[0].vertices[:2], [[25, 50], [25, 100]])  # ordered, (y, x)/2
    lm = load_labels(p, slide_shape=(200, 200), slide_mpp=1.0, scale=0.5, downsample=1.0)
    t, n = lm.values_for("tumour")[0], lm.values_for("normal")[0]
    assert lm.labels[50, 75] == t and lm.labels[40, 66] == n  # normal drawn last (a hole)
    p.write_text("<not xml")
    with pytest.raises(InputError, match="not valid XML"):
        read_asap_xml(p)


def test_roi_csv_rectangles(tmp_path):
    p = tmp_path / "rois.csv"
    p.write_text("xs,ys,xe,ye\n10,20,30,60\n100,100,90,80\n")
    polys = read_roi_rectangles(p)
    assert polys[0].bbox == (20, 10, 60, 30)
    assert polys[1].bbox == (80, 90, 100, 100)  # corners sorted
    assert read_polygons(p)[0].label == "tumour"


def test_ome_zarr_mask_and_label_arrays(tmp_path):
    arr = np.zeros((50, 40), np.uint8)
    arr[10:20, 5:15] = 1
    frame = SlideFrame(downsample=4.0, slide_mpp=0.5, slide="s", slide_shape=(200, 160))
    write_ome_zarr(tmp_path / "m.ome.zarr", arr, frame=frame, kind="labels")
    lm = load_labels(tmp_path / "m.ome.zarr", slide_shape=(200, 160), slide_mpp=0.5)
    assert lm.frame.downsample == 4.0 and lm.names == {1: "tumour"}
    np.testing.assert_array_equal(lm.labels, arr)
    lm.check_fits((200, 160))
    with pytest.raises(InputError, match="does not match"):
        lm.check_fits((800, 160), "other.svs")
    # a napari Labels array with its frame
    lm2 = load_labels(arr, slide_shape=(200, 160), frame=frame)
    assert isinstance(lm2, LabelMask) and lm2.frame is frame
    outlines = mask_to_polygons(arr, frame)
    assert len(outlines) == 1
    r0, c0, r1, c1 = outlines[0].bbox
    assert 38 <= r0 <= 42 and 78 <= r1 <= 82 and 18 <= c0 <= 22 and 58 <= c1 <= 62


def test_bad_annotation_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_polygons(p)
    p.write_text(json.dumps({"positive": [{"name": "x", "vertices": [[1, 2]]}]}))
    with pytest.raises(InputError, match="at least 3"):
        read_polygons(p)
    with pytest.raises(InputError, match="no such"):
        read_polygons(tmp_path / "missing.geojson")
    with pytest.raises(InputError, match="unknown annotation format"):
        read_polygons(tmp_path / "x.txt")


def test_a_picture_is_not_a_label_mask(tmp_path, camelyon):
    """An RGB thumbnail saved as a mask is refused (not read as its red channel)."""
    from PIL import Image

    from napari_lnmeta.errors import InputError

    rgb = np.asarray(Image.open(camelyon / "tumor_001_level5.tif").convert("RGB"))[::8, ::8]
    p = tmp_path / "tumor_001_mask.png"
    Image.fromarray(np.ascontiguousarray(rgb)).save(p)
    with pytest.raises(InputError, match="colour"):
        load_labels(p, slide_shape=(7168, 3072), slide_mpp=7.776)


def test_nan_vertices_are_dropped_with_a_warning_naming_the_polygon(camelyon, tmp_path):
    """One NaN vertex in the real CAMELYON16 polygons: the polygon is kept, minus that
    vertex, and the user is told which annotation was repaired."""
    import math
    import warnings

    from napari_lnmeta.io.annotations import AnnotationWarning

    d = json.loads((camelyon / "Tumor_001.json").read_text())
    i = max(range(len(d["positive"])), key=lambda k: len(d["positive"][k]["vertices"]))
    n = len(d["positive"][i]["vertices"])
    d["positive"][i]["vertices"][5] = [math.nan, 12.0]
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        polys = read_camelyon_json(path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, AnnotationWarning)]
    assert len(msgs) == 1 and f"positive[{i}]" in msgs[0] and f"1 of {n}" in msgs[0]
    clean = read_camelyon_json(camelyon / "Tumor_001.json")
    assert len(polys) == len(clean)
    assert len(polys[i].vertices) == n - 1
    assert abs(polys[i].area - clean[i].area) < 0.01 * clean[i].area
    d["positive"][i]["vertices"] = [[math.nan, 1.0]] * (n - 2) + [[1.0, 2.0], [3.0, 4.0]]
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match="cannot be repaired"):
        read_camelyon_json(path)


@pytest.mark.parametrize("doc", [
    {"type": "FeatureCollection", "features": "abc"},
    {"type": "FeatureCollection", "features": [7]},
    {"type": "Feature", "properties": [], "geometry": {"type": "Polygon", "coordinates": []}},
    {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": "x"}},
    {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
                                                       "coordinates": [[[0, 0], "a", [1, 1]]]}},
    {"positive": "abc"},
])
def test_wrong_types_are_one_line_errors(tmp_path, doc):
    path = tmp_path / ("x.json" if "positive" in doc else "x.geojson")
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as e:
        read_polygons(path)
    assert str(path) in str(e.value)


def test_one_list_of_tumour_names_serves_models_labels_and_reference_tables(tmp_path):
    from napari_lnmeta.core.froc import read_negatives
    from napari_lnmeta.core.inference import tumour_index
    from napari_lnmeta.io.annotations import NEGATIVE_NAMES, TUMOUR_NAMES
    from napari_lnmeta.models.io import ModelMeta

    assert not set(TUMOUR_NAMES) & NEGATIVE_NAMES
    for name in TUMOUR_NAMES:
        meta = ModelMeta(architecture="resnet18", classes=["benign", name.title()], patch_size=8)
        assert tumour_index(meta) == 1, name
    ref = tmp_path / "reference.csv"
    ref.write_text("test_001,Tumor,Macro\ntest_002,Normal\ntest_003,Metastasis\n")
    assert read_negatives(ref) == {"test_002"}
