"""Metrics against scikit-learn, and DeLong's test against a worked example derived by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from napari_lnmeta.core.metrics import (
    auc_bootstrap_ci,
    binary_metrics,
    confusion_matrix,
    delong_ci,
    delong_cov,
    delong_test,
    evaluate_binary,
    format_table,
    multiclass_metrics,
    plot_roc,
    roc_auc,
    roc_curve,
    summary_table,
    wilson_ci,
)
from napari_lnmeta.errors import InputError


@pytest.fixture
def scored():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.random(400) * 0.8 + 0.35 * y, 2)  # rounded: many ties
    return y, s


def test_binary_metrics_equal_sklearn(scored):
    y, s = scored
    m = binary_metrics(y, s, threshold=0.5)
    p = (s >= 0.5).astype(int)
    assert m["ACC"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["SEN"] == pytest.approx(skm.recall_score(y, p))
    assert m["SPE"] == pytest.approx(skm.recall_score(y, p, pos_label=0))
    assert m["PPV"] == pytest.approx(skm.precision_score(y, p))
    assert m["NPV"] == pytest.approx(skm.precision_score(y, p, pos_label=0))
    assert m["F1"] == pytest.approx(skm.f1_score(y, p))
    assert m["F1_weighted"] == pytest.approx(skm.f1_score(y, p, average="weighted"))
    assert m["AUC"] == pytest.approx(skm.roc_auc_score(y, s))
    np.testing.assert_array_equal(confusion_matrix(y, p), skm.confusion_matrix(y, p))


def test_roc_curve_equals_sklearn(scored):
    y, s = scored
    fpr, tpr, thr = roc_curve(y, s)
    f2, t2, th2 = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])
    assert roc_auc(y, s) == pytest.approx(skm.auc(f2, t2))


def test_multiclass_equals_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    proba = rng.dirichlet([1, 1, 1], 300) + np.eye(3)[y] * 0.3
    proba /= proba.sum(1, keepdims=True)
    m = multiclass_metrics(y, proba, classes=["negative", "breast metastasis", "lymphoma"])
    p = proba.argmax(1)
    assert m["ACC"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["F1_weighted"] == pytest.approx(skm.f1_score(y, p, average="weighted"))
    assert m["F1_macro"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    rec = skm.recall_score(y, p, average=None)
    prec = skm.precision_score(y, p, average=None)
    for k, row in enumerate(m["per_class"]):
        assert row["recall"] == pytest.approx(rec[k])
        assert row["precision"] == pytest.approx(prec[k])
    ovr = skm.roc_auc_score(y, proba, multi_class="ovr", average=None)
    np.testing.assert_allclose(list(m["AUC_ovr"].values()), ovr)
    np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(y, p))


def test_undefined_ratios_are_nan_and_bad_labels_rejected():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.9])
    assert math.isnan(m["SEN"]) and math.isnan(m["AUC"])
    assert m["SPE"] == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="0/1"):
        binary_metrics([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="shape"):
        binary_metrics([0, 1, 1], [0.1, 0.2])


# A worked example for DeLong's test, derived by hand (no published value was available
# offline). Six cases scored by two models A and B; psi(x, y) = 1 if x > y, 1/2 if equal.
#
#   positives  p1 (A .9, B .6)   p2 (A .8, B .9)   p3 (A .4, B .3)
#   negatives  n1 (A .7, B .5)   n2 (A .4, B .2)   n3 (A .2, B .8)
#
# Placements of the positives (V10) and negatives (V01):
#   A: V10 = [1, 1, 1/2]    V01 = [2/3, 5/6, 1]   AUC_A = 5/6
#   B: V10 = [2/3, 1, 1/3]  V01 = [2/3, 1, 1/3]   AUC_B = 2/3
# Sample covariances (ddof = 1, m = n = 3):
#   S10 = [[1/12, 1/12], [1/12, 1/9]]     S01 = [[1/36, -1/36], [-1/36, 1/9]]
#   S = S10/3 + S01/3 = [[1/27, 1/54], [1/54, 2/27]]
#   Var(A - B) = 1/27 + 2/27 - 2/54 = 2/27;  z = (1/6) / sqrt(2/27) = sqrt(13.5)/6
HAND_Y = np.array([1, 1, 1, 0, 0, 0])
HAND_A = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.2])
HAND_B = np.array([0.6, 0.9, 0.3, 0.5, 0.2, 0.8])


def test_delong_matches_hand_worked_example():
    aucs, cov = delong_cov(HAND_Y, np.vstack([HAND_A, HAND_B]))
    np.testing.assert_allclose(aucs, [5 / 6, 2 / 3])
    np.testing.assert_allclose(cov, [[1 / 27, 1 / 54], [1 / 54, 2 / 27]], atol=1e-12)
    r = delong_test(HAND_Y, HAND_A, HAND_B)
    assert r.diff == pytest.approx(1 / 6)
    assert r.se == pytest.approx(math.sqrt(2 / 27))
    assert r.z == pytest.approx(math.sqrt(13.5) / 6)       # 0.61237...
    assert r.p == pytest.approx(0.540291, abs=1e-5)         # 2 * (1 - Phi(0.61237))
    auc, lo, hi = delong_ci(HAND_Y, HAND_A)
    assert auc == pytest.approx(5 / 6)
    assert hi - auc == pytest.approx(min(1 - auc, 1.959964 * math.sqrt(1 / 27)), abs=1e-6)


def test_delong_equals_brute_force_structural_components(scored):
    y, s1 = scored
    s2 = np.round(s1 + np.random.default_rng(1).normal(0, 0.2, len(y)), 1)
    pos, neg = y == 1, y == 0

    def comps(s):
        psi = (s[pos][:, None] > s[neg][None]) + 0.5 * (s[pos][:, None] == s[neg][None])
        return psi.mean(1), psi.mean(0), psi.mean()

    a10, a01, auc_a = comps(s1)
    b10, b01, auc_b = comps(s2)
    var = (np.var(a10 - b10, ddof=1) / pos.sum() + np.var(a01 - b01, ddof=1) / neg.sum())
    r = delong_test(y, s1, s2)
    assert r.auc1 == pytest.approx(auc_a) and r.auc2 == pytest.approx(auc_b)
    assert r.se ** 2 == pytest.approx(var)
    same = delong_test(y, s1, s1)
    assert same.z == 0 and same.p == 1


def test_bootstrap_ci_brackets_auc_and_is_reproducible(scored):
    y, s = scored
    auc, lo, hi = auc_bootstrap_ci(y, s, n_boot=300, seed=0)
    assert lo < auc < hi and hi - lo < 0.15
    assert auc_bootstrap_ci(y, s, n_boot=300, seed=0) == (auc, lo, hi)
    # ~ as wide as DeLong's analytic interval
    _, dlo, dhi = delong_ci(y, s)
    assert abs((hi - lo) - (dhi - dlo)) < 0.03
    lo_w, hi_w = wilson_ci(45, 50)
    assert lo_w < 0.9 < hi_w
    ev = evaluate_binary(y, s, n_boot=200)
    assert ev["AUC_CI"][0] < ev["AUC"] < ev["AUC_CI"][1]
    assert ev["confusion"] == [[ev["TN"], ev["FP"]], [ev["FN"], ev["TP"]]]


def test_per_slide_tables_mean_sd():
    rows = [{"model": "A", "slide": "s1", "ACC": 0.9, "AUC": 0.95},
            {"model": "A", "slide": "s2", "ACC": 0.7, "AUC": 0.85},
            {"model": "B", "slide": "s1", "ACC": 0.8, "AUC": float("nan")},
            {"model": "B", "slide": "s2", "ACC": 0.6, "AUC": 0.75}]
    by_model = {r["model"]: r for r in summary_table(rows, by="model", metrics=("ACC", "AUC"))}
    assert by_model["A"]["ACC_mean"] == pytest.approx(0.8)
    assert by_model["A"]["ACC_sd"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert by_model["B"]["AUC_mean"] == pytest.approx(0.75)  # nan ignored
    assert math.isnan(by_model["B"]["AUC_sd"])
    by_slide = {r["slide"]: r for r in summary_table(rows, by="slide", metrics=("ACC",))}
    assert by_slide["s1"]["ACC_mean"] == pytest.approx(0.85)
    md = format_table(summary_table(rows, by="model", metrics=("ACC", "AUC")), by="model",
                      metrics=("ACC", "AUC"))
    assert "| A | 2 | 0.800 ± 0.141 | 0.900 ± 0.071 |" in md


def test_roc_png(tmp_path, scored):
    y, s = scored
    p = plot_roc({"model A": (y, s), "noise": (y, np.random.default_rng(0).random(len(y)))},
                 tmp_path / "roc.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
