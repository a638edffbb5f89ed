"""MIL networks, clinical fusion and MIL model files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lnmeta.errors import InputError, ModelError, OutputExistsError
from napari_lnmeta.models.clinical import ClinicalEncoder, clinical_row
from napari_lnmeta.models.extractor import BackboneInfo
from napari_lnmeta.models.mil import (
    ATTENTION_POOLINGS,
    POOLINGS,
    MILConfig,
    MILInfo,
    MILModel,
    load_mil,
    read_mil_info,
    relative_attention,
    save_mil,
)

BACKBONE = BackboneInfo(name="lnmeta_cnn_small", weights="random-seed0-abcdef12", feature_dim=24,
                        patch_size=16, mpp=7.776)


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("n_classes", [2, 3])
def test_pooling_shapes_weights_and_permutation_invariance(pooling, n_classes):
    torch.manual_seed(0)
    model = MILModel(MILConfig(feature_dim=24, n_classes=n_classes, pooling=pooling,
                               embed_dim=16, attn_dim=8)).eval()
    x = torch.randn(3, 10, 24)
    logits, w = model(x)
    assert logits.shape == (3, n_classes) and w.shape == (3, 10)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    perm = torch.randperm(10)
    logits_p, w_p = model(x[:, perm])
    torch.testing.assert_close(logits_p, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_p, w[:, perm], atol=1e-6, rtol=1e-5)
    # padding instances get no weight and do not change the bag
    pad = torch.cat([x, torch.randn(3, 4, 24) * 50], 1)
    mask = torch.zeros(3, 14, dtype=torch.bool)
    mask[:, :10] = True
    logits_m, w_m = model(pad, mask=mask)
    torch.testing.assert_close(logits_m, logits, atol=1e-5, rtol=1e-5)
    assert float(w_m[:, 10:].detach().abs().max()) == 0.0


@pytest.mark.parametrize("pooling", ATTENTION_POOLINGS)
def test_instance_logits_give_the_bag_softmax(pooling):
    torch.manual_seed(1)
    model = MILModel(MILConfig(feature_dim=24, pooling=pooling, embed_dim=16, attn_dim=8)).eval()
    x = torch.randn(7, 24)
    with torch.no_grad():
        _, w = model(x)
    s = model.instance_logits(x, chunk=3)  # chunking does not change the scores
    torch.testing.assert_close(torch.softmax(s, 0), w[0], atol=1e-6, rtol=1e-5)
    rel = relative_attention(s.numpy())
    assert rel.max() == pytest.approx(1.0) and (rel > 0).all()
    np.testing.assert_allclose(rel / rel.sum(), w[0].numpy(), rtol=1e-5, atol=1e-7)


def test_seed002_variant_uses_max_pooled_features():
    model = MILModel(MILConfig(feature_dim=24, pooling="maxpool_attention", embed_dim=None,
                               attn_dim=8, feature_pool=4))
    assert model.attn_fc[0].in_features == 24 // 4
    assert not hasattr(model, "attn_v")


def test_earlier_pooling_names_still_load():
    # model files written before the rename say pooling "seed002" and "seed002_pool"
    cfg = MILConfig.from_json({"feature_dim": 24, "pooling": "seed002", "seed002_pool": 3,
                               "embed_dim": None, "attn_dim": 8})
    assert cfg.pooling == "maxpool_attention" and cfg.feature_pool == 3
    assert MILModel(cfg).attn_fc[0].in_features == 24 // 3
    from napari_lnmeta.cli import build_parser

    args = build_parser(["train-mil"]).parse_args(
        ["train-mil", "t.csv", "-o", "run", "--pooling", "seed002"])
    assert args.pooling == "maxpool_attention"


def test_clinical_fusion_repeats_and_requires_values():
    enc = ClinicalEncoder.fit([{"age": "40", "ER": "pos"}, {"age": "60", "ER": "neg"}],
                              numeric=["age"], categorical=["ER"])
    model = MILModel(MILConfig(feature_dim=24, embed_dim=16, clinical_dim=enc.dim,
                               clinical_repeat=10)).eval()
    assert model.classifier[1].in_features == 16 + 3 * 10
    c = torch.from_numpy(enc.transform({"age": 50, "ER": "pos"}))
    logits, _ = model(torch.randn(2, 5, 24), c[None].expand(2, -1))
    assert logits.shape == (2, 2)
    with pytest.raises(InputError, match="clinical"):
        model(torch.randn(2, 5, 24))
    with pytest.raises(InputError, match="24"):
        model(torch.randn(2, 5, 12), c[None].expand(2, -1))


def test_clinical_encoder_standardises_one_hot_and_errors(tmp_path):
    rows = [{"age": "40", "size": "1.5", "ER": "positive"},
            {"age": "60", "size": "2.5", "ER": "negative"},
            {"age": "50", "size": "2.0", "ER": "positive"}]
    enc = ClinicalEncoder.fit(rows, numeric=["age", "size"], categorical=["ER"])
    assert enc.dim == 4 and enc.categorical["ER"] == ["negative", "positive"]
    x = enc.transform_many(rows, ["a", "b", "c"])
    np.testing.assert_allclose(x[:, :2].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(x[:, :2].std(0), 1, atol=1e-6)
    np.testing.assert_array_equal(x[:, 2:], [[0, 1], [1, 0], [0, 1]])
    # the schema survives JSON
    assert ClinicalEncoder.from_json(enc.to_json()) == enc
    with pytest.raises(InputError, match=r"ER='weak' was not seen in training \(known: negative, positive\)"):
        enc.transform({"age": 50, "size": 2, "ER": "weak"}, name="s1")
    with pytest.raises(InputError, match="'age' is empty/missing"):
        enc.transform({"age": "NA", "size": 2, "ER": "positive"}, name="s1")
    with pytest.raises(InputError, match="'size' is missing"):
        enc.transform({"age": 3, "ER": "positive"}, name="s1")
    with pytest.raises(InputError, match="numeric but holds 'old'"):
        enc.transform({"age": "old", "size": 2, "ER": "positive"}, name="s1")
    # CSV rows: by slide name, or the only row
    csv = tmp_path / "clin.csv"
    csv.write_text("slide,age,size,ER\ntumor_001.tif,44,1.2,positive\ntumor_002.tif,,1.0,weak\n")
    row = clinical_row(csv, "tumor_001.ome.tif")
    assert enc.transform(row).shape == (4,)
    with pytest.raises(InputError, match="'age' is empty/missing"):
        enc.transform(clinical_row(csv, "tumor_002"), name="tumor_002")
    with pytest.raises(InputError, match="no row for slide"):
        clinical_row(csv, "tumor_003.tif")
    with pytest.raises(InputError, match="no slide column"):
        two = tmp_path / "two.csv"
        two.write_text("age,ER\n1,positive\n2,negative\n")
        clinical_row(two, "x")


def test_model_file_round_trip_and_refusals(tmp_path):
    enc = ClinicalEncoder.fit([{"age": "40", "ER": "pos"}, {"age": "60", "ER": "neg"}],
                              numeric=["age"], categorical=["ER"])
    torch.manual_seed(0)
    model = MILModel(MILConfig(feature_dim=24, n_classes=3, pooling="attention", embed_dim=16,
                               attn_dim=8, clinical_dim=enc.dim))
    info = MILInfo(config=model.config, classes=["N0", "N+(1-2)", "N+(>=3)"], backbone=BACKBONE,
                   clinical=enc, features={"stride": 16}, bags={"size": 8, "per_slide": 4})
    path = save_mil(tmp_path / "mil.safetensors", model, info)
    got = read_mil_info(path)
    assert got.classes == info.classes and got.config == model.config
    assert got.backbone.id == BACKBONE.id and got.clinical == enc and got.bag_size == 8
    loaded, _ = load_mil(path)
    x, c = torch.randn(2, 6, 24), torch.from_numpy(enc.transform({"age": 50, "ER": "pos"}))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, c[None].expand(2, -1))[0],
                                   model(x, c[None].expand(2, -1))[0])
    with pytest.raises(OutputExistsError):
        save_mil(path, model, info)
    # a patch classifier is not a MIL model
    from napari_lnmeta.models.io import ModelMeta, load_model, save_model
    from napari_lnmeta.models.registry import build_model

    patch = save_model(tmp_path / "patch.safetensors", build_model("lnmeta_cnn_small", 2),
                       ModelMeta(architecture="lnmeta_cnn_small", classes=["n", "t"], patch_size=16))
    with pytest.raises(ModelError, match="not a MIL model"):
        load_mil(patch)
    # ... and a MIL model is not a patch classifier
    with pytest.raises(ModelError, match="slide-level MIL model, not a patch classifier"):
        load_model(path)


def test_refuses_features_from_another_backbone(tmp_path):
    from tests._mil_helpers import crop_features

    _, _, cache = crop_features()
    other = BackboneInfo(name="resnet18", weights="random-seed0-00000000", feature_dim=512)
    info = MILInfo(config=MILConfig(feature_dim=512), classes=["N0", "N+"], backbone=other,
                   path=str(tmp_path / "m.safetensors"))
    with pytest.raises(ModelError, match=r"features come from backbone 'lnmeta_cnn_small:random-seed0-.*' "
                                         r"but the MIL model m.safetensors expects 'resnet18:"):
        info.check_features(cache)
    # same architecture, other weights: refused too
    seed1 = BackboneInfo(name="lnmeta_cnn_small", weights="random-seed1-11111111", feature_dim=192)
    info = MILInfo(config=MILConfig(feature_dim=192), classes=["N0", "N+"], backbone=seed1)
    with pytest.raises(ModelError, match="extract the features again"):
        info.check_features(cache)
    info.backbone = cache.backbone
    info.check_features(cache)  # the right one passes


def test_feature_statistics_live_in_the_model_and_its_file(tmp_path):
    """The model standardises raw features itself (same output as standardised features
    through an identity model); the statistics round-trip through the file; a file
    without them (an older version) loads as identity, with a note."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_lnmeta.models.mil import feature_stats, small_model_threads

    rng = np.random.default_rng(0)
    raw = [rng.normal(1.2, 0.17, (30, 24)).astype(np.float32) for _ in range(3)]
    raw[0][:, 5] = 7.0  # a constant dimension: centred only
    mean, sd = feature_stats(raw)
    allx = np.concatenate(raw)
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sd, allx.std(0), rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)
    cfg = MILConfig(feature_dim=24, embed_dim=16, attn_dim=8)
    model = MILModel(cfg).eval()
    ident = MILModel(cfg).eval()
    ident.load_state_dict(model.state_dict())
    model.set_feature_stats(mean, sd)
    x = torch.from_numpy(raw[1][None])
    std_sd = np.where(sd > 1e-6, sd, 1.0)
    xs = torch.from_numpy(((raw[1] - mean) / std_sd)[None].astype(np.float32))
    torch.testing.assert_close(model(x)[0], ident(xs)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.instance_logits(x[0]), ident.instance_logits(xs[0]),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="23 values"):
        model.set_feature_stats(mean[:23], sd[:23])
    info = MILInfo(config=cfg, classes=["N0", "N+"], backbone=BACKBONE,
                   extra={"feature_standardisation": {"from": "training slides"}})
    path = save_mil(tmp_path / "m.safetensors", model, info)
    net, back = load_mil(path)
    assert back.standardised and back.notes == []
    torch.testing.assert_close(net.feature_mean, torch.from_numpy(mean))
    torch.testing.assert_close(net(x)[0], model(x)[0])
    # the same file as an older version wrote it: no statistics
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names if not k.startswith("feature_")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=md)
    net_old, info_old = load_mil(old)
    assert not info_old.standardised
    assert len(info_old.notes) == 1 and "without feature statistics" in info_old.notes[0]
    torch.testing.assert_close(net_old(x)[0], ident(x)[0])  # raw features, as trained
    # small models run with one CPU thread, restored afterwards
    before = torch.get_num_threads()
    with small_model_threads("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
