"""MIL bags and training, on bags of real CAMELYON16 tissue patches.

The benchmark (see ``tests/_mil_helpers.py``): 16-patch bags of real tumor_001 patches,
positive when they hold 1-6 tumour patches (expert polygons), features from a randomly
initialised ``lnmeta_cnn_small``, trained on the upper part of the slide and tested on
the lower part (hold-out by region). Attention must find the tumour patches inside the
test's positive bags (instance AUC >= 0.8).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests._mil_helpers import benchmark_bags, camelyon_instances

from napari_lnmeta.core.bags import BagSpec, MILSlide, make_bags, sample_bags
from napari_lnmeta.errors import InputError
from napari_lnmeta.models.clinical import ClinicalEncoder
from napari_lnmeta.progress import run
from napari_lnmeta.train.mil import (
    MILTrainConfig,
    attention_instance_auc,
    split_slides,
    train_mil_job,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: the small benchmark's training settings (regularised more than the seed-002 defaults:
#: 300 bags of one slide's patches overfit with weight decay 1e-3 and dropout 0.25)
BENCH = dict(pooling="gated_attention", bag_size=16, bags_per_slide=1, epochs=20, lr=1e-3,
             weight_decay=1e-2, dropout=0.5, batch_size=16, embed_dim=64, attn_dim=32, t0=1000,
             test_fraction=0.0, val_fraction=0.25, n_boot=50, device="cpu")


def test_attention_finds_tumour_patches_in_real_tissue_bags():
    inst = camelyon_instances()
    assert inst.tumour[inst.train].sum() > 100 and inst.tumour[~inst.train].sum() >= 20
    train, test = benchmark_bags(inst, seed=0)
    res = run(train_mil_job(train, MILTrainConfig(**BENCH, seed=0), classes=["normal", "tumour"],
                            backbone=inst.backbone))
    m = attention_instance_auc(res.model, test)
    assert m["n_positive_bags"] > 40
    assert m["instance_auc_mean"] >= 0.8, m
    assert m["instance_auc_pooled"] >= 0.8, m
    assert m["bag_auc"] >= 0.75, m
    assert m["top1"] > 0.5, m  # the most attended patch is tumour in most positive bags


def test_bags_sampling_and_too_few_patches():
    spec = BagSpec(size=16, per_slide=5, seed=0)
    idx = sample_bags(40, spec)
    assert idx.shape == (5, 16)
    assert all(len(set(r)) == 16 for r in idx) and idx.max() < 40
    with pytest.raises(InputError, match=r"slide_7: only 9 patches, fewer than the 16 patches "
                                         r"per bag \(N\).*--replace"):
        sample_bags(9, spec, slide="slide_7")
    rep = sample_bags(9, BagSpec(size=16, per_slide=5, replace=True))
    assert rep.shape == (5, 16) and rep.max() < 9
    slides = [MILSlide("a", np.zeros((20, 4)), 0), MILSlide("b", np.ones((30, 4)), 1)]
    which, idx = make_bags(slides, BagSpec(size=8, per_slide=3))
    assert which.tolist() == [0, 0, 0, 1, 1, 1] and idx.shape == (6, 8)
    with pytest.raises(InputError, match="a: only 20 patches"):
        make_bags(slides, BagSpec(size=25, per_slide=2))


def test_split_is_4_to_1_with_a_quarter_of_train_for_validation():
    labels = [0] * 50 + [1] * 50
    s = np.array(split_slides(labels, seed=3))
    assert (s == "test").sum() == 20 and (s == "val").sum() == 20 and (s == "train").sum() == 60
    for c in (0, 1):  # stratified
        assert (s[np.array(labels) == c] == "test").sum() == 10


def _cohort(inst, n=16, seed=0):
    """Pseudo-slides of 24 real patches each; N+ when they hold tumour patches."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(inst.tumour), np.flatnonzero(~inst.tumour)
    slides, rows = [], []
    for k in range(n):
        label = k % 2
        idx = np.r_[rng.choice(pos, 6 * label, replace=False), rng.choice(neg, 24 - 6 * label,
                                                                          replace=False)]
        rows.append({"age": str(40 + k), "ER": "pos" if k % 3 else "neg"})
        slides.append(MILSlide(f"s{k:02d}", inst.features[idx], label))
    return slides, rows


def test_training_writes_checkpoints_metrics_and_cancel_keeps_the_last(tmp_path):
    inst = camelyon_instances()
    slides, rows = _cohort(inst)
    enc = ClinicalEncoder.fit(rows, numeric=["age"], categorical=["ER"])
    for s, r in zip(slides, rows, strict=True):
        s.clinical = enc.transform(r, name=s.name)
    cfg = MILTrainConfig(bag_size=8, bags_per_slide=4, epochs=3, lr=1e-3, embed_dim=32,
                         attn_dim=16, n_boot=50, device="cpu", test_fraction=0.25)
    res = run(train_mil_job(slides, cfg, classes=["N0", "N+"], backbone=inst.backbone,
                            clinical=enc, out_dir=tmp_path / "run",
                            features_meta={"stride": 8}))
    out = tmp_path / "run"
    for name in ("best.safetensors", "last.safetensors", "history.json", "metrics.json",
                 "splits.csv"):
        assert (out / name).is_file(), name
    test = res.metrics["test"]
    for key in ("AUC", "AUC_CI", "ACC", "SEN", "SPE", "PPV", "NPV", "F1"):
        assert key in test, key
    assert len(json.loads((out / "history.json").read_text())) == 3
    from napari_lnmeta.models.mil import load_mil

    model, info = load_mil(out / "best.safetensors")
    assert info.clinical == enc and info.backbone.id == inst.backbone.id
    assert info.features == {"stride": 8} and info.bags["size"] == 8
    assert info.extra["training"]["optimizer"] == "adam" and "metrics" in info.extra
    with pytest.raises(Exception, match="already exists"):
        run(train_mil_job(slides, cfg, classes=["N0", "N+"], backbone=inst.backbone,
                          clinical=enc, out_dir=out))
    # cancel (close) after the first epoch: the checkpoint of that epoch stays
    job = train_mil_job(slides, MILTrainConfig(**{**cfg.to_json(), "epochs": 50}),
                        classes=["N0", "N+"], backbone=inst.backbone, clinical=enc,
                        out_dir=tmp_path / "cancelled")
    for p in job:
        if p.done == 1:
            break
    job.close()
    assert (tmp_path / "cancelled" / "last.safetensors").is_file()
    assert not (tmp_path / "cancelled" / "metrics.json").exists()


def test_sgd_l1_and_three_classes(tmp_path):
    inst = camelyon_instances()
    slides, _ = _cohort(inst, n=18)
    for k, s in enumerate(slides):
        s.label = k % 3
    cfg = MILTrainConfig.sgd_warm_restarts(bag_size=8, bags_per_slide=2, epochs=2,
                                           pooling="maxpool_attention", embed_dim=32,
                                           attn_dim=16, n_boot=20, device="cpu")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.l1) == ("sgd", 1e-4, 1e-3, 1e-6)
    res = run(train_mil_job(slides, cfg, classes=["N0", "N+(1-2)", "N+(>=3)"],
                            backbone=inst.backbone))
    assert res.model.config.n_classes == 3
    m = res.metrics["test"]
    assert set(m["AUC_ovr"]) == {"N0", "N+(1-2)", "N+(>=3)"} and "binary_N0_vs_rest" in m
    assert len(res.predictions) == 18
    with pytest.raises(InputError, match="only class"):
        one = [MILSlide(f"x{k}", s.features, 0) for k, s in enumerate(slides)]
        run(train_mil_job(one, cfg, classes=["N0", "N+"], backbone=inst.backbone))
    with pytest.raises(InputError, match="fewer than the 64 patches"):
        run(train_mil_job(slides, MILTrainConfig(bag_size=64), classes=["a", "b", "c"],
                          backbone=inst.backbone))


def test_cohort_classes_and_label_indices():
    from napari_lnmeta.train.mil_cohort import label_indices, mil_classes

    assert mil_classes(["N0", "N+", "N0"]) == ["N0", "N+"]
    assert mil_classes(["0", "2"]) == ["0", "1", "2"]
    assert mil_classes(["b", "a"]) == ["a", "b"]
    assert mil_classes(["x"], " neg , pos ") == mil_classes(["x"], ["neg", "pos"]) == ["neg", "pos"]
    with pytest.raises(InputError, match="at least two classes"):
        mil_classes(["a", "a"])
    assert label_indices(["pos", "0", "1"], ["neg", "pos"]) == [1, 0, 1]
    with pytest.raises(InputError, match=r"t.csv: label '2' is not one of neg, pos"):
        label_indices(["2"], ["neg", "pos"], source="t.csv")
