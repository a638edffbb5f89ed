"""CAMELYON16 evaluation: regions, ITC, matching, FROC and slide AUC by hand; component lesions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lnmeta.core.froc import (
    FrocConfig,
    evaluation_regions,
    find_predictions,
    froc_curve,
    froc_score,
    load_truth,
    match_detections,
    read_negatives,
    slide_key,
    slide_roc,
    summarise,
)
from napari_lnmeta.core.lesions import (
    component_cells,
    find_lesions,
    lesions_geojson,
    read_lesions_geojson,
    write_lesions_geojson,
)
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.frame import SlideFrame

#: slide at 0.5 µm/px, masks at downsample 16: one mask pixel = 8 µm
MPP, DS = 0.5, 16
FRAME = SlideFrame(downsample=DS, slide_mpp=MPP)


def pt(i: float, j: float) -> tuple[float, float]:
    """Level-0 (row, col) of the centre of mask pixel (i, j)."""
    return (i * DS + (DS - 1) / 2, j * DS + (DS - 1) / 2)


def _mask() -> np.ndarray:
    m = np.zeros((200, 200), bool)
    m[20:80, 20:80] = True       # lesion L1: 60 px = 480 µm
    m[120:160, 120:160] = True   # lesion L2: 40 px = 320 µm
    m[20:22, 150:152] = True     # ITC a: 16 µm
    m[185:187, 20:22] = True     # ITC b
    return m


def test_regions_are_dilated_filled_labelled_and_itc_marked():
    reg = evaluation_regions(_mask(), FRAME)
    assert reg.n_regions == 4 and reg.n_tumours == 2 and reg.n_itc == 2
    # every region grows by 37.5 µm on each side; the major axis of a square of side a is
    # 4 a / sqrt(12) = 1.15 a: L2 (320 + 75 µm) ~ 440 µm >= 275, an ITC (16 + 75) ~ 85 µm
    big = reg.major_axis_um[~reg.itc]
    assert (big > 275).all() and (reg.major_axis_um[reg.itc] < 275).all()
    lab = reg.region_at(np.array([pt(50, 50), pt(140, 140), pt(21, 151), pt(100, 100)]))
    assert lab[0] != lab[1] and lab[0] > 0 and lab[1] > 0 and lab[3] == 0
    assert reg.itc[lab[2] - 1]
    # the 75 µm dilation: 2 px (16 µm) outside the edge is inside the region, 6 px (48 µm) not
    assert reg.region_at(np.array([pt(50, 81)]))[0] == lab[0]
    assert reg.region_at(np.array([pt(50, 85)]))[0] == 0
    # a hole is filled; two blobs 32 µm apart merge (each grows by 37.5 µm)
    ring = np.zeros((100, 100), bool)
    ring[10:60, 10:60] = True
    ring[20:50, 20:50] = False
    ring[70:90, 10:30] = True
    ring[70:90, 34:54] = True
    reg2 = evaluation_regions(ring, FRAME)
    assert reg2.n_regions == 2
    assert reg2.region_at(np.array([pt(35, 35)]))[0] > 0      # in the former hole
    a, b = reg2.region_at(np.array([pt(80, 20), pt(80, 44)]))
    assert a == b > 0
    # without the µm/px the rules cannot be applied
    with pytest.raises(InputError, match="µm/px"):
        evaluation_regions(ring, SlideFrame(downsample=DS))


def _two_slides():
    """Tumour slide: L1 hit twice, L2 missed, one ITC hit, one ITC missed, one FP;
    negative slide: two FPs."""
    reg = evaluation_regions(_mask(), FRAME)
    tum = match_detections(np.array([pt(50, 50), pt(30, 30), pt(21, 151), pt(100, 100)]),
                           np.array([0.9, 0.6, 0.8, 0.7]), reg, slide="t1")
    neg = match_detections(np.array([pt(10, 10), pt(20, 20)]), np.array([0.5, 0.95]), None,
                           slide="n1")
    return tum, neg


def test_matching_rules():
    tum, neg = _two_slides()
    assert list(tum.outcome) == ["TP", "duplicate", "ITC", "FP"]
    assert tum.counts() == {"detections": 4, "tumours": 2, "itc": 2, "hits": 1, "missed": 1,
                            "duplicates": 1, "itc_detections": 1, "fp": 1}
    np.testing.assert_allclose(sorted(tum.region_score), [0.0, 0.9])  # L2 missed
    assert list(neg.outcome) == ["FP", "FP"] and not neg.is_tumour and tum.is_tumour
    # the duplicate is the lower of the two: with the order reversed the result is the same
    reg = tum.regions
    again = match_detections(tum.coords[[1, 0]], tum.probability[[1, 0]], reg)
    assert list(again.outcome) == ["duplicate", "TP"]


def test_froc_by_hand():
    """Thresholds (the challenge's list: FP probabilities 0.7, 0.5, 0.95 and one entry per
    region label: 0.9 for L1, 0 for L2 and both ITCs; sorted, the lowest, 0, dropped):
    0.95: 1 FP (neg), 0 hits -> (0.5, 0); 0.9: L1 hit -> (0.5, 0.5); 0.7: FP on t1 ->
    (1.0, 0.5); 0.5: FP on n1 -> (1.5, 0.5). The ITC detection (0.8) and the duplicate
    (0.6) are ignored. 2 slides, 2 lesions (ITC excluded). Read on the whole curve from
    (0, 0): 0.25 FP lies between (0, 0) and the *first* point at 0.5 FP, (0.5, 0) -> 0;
    >= 0.5 FP -> 0.5. FROC = (0 + 5 * 0.5) / 6."""
    tum, neg = _two_slides()
    c = froc_curve([tum, neg])
    np.testing.assert_allclose(c["fps"], [0, 0.5, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(c["sensitivity"], [0, 0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(c["thresholds"][1:], [0.95, 0.9, 0.7, 0.5], rtol=1e-6)
    f = froc_score([tum, neg])
    np.testing.assert_allclose(f["sensitivity"], [0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert f["score"] == pytest.approx(2.5 / 6)
    assert (f["n_slides"], f["n_tumours"], f["n_itc"]) == (2, 2, 2)
    # L2 found at 0.4 adds (1.5, 1.0): (0, 0), (0.5, 0), (0.5, 0.5), (1.0, 0.5),
    # (1.5, 0.5), (1.5, 1.0) -> 0, 0.5, 0.5, 1, 1, 1
    reg = tum.regions
    tum2 = match_detections(np.r_[tum.coords, [pt(140, 140)]], np.r_[tum.probability, 0.4], reg)
    f2 = froc_score([tum2, neg])
    np.testing.assert_allclose(f2["sensitivity"], [0, 0.5, 0.5, 1.0, 1.0, 1.0])
    assert f2["score"] == pytest.approx(4 / 6)


def test_froc_thresholds_follow_the_challenge():
    """Every lesion hit and no ITC: the lowest entry of the list (here the hit at 0.3) is
    dropped, so that hit never counts; a hit and an FP at 0.6 give two thresholds
    (float32(0.6) > 0.6): at the upper one only the hit counts."""
    m = np.zeros((200, 200), bool)
    m[20:80, 20:80] = True
    m[120:160, 120:160] = True
    reg = evaluation_regions(m, FRAME)
    assert reg.n_tumours == 2 and reg.n_itc == 0
    tum = match_detections(np.array([pt(50, 50), pt(140, 140)]), np.array([0.9, 0.3]), reg)
    neg = match_detections(np.array([pt(10, 10)]), np.array([0.5]), None)
    c = froc_curve([tum, neg])
    np.testing.assert_allclose(c["thresholds"][1:], [0.9, 0.5], rtol=1e-6)
    np.testing.assert_allclose(c["sensitivity"], [0, 0.5, 0.5])
    tie = match_detections(np.array([pt(50, 50), pt(140, 140), pt(100, 100)]),
                           np.array([0.6, 0.2, 0.6]), reg)
    c = froc_curve([tie])
    assert c["thresholds"][1] == np.float32(0.6) and c["thresholds"][2] == 0.6
    np.testing.assert_allclose(c["fps"], [0, 0, 1])
    np.testing.assert_allclose(c["sensitivity"], [0, 0.5, 0.5])


    # a set without tumour regions has no FROC
    with pytest.raises(InputError, match="FROC needs"):
        froc_curve([neg])


def test_slide_auc_by_hand():
    from sklearn.metrics import roc_auc_score

    reg = evaluation_regions(_mask(), FRAME)
    scores = {"t1": 0.9, "t2": 0.6, "t3": 0.4, "n1": 0.5, "n2": 0.1}
    res = [match_detections(np.zeros((0, 2)), np.zeros(0), reg if k[0] == "t" else None,
                            slide=k, score=s) for k, s in scores.items()]
    roc = slide_roc(res, n_boot=200)
    # pairs (tumour > normal): 0.9 > both, 0.6 > both, 0.4 > 0.1 only: 5 / 6
    assert roc["AUC"] == pytest.approx(5 / 6)
    y = [1, 1, 1, 0, 0]
    assert roc["AUC"] == pytest.approx(roc_auc_score(y, list(scores.values())))
    assert roc["AUC_CI"][0] <= roc["AUC"] <= roc["AUC_CI"][1]
    assert (roc["TP"], roc["FN"], roc["TN"], roc["FP"]) == (2, 1, 1, 1)  # at 0.5
    # without a given score the slide score is the top detection (0 without any)
    r = match_detections(np.array([pt(1, 1)]), np.array([0.3]), None)
    assert r.score == pytest.approx(0.3) and "detection" in r.score_source
    # one class only: a note, not a crash
    rep = summarise(res[:3], FrocConfig(n_boot=50))
    assert rep.roc is None and any("AUC" in n for n in rep.notes)
    json.dumps(rep.to_json())


def test_camelyon_truth_polygons_and_mask_agree(camelyon, tmp_path):
    """tumor_001: the expert polygons (level-0) and the level-5 mask give the same two
    regions (not ITC), and a detection at the tumour hits."""
    cfg = FrocConfig(mask_downsample=32)
    from_json = load_truth(camelyon / "Tumor_001.json", slide_mpp=0.243, config=cfg)
    from_png = load_truth(camelyon / "tumor_001_level5_tumor_mask.png", slide_mpp=0.243,
                          config=cfg)
    assert from_json.n_tumours == from_png.n_tumours == 2 and from_json.n_itc == 0
    np.testing.assert_allclose(sorted(from_json.major_axis_um), sorted(from_png.major_axis_um),
                               rtol=0.05)
    centre = np.array([[3927 * 32 + 16, 2226 * 32 + 16], [10000.0, 10000.0]])
    assert from_json.region_at(centre)[0] > 0 and from_json.region_at(centre)[1] == 0
    assert from_png.region_at(centre)[0] > 0
    # a pyramidal TIFF mask (as the CAMELYON16 masks): the level nearest eval_mpp is read
    import tifffile
    from PIL import Image

    m = (np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0)
    m = m.astype(np.uint8)
    tif = tmp_path / "tumor_001_mask.tif"
    with tifffile.TiffWriter(tif) as tw:
        tw.write(m, subifds=1, tile=(256, 256), compression="zlib")
        tw.write(m[::2, ::2], subfiletype=1, tile=(256, 256), compression="zlib")
    shape0 = (m.shape[0] * 32, m.shape[1] * 32)
    from_tif = load_truth(tif, slide_mpp=0.243, slide_shape=shape0,
                          config=FrocConfig(eval_mpp=16.0))
    assert from_tif.frame.downsample == pytest.approx(64) and from_tif.n_tumours == 2
    assert from_tif.region_at(centre)[0] > 0
    # the same polygons drawn on the level-5 slide (scale 1/32, 7.776 µm/px)
    lvl5 = load_truth(camelyon / "Tumor_001.json", slide_mpp=7.776,
                      config=FrocConfig(truth_scale=1 / 32))
    assert lvl5.n_tumours == 2 and lvl5.region_at(np.array([[3927.0, 2226.0]]))[0] > 0


def test_empty_annotations_are_negatives_and_missing_mpp_is_explained(tmp_path):
    (tmp_path / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (tmp_path / "b.json").write_text('{"positive": [], "negative": []}')
    (tmp_path / "c.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    for n in ("a.geojson", "b.json", "c.xml"):
        assert load_truth(tmp_path / n, slide_mpp=0.25) is None
    mask = np.zeros((10, 10), np.uint8)
    assert load_truth((mask, FRAME)) is None
    mask[2:5, 2:5] = 1
    with pytest.raises(InputError, match="µm/px"):
        load_truth((mask, SlideFrame(downsample=4)))
    with pytest.raises(InputError, match="no such"):
        load_truth(tmp_path / "missing.xml")


def test_prediction_files_and_names(tmp_path):
    # CAMELYON16 submission CSV (p, x, y) and a headed CSV
    (tmp_path / "Test_001.csv").write_text("0.9,100,200\n0.4,300,50\n")
    (tmp_path / "test_002_lesions.csv").write_text("probability,x,y\n0.7,10,20\n")
    (tmp_path / "scores.csv").write_text("slide,score\nTest_001.tif,0.95\n")
    preds, skipped = find_predictions(tmp_path)
    assert set(preds) == {"test_001", "test_002"} and not skipped
    np.testing.assert_allclose(preds["test_001"].coords, [[200, 100], [50, 300]])
    np.testing.assert_allclose(preds["test_001"].probability, [0.9, 0.4])
    assert preds["test_001"].score == pytest.approx(0.95) and preds["test_002"].score is None
    assert slide_key("tumor_001_level5.ome.tif") == "tumor_001_level5"
    assert slide_key("Tumor_001_Mask.tif", ("_mask",)) == "tumor_001"
    neg = tmp_path / "reference.csv"
    neg.write_text("Test_001,Tumor,Macro\nTest_002,Normal\n# comment\n")
    assert read_negatives(neg) == {"test_002"}
    assert read_negatives("a.tif, B") == {"a", "b"}


def test_connected_component_lesions(tmp_path):
    """Threshold, 8-connected components, max / mean probability, weighted centroid."""
    p = np.zeros((8, 10), np.float32)
    p[1, 1], p[1, 2], p[2, 3] = 0.6, 0.8, 0.7     # one component (diagonal link)
    p[6, 7], p[6, 8] = 0.9, 0.9                    # a second one
    p[4, 5] = 0.5                                  # not above the threshold
    comp = component_cells(p, threshold=0.5)
    np.testing.assert_allclose(comp["probability"], [0.9, 0.8])
    np.testing.assert_allclose(comp["mean"], [0.9, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(comp["n_cells"], [2, 3])
    np.testing.assert_allclose(comp["centroid"][0], [6.0, 7.5])
    w = np.array([0.6, 0.8, 0.7])
    np.testing.assert_allclose(comp["centroid"][1], [(w * [1, 1, 2]).sum() / w.sum(),
                                                     (w * [1, 2, 3]).sum() / w.sum()])
    np.testing.assert_array_equal(comp["peak"], [[6, 7], [1, 2]])
    four = component_cells(p, threshold=0.5, connectivity=1)
    assert len(four["probability"]) == 3  # the diagonal cell is alone
    by_mean = component_cells(p, threshold=0.5, value="mean")
    np.testing.assert_allclose(by_mean["probability"], [0.9, 0.7], rtol=1e-6)
    frame = SlideFrame(downsample=64.0, origin=(32.0, 32.0), slide_mpp=0.25, slide="s")
    les = find_lesions(p, frame, threshold=0.5, method="components")
    assert les.method == "components" and len(les) == 2
    np.testing.assert_allclose(les.coords[0], [32 + 6 * 64 + 31.5, 32 + 7.5 * 64 + 31.5])
    nms = find_lesions(p, frame, threshold=0.5, radius_um=20.0)  # 80 px: < 2 cells
    assert nms.method == "nms" and len(nms) == 3
    gj = lesions_geojson(les)
    assert gj["properties"]["method"] == "components"
    assert gj["features"][1]["properties"]["measurements"]["n_cells"] == 3
    path = write_lesions_geojson(tmp_path / "c.geojson", les)
    pts, probs = read_lesions_geojson(path)
    np.testing.assert_allclose(pts, les.coords)
    np.testing.assert_allclose(probs, [0.9, 0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="lesion method"):
        find_lesions(p, frame, method="watershed")


def test_truth_that_is_not_a_mask_or_not_in_the_frame_is_refused(camelyon, tmp_path):
    """An RGB thumbnail, a grey picture, a float image are not masks; level-0 polygons
    against a low-resolution slide are in another frame (refused, not FROC 0)."""
    from PIL import Image

    from napari_lnmeta.errors import InputError

    rgb = tmp_path / "a_mask.png"
    thumb = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png").convert("RGB"))
    thumb = thumb.copy()
    thumb[..., 1] //= 2  # colour
    Image.fromarray(thumb).save(rgb)
    with pytest.raises(InputError, match="colour"):
        load_truth(rgb, slide_mpp=7.776, slide_shape=(7168, 3072))
    grey = tmp_path / "b_mask.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (64, 1))).save(grey)
    with pytest.raises(InputError, match="grey levels"):
        load_truth(grey, slide_mpp=7.776, slide_shape=(64 * 32, 256 * 32))
    with pytest.raises(InputError, match="share a frame"):
        load_truth(camelyon / "Tumor_001.json", slide_mpp=7.776, slide_shape=(7168, 3072))
    ok = load_truth(camelyon / "Tumor_001.json", slide_mpp=7.776, slide_shape=(7168, 3072),
                    config=FrocConfig(truth_scale=1 / 32))
    assert ok.n_tumours == 2
    # an RGB mask whose channels are equal (a mask saved as RGB) is still a mask
    same = tmp_path / "c_mask.png"
    m = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png"))
    Image.fromarray(np.stack([m] * 3, axis=-1)).save(same)
    assert load_truth(same, slide_mpp=7.776, slide_shape=(7168, 3072)).n_tumours == 2


@pytest.mark.parametrize("text", [b"p,x,y\n0.5,10,nan\n", b"0.5,10,inf\n", b"\xff\xfe\x00bin",
                                  b"probability,x,y\n0.5,10\n"])
def test_detection_csvs_with_non_finite_or_binary_content_are_refused(tmp_path, text):
    from napari_lnmeta.core.froc.folders import _read_point_csv

    p = tmp_path / "slide.csv"
    p.write_bytes(text)
    with pytest.raises(InputError) as e:
        _read_point_csv(p)
    assert str(p) in str(e.value)
