"""Derived maps, slide score, NMS lesions and patch-level metrics (pure numpy, fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lnmeta.core.evaluation import PatchBoxes, evaluate_heatmap, truth_fractions
from napari_lnmeta.core.heatmap import (
    BINARY_COLORS,
    TIER_COLORS,
    binary_map,
    slide_score,
    tier_map,
    to_storage,
)
from napari_lnmeta.core.lesions import (
    find_lesions,
    nms_cells,
    read_lesions_geojson,
    write_lesions_geojson,
)
from napari_lnmeta.io.frame import SlideFrame


def test_seed000_maps_thresholds_and_colours():
    p = np.array([[0.0, 0.5, 0.5001, 0.7], [0.7001, 0.9, 0.9001, 1.0]], np.float32)
    np.testing.assert_array_equal(binary_map(p), [[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(tier_map(p), [[0, 0, 1, 1], [2, 2, 3, 3]])
    assert TIER_COLORS == {1: (0, 0, 255, 255), 2: (0, 255, 0, 255), 3: (255, 0, 0, 255)}
    assert BINARY_COLORS == {1: (255, 0, 0, 255)}
    # the tiers partition the binary map
    rng = np.random.default_rng(0)
    q = rng.random((50, 60)).astype(np.float32)
    assert ((tier_map(q) > 0) == (binary_map(q) > 0)).all()
    assert np.abs(to_storage(q, "uint8") / 255 - q).max() <= 0.5 / 255 + 1e-7


def test_slide_score_max_and_top_k():
    p = np.zeros((4, 5), np.float32)
    p[1, 2], p[3, 4], p[0, 0] = 0.9, 0.8, 0.99
    scored = np.ones_like(p, bool)
    scored[0, 0] = False  # not analysed: ignored
    s = slide_score(p, scored, top_k=2)
    assert s["max"] == pytest.approx(0.9) and s["argmax"] == [1, 2]
    assert s["top_k_mean"] == pytest.approx(0.85)
    assert slide_score(p, np.zeros_like(scored))["max"] is None


def _nms_seed004(prob, threshold, radius):
    """Seed 004 literally: take the maximum, zero its neighbourhood, repeat."""
    p = prob.copy()
    yy, xx = np.mgrid[:p.shape[0], :p.shape[1]]
    out = []
    while (p > threshold).any():
        i, j = np.unravel_index(np.argmax(p), p.shape)
        out.append((i, j, prob[i, j]))
        p[(yy - i) ** 2 + (xx - j) ** 2 <= radius ** 2] = 0
    return out


@pytest.mark.parametrize("radius", [0.5, 2.0, 3.7])
def test_nms_equals_the_iterative_algorithm(radius):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(int(radius * 10))
    prob = ndi.gaussian_filter(rng.random((40, 50)), 2)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    cells, vals = nms_cells(prob, threshold=0.5, radius_cells=radius)
    ref = _nms_seed004(prob, 0.5, radius)
    assert [tuple(c) for c in cells] == [(i, j) for i, j, _ in ref]
    np.testing.assert_allclose(vals, [v for *_, v in ref], rtol=1e-6)


def test_lesions_in_level0_and_geojson_round_trip(tmp_path):
    frame = SlideFrame(downsample=64.0, origin=(32.0, 32.0), slide_mpp=0.25, slide="s.svs")
    prob = np.zeros((10, 10), np.float32)
    prob[2, 3], prob[2, 4], prob[8, 8] = 0.95, 0.9, 0.7
    les = find_lesions(prob, frame, threshold=0.5, radius_um=20.0)  # 80 px: neighbours merge
    assert len(les) == 2 and les.radius_px == pytest.approx(80.0)
    np.testing.assert_allclose(les.coords[0], [32 + 2 * 64 + 31.5, 32 + 3 * 64 + 31.5])
    path = write_lesions_geojson(tmp_path / "l.geojson", les)
    gj = json.loads(path.read_text())
    f0 = gj["features"][0]
    assert f0["geometry"] == {"type": "Point", "coordinates": [les.coords[0][1], les.coords[0][0]]}
    assert f0["properties"]["classification"]["name"] == "Tumor"
    assert f0["properties"]["measurements"]["probability"] == pytest.approx(0.95)
    pts, probs = read_lesions_geojson(path)
    np.testing.assert_allclose(pts, les.coords)
    np.testing.assert_allclose(probs, les.probability)


def test_evaluation_labels_patches_with_the_seed000_rule():
    """> 20 % tumour: positive; 0 %: negative; in between: left out; p > 0.5 predicts."""
    truth = np.zeros((40, 40), bool)
    truth[0:10, 0:10] = True     # patch (0, 0): 100 %
    truth[10:13, 10:20] = True   # patch (1, 1): 30 %
    truth[20:21, 20:30] = True   # patch (2, 2): 10 % (ambiguous)
    cells = np.array([(i, j) for i in range(4) for j in range(4)])
    boxes = PatchBoxes(coords=cells * 10.0, size0=10.0, cells=cells, slide_shape=(40, 40))
    prob = np.full((4, 4), 0.1)
    prob[0, 0], prob[1, 1], prob[3, 3] = 0.9, 0.4, 0.6
    ev = evaluate_heatmap(prob, boxes, (truth, SlideFrame()))
    assert (ev["n_positive"], ev["n_negative"], ev["n_ambiguous"]) == (2, 13, 1)
    assert (ev["TP"], ev["FN"], ev["FP"], ev["TN"]) == (1, 1, 1, 12)
    assert ev["SEN"] == 0.5 and ev["SPE"] == pytest.approx(12 / 13)
    assert ev["AUC"] == pytest.approx((13 + 12) / 26)  # 0.9 beats all; 0.4 beats 12 of 13
    json.dumps(ev)  # plain JSON (no NaN)


def test_camelyon_polygons_match_the_rasterised_mask(camelyon):
    """Truth from Tumor_001.json (level-0 polygons) agrees with the level-5 mask PNG."""
    from PIL import Image

    mask = np.asarray(Image.open(camelyon / "tumor_001_level5_tumor_mask.png")) > 0
    shape0 = (mask.shape[0] * 32, mask.shape[1] * 32)
    size0 = 2048.0
    ys = np.arange(122608 - 4096, 134592 + 4096, size0)
    xs = np.arange(69914 - 4096, 73235 + 4096, size0)
    coords = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    boxes = PatchBoxes(coords=coords, size0=size0, cells=np.zeros((len(coords), 2), int),
                       slide_shape=shape0)
    from_json = truth_fractions(camelyon / "Tumor_001.json", boxes)
    from_png = truth_fractions((mask, SlideFrame(downsample=32.0)), boxes)
    assert from_json.max() > 0.5 and (from_json > 0.2).sum() >= 5
    np.testing.assert_allclose(from_json, from_png, atol=0.05)
    assert ((from_json > 0.2) == (from_png > 0.2)).mean() > 0.95


def _reference_overview_blend(thumb, lab, edge, alpha=0.5):
    """The overview's blending restated on the whole image in float (every pixel)."""
    from napari_lnmeta.core.heatmap import TIER_COLORS

    rgb = thumb.astype(np.float32)
    lut = np.zeros((256, 3), np.float32)
    for k, c in TIER_COLORS.items():
        lut[k] = c[:3]
    on = lab > 0
    rgb[on] = (1 - alpha) * rgb[on] + alpha * lut[lab[on]]
    rgb[edge] = 0.5 * rgb[edge] + 0.5 * np.array([90, 90, 90], np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overview_blends_exactly_like_the_whole_image_float_blend(cmu1, seed):
    from napari_lnmeta.core.heatmap import _erode, cell_index_map, overview_image
    from napari_lnmeta.io.slide import open_slide

    slide = open_slide(cmu1)
    rng = np.random.default_rng(seed)
    frame = SlideFrame(origin=(float(rng.integers(-50, 50)), float(rng.integers(-50, 50))),
                       downsample=float(rng.choice([96, 192, 250])))
    shape = (int(slide.shape[0] // frame.downsample) + 1, int(slide.shape[1] // frame.downsample))
    tiers = rng.integers(0, 4, shape).astype(np.uint8)
    scored = rng.random(shape) < 0.7
    img = overview_image(slide, tiers, frame, max_size=700, scored=scored)
    from PIL import Image

    from napari_lnmeta.core.tissue import low_res

    thumb, _ = low_res(slide, max(slide.shape) / 700 * slide.mpp, max_size=700)
    pil = Image.fromarray(thumb)
    if max(pil.size) > 700:
        pil.thumbnail((700, 700), Image.BILINEAR)
    thumb = np.asarray(pil.convert("RGB"))
    th, tw = thumb.shape[:2]
    ri, ci, rok, cok = cell_index_map(frame, tiers.shape, (th, tw),
                                      (slide.shape[0] / th, slide.shape[1] / tw))
    inside = rok[:, None] & cok[None, :]
    lab = np.where(inside, tiers[ri[:, None], ci[None, :]], 0)
    sc = scored[ri[:, None], ci[None, :]] & inside
    want = _reference_overview_blend(thumb, lab, sc ^ _erode(sc))
    assert img.shape == want.shape
    assert np.array_equal(img, want)
    assert not np.array_equal(img, thumb)  # something was drawn
