"""``lnmeta evaluate-slides`` against a restatement of the CAMELYON16 evaluation code.

The reference below restates, step by step, what the challenge's ``Evaluation_FROC.py``
does (it is not the challenge's code):

* evaluation mask: a level-5 mask (tumour = 255) at 0.243 µm/px level 0; a pixel belongs
  to tumour when its Euclidean distance to a 255 pixel is below 75 / (0.243 * 2**5 * 2)
  pixels (37.5 µm); holes filled; labelled with 8-connectivity;
* ITC labels: regions whose major axis (regionprops) is below 275 / (0.243 * 2**5) px;
* per slide: every detection ``(p, x, y)`` (level-0 integers) is looked up at
  ``mask[int(y / 32), int(x / 32)]``; label 0 → a false positive (its probability kept
  as a Python float); an ITC label → ignored; another label → the label's float32
  score becomes ``p`` if ``p`` is greater. A slide that is not a tumour slide has every
  detection as a false positive and no labels;
* the curve: ``sorted(set(all FP probabilities + all label scores))`` without its first
  (lowest) entry; at each threshold the FPs ``>= t`` and label scores ``>= t`` are
  counted (NumPy comparisons of the float64 FP array and the float32 score array),
  divided by the number of slides and by the number of non-ITC labels; a final (0, 0);
* the read-out: ``numpy.interp`` at 1/4, 1/2, 1, 2, 4, 8 FPs per slide on the reversed
  curve; the score is their mean.

Every case is a multi-slide set written as files (PNG level-5 masks, ``p,x,y`` CSVs)
and evaluated by ``lnmeta evaluate-slides`` through the CLI's ``main``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lnmeta.cli import main

L0_MPP = 0.243
LEVEL = 5
DS = 2 ** LEVEL
SIZE = 96  # level-5 mask side (pixels)
RATES = (0.25, 0.5, 1, 2, 4, 8)


# --------------------------------------------------------------------------------------
# The reference, restated
# --------------------------------------------------------------------------------------
def ref_evaluation_mask(mask255: np.ndarray) -> np.ndarray:
    from scipy import ndimage
    from skimage import measure

    dist = ndimage.distance_transform_edt(255 - mask255.astype(np.int64))
    limit = 75 / (L0_MPP * DS * 2)
    grown = ndimage.binary_fill_holes(dist < limit)
    return measure.label(grown, connectivity=2)


def ref_itc_labels(labels: np.ndarray) -> list[int]:
    from skimage import measure

    limit = 275 / (L0_MPP * DS)
    props = measure.regionprops(labels)
    return [pr.label for pr in props if pr.axis_major_length < limit]


def ref_slide(dets, labels: np.ndarray | None):
    """(FP probabilities as Python floats, float32 label scores, lesions counted)."""
    if labels is None:
        return [float(p) for p, _, _ in dets], np.zeros(0, np.float32), 0
    itc = set(ref_itc_labels(labels))
    n_labels = int(labels.max())
    scores = np.zeros(n_labels, dtype=np.float32)
    fps = []
    for p, x, y in dets:
        hit = int(labels[int(y / DS), int(x / DS)])
        if hit == 0:
            fps.append(float(p))
        elif hit not in itc and p > scores[hit - 1]:
            scores[hit - 1] = p
    return fps, scores, n_labels - len(itc)


def ref_froc(slides):
    """slides: list of (detections, labels or None) -> (six sensitivities, score)."""
    fp_all, tp_all, n_lesions = [], [], 0
    for dets, labels in slides:
        fps, scores, n = ref_slide(dets, labels)
        fp_all += fps
        tp_all += list(scores)
        n_lesions += n
    fp_arr, tp_arr = np.asarray(fp_all, dtype=np.float64), np.asarray(tp_all, dtype=np.float32)
    fp_counts, tp_counts = [], []
    for t in sorted(set(fp_all + tp_all))[1:]:
        fp_counts.append(int((fp_arr >= t).sum()))
        tp_counts.append(int((tp_arr >= t).sum()))
    fp_counts.append(0)
    tp_counts.append(0)
    fps_per_slide = np.asarray(fp_counts) / float(len(slides))
    sens = np.asarray(tp_counts) / float(n_lesions)
    at = np.interp(RATES, fps_per_slide[::-1], sens[::-1])
    return at, float(np.mean(at))


# --------------------------------------------------------------------------------------
# Hand-made slides
# --------------------------------------------------------------------------------------
def blank() -> np.ndarray:
    return np.zeros((SIZE, SIZE), np.uint8)


def box(m, r0, c0, h, w=None):
    m[r0:r0 + h, c0:c0 + (h if w is None else w)] = 255
    return m


def at(r5: int, c5: int, p: float, dr: int = 7, dc: int = 19):
    """A detection in level-5 pixel (r5, c5): (p, x, y) in level-0 integers."""
    return (p, c5 * DS + dc, r5 * DS + dr)


def ring(m, r0, c0, outer, inner):
    box(m, r0, c0, outer)
    o = (outer - inner) // 2
    m[r0 + o:r0 + o + inner, c0 + o:c0 + o + inner] = 0
    return m


def _random_set(seed: int):
    rng = np.random.default_rng(seed)
    slides = []
    for k in range(4):
        if k == 3:
            slides.append((f"normal_r{seed}", None,
                           [at(*rng.integers(2, SIZE - 2, 2), round(float(rng.random()), 2))
                            for _ in range(int(rng.integers(0, 5)))]))
            continue
        m = blank()
        for _ in range(int(rng.integers(1, 5))):
            r, c = rng.integers(8, SIZE - 40, 2)
            box(m, int(r), int(c), int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        dets = [at(*rng.integers(0, SIZE, 2), round(float(rng.random()), 2))
                for _ in range(int(rng.integers(2, 14)))]
        # a few aimed at tumour
        ys, xs = np.nonzero(m)
        for i in rng.integers(0, len(ys), 3):
            dets.append(at(int(ys[i]), int(xs[i]), round(float(rng.random()), 2)))
        slides.append((f"tumor_r{seed}_{k}", m, dets))
    return slides


def cases():
    out = {}
    # the docs' example: a hit, a duplicate, a missed lesion, ITC hit and missed, FPs
    m = box(box(box(box(blank(), 10, 10, 30), 55, 55, 22), 10, 75, 2), 85, 10, 2)
    out["docs_example"] = [
        ("tumor_a", m, [at(25, 25, 0.9), at(15, 15, 0.6), at(11, 76, 0.8), at(50, 88, 0.7)]),
        ("normal_a", None, [at(5, 5, 0.5), at(40, 40, 0.95)])]
    # two blobs 6 px (47 µm) apart merge after the 75 µm dilation; two 14 px apart do not
    m = box(box(blank(), 10, 10, 25), 10, 41, 25)
    m = box(box(m, 55, 10, 25), 55, 49, 25)
    out["merge_after_dilation"] = [
        ("tumor_m", m, [at(20, 20, 0.8), at(20, 50, 0.9), at(60, 20, 0.7), at(60, 55, 0.4),
                        at(45, 45, 0.3)]),
        ("normal_m", None, [at(3, 3, 0.35)])]
    # squares either side of the 275 µm (35.4 px) dilated major axis
    m = blank()
    for i, side in enumerate((19, 20, 21, 22, 23, 24)):
        r, c = 8 + (i // 3) * 40, 6 + (i % 3) * 30
        box(m, r, c, side, 12)
    out["itc_either_side"] = [
        ("tumor_i", m, [at(10 + (i // 3) * 40, 8 + (i % 3) * 30, 0.3 + 0.1 * i)
                        for i in range(6)] + [at(90, 90, 0.55)]),
        ("normal_i", None, [])]
    # many detections in one lesion (duplicates) and equal probabilities
    m = box(box(blank(), 20, 20, 30), 60, 60, 25)
    out["duplicates"] = [
        ("tumor_d", m, [at(25, 25, 0.5), at(30, 30, 0.7), at(35, 35, 0.7), at(40, 40, 0.2),
                        at(65, 65, 0.6), at(70, 70, 0.65), at(5, 90, 0.7), at(90, 5, 0.1)]),
        ("normal_d", None, [at(10, 10, 0.7), at(20, 80, 0.65)])]
    # only ITC hits, FPs elsewhere; a second slide with one real lesion
    m = box(box(blank(), 20, 20, 3), 60, 60, 4)
    m2 = box(blank(), 30, 30, 28)
    out["hits_in_itc"] = [
        ("tumor_h1", m, [at(21, 21, 0.99), at(61, 61, 0.98), at(80, 10, 0.4)]),
        ("tumor_h2", m2, [at(40, 40, 0.45), at(5, 5, 0.6)])]
    # normal slides with and without detections, one lesion slide
    m = box(blank(), 40, 40, 26)
    out["normals"] = [
        ("tumor_n", m, [at(45, 45, 0.8), at(10, 80, 0.3)]),
        ("normal_n1", None, []), ("normal_n2", None, [at(5, 5, 0.9)]),
        ("normal_n3", None, [at(7, 7, 0.2), at(70, 70, 0.85), at(80, 20, 0.6)]),
        ("normal_n4", None, [])]
    # every lesion hit, no ITC: the lowest detection's threshold is dropped
    m = box(box(blank(), 10, 10, 30), 55, 55, 30)
    out["all_hit"] = [
        ("tumor_all", m, [at(20, 20, 0.9), at(60, 60, 0.3)]),
        ("normal_all", None, [at(5, 90, 0.5), at(90, 5, 0.2)])]
    out["all_hit_lowest_is_fp"] = [
        ("tumor_all2", m, [at(20, 20, 0.9), at(60, 60, 0.4), at(5, 90, 0.1)])]
    # a lesion and a false positive at the same probability: 0.6 is not exact in float32
    m = box(box(blank(), 10, 10, 30), 55, 55, 30)
    out["tie_tp_fp"] = [
        ("tumor_t", m, [at(20, 20, 0.6), at(60, 60, 0.8), at(5, 90, 0.6), at(90, 5, 0.3)]),
        ("normal_t", None, [at(40, 40, 0.6), at(45, 10, 0.7)])]
    # exact in float32 (0.5, 0.75): no split
    out["tie_exact"] = [
        ("tumor_e", m, [at(20, 20, 0.5), at(60, 60, 0.75), at(5, 90, 0.5), at(90, 5, 0.75)])]
    # a hole is filled (a detection in the hole hits); lesions touching the slide edge
    m = ring(blank(), 20, 20, 40, 24)
    box(m, 0, 70, 24, 4)  # at the top edge: an ITC only because it cannot grow past it
    box(m, 80, 0, 16, 20)  # at the bottom-left corner
    out["hole_and_edges"] = [
        ("tumor_edge", m, [at(40, 40, 0.7), at(2, 75, 0.3), at(94, 1, 0.65), at(60, 90, 0.5)]),
        ("normal_edge", None, [at(50, 50, 0.45)])]
    # a slide with lesions and no detections at all
    m = box(box(blank(), 10, 10, 30), 55, 55, 30)
    out["missed_everything"] = [
        ("tumor_x", m, []), ("tumor_y", box(blank(), 30, 30, 26), [at(35, 35, 0.9)]),
        ("normal_x", None, [at(3, 3, 0.8), at(6, 6, 0.1)])]
    for seed in (1, 2, 3):
        out[f"random_{seed}"] = _random_set(seed)
    return out


CASES = cases()


def test_cases_cover_the_rules():
    """The hand-made slides exercise what they claim (checked with the reference)."""
    def labels_of(case, name):
        m = next(mm for n, mm, _ in CASES[case] if n == name)
        return ref_evaluation_mask(m)

    lab = labels_of("merge_after_dilation", "tumor_m")
    assert lab.max() == 3  # the first pair merged, the second did not
    lab = labels_of("itc_either_side", "tumor_i")
    itc = ref_itc_labels(lab)
    assert lab.max() == 6 and 0 < len(itc) < 6  # ITCs on both sides of 275 µm
    lab = labels_of("hole_and_edges", "tumor_edge")
    assert lab[40, 40] > 0
    at_ = ref_froc([(d, None if m is None else ref_evaluation_mask(m))
                    for _, m, d in CASES["tie_tp_fp"]])
    assert at_[1] > 0


def _write_case(root, slides):
    from PIL import Image

    pred, truth = root / "pred", root / "truth"
    pred.mkdir(parents=True)
    truth.mkdir()
    normals = []
    for name, m, dets in slides:
        (pred / f"{name}.csv").write_text("".join(f"{p!r},{x},{y}\n" for p, x, y in dets))
        if m is None:
            normals.append(name)
        else:
            Image.fromarray(m).save(truth / f"{name}_mask.png")
    return pred, truth, normals


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluate_slides_equals_the_reference(name, tmp_path, capsys):
    slides = CASES[name]
    want_at, want_score = ref_froc([(d, None if m is None else ref_evaluation_mask(m))
                                    for _, m, d in slides])
    pred, truth, normals = _write_case(tmp_path, slides)
    argv = [str(pred), str(truth), "-o", str(tmp_path / "report"), "--mpp", str(L0_MPP),
            "--mask-downsample", str(DS), "--n-boot", "20"]
    if normals:
        argv += ["--negatives", ",".join(normals)]
    assert main(["evaluate-slides", *argv]) == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["evaluated"] == len(slides), rep["skipped"]
    got = rep["froc"]
    np.testing.assert_allclose(got["sensitivity"], want_at, rtol=0, atol=1e-9)
    assert abs(got["score"] - want_score) <= 1e-9
