"""Seed-004 spatial-context model: the loss by hand, the grid order, model files, inference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tests._inference_helpers import make_synthetic_slide, small_model_file

from napari_lnmeta.core.inference import InferenceConfig, context_grid, run_inference_job
from napari_lnmeta.errors import InputError, ModelError
from napari_lnmeta.io.slide import open_slide
from napari_lnmeta.models.io import ModelMeta, load_model, read_meta, save_model
from napari_lnmeta.models.spatial import (
    SpatialConfig,
    SpatialContextModel,
    context_size,
    load_spatial_model,
    raster_order,
    save_spatial_model,
    spatial_loss,
    spatial_meta,
    spatial_objective,
)
from napari_lnmeta.progress import run


# --------------------------------------------------------------------------------------
# The spatial loss, eqs. 3-5 of seed 004
# --------------------------------------------------------------------------------------
def _grid(centre: float, neighbours: list[float]) -> torch.Tensor:
    """A 3x3 neighbourhood in raster order: 4 neighbours, the centre, 4 neighbours."""
    return torch.tensor(neighbours[:4] + [centre] + neighbours[4:], dtype=torch.float64)


def test_spatial_loss_matches_values_worked_out_by_hand():
    # same labels everywhere: L = mean of (phi* - phi^n)^2 = (0.9 - 0.5)^2 / 8 = 0.02
    p_a = _grid(0.5, [0.5] * 7 + [0.9])
    y_a = torch.ones(9)
    assert spatial_loss(p_a[None], y_a[None]).item() == pytest.approx(0.02)
    # centre tumour, neighbours normal: L_dif = (1 - phi^n)(1 - phi*) + phi^n phi*
    y_b = _grid(1, [0] * 8)
    assert spatial_loss(_grid(1.0, [0.0] * 8)[None], y_b[None]).item() == pytest.approx(0.0)
    assert spatial_loss(_grid(1.0, [1.0] * 8)[None], y_b[None]).item() == pytest.approx(1.0)
    assert spatial_loss(_grid(0.5, [0.5] * 8)[None], y_b[None]).item() == pytest.approx(0.5)
    # mixed: phi* = 0.8 (tumour); 4 tumour neighbours at 0.6 -> (0.8 - 0.6)^2 = 0.04 each;
    # 4 normal neighbours at 0.3 -> 0.7 * 0.2 + 0.3 * 0.8 = 0.38 each; (0.16 + 1.52) / 8
    p_c = _grid(0.8, [0.6, 0.3, 0.6, 0.3, 0.3, 0.6, 0.3, 0.6])
    y_c = _grid(1, [1, 0, 1, 0, 0, 1, 0, 1])
    assert spatial_loss(p_c[None], y_c[None]).item() == pytest.approx(0.21)
    # a batch is the mean of its neighbourhoods; (B, 3, 3) works like (B, 9)
    batch_p = torch.stack([p_a, p_c]).reshape(2, 3, 3)
    batch_y = torch.stack([y_a, y_c]).reshape(2, 3, 3)
    assert spatial_loss(batch_p, batch_y).item() == pytest.approx((0.02 + 0.21) / 2)
    per = spatial_loss(batch_p, batch_y, reduction="none")
    np.testing.assert_allclose(per.numpy(), [0.02, 0.21])
    # an unlabelled (-1) neighbour is left out of the mean: (0.16 + 3 * 0.38) / 7
    y_d = y_c.clone()
    y_d[1] = -1
    assert spatial_loss(p_c[None], y_d[None]).item() == pytest.approx((0.16 + 3 * 0.38) / 7)
    # an unlabelled centre: nothing to compare, the neighbourhood drops out of the batch
    y_e = y_a.clone()
    y_e[4] = -1
    assert spatial_loss(torch.stack([p_a, p_c]), torch.stack([y_e, y_c])).item() \
        == pytest.approx(0.21)


@pytest.mark.parametrize("k", [3, 5])
def test_spatial_loss_is_the_formula_term_by_term(k):
    g = torch.Generator().manual_seed(k)
    probs = torch.rand(6, k * k, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 2, (6, k * k), generator=g)
    c = k * k // 2
    expected = []
    for b in range(6):
        ps, ys = probs[b].tolist(), labels[b].tolist()
        terms = []
        for n in range(k * k):
            if n == c:
                continue
            d = abs(ys[c] - ys[n])
            same = (ps[c] - ps[n]) ** 2
            dif = (1 - ps[n]) * (1 - ps[c]) + ps[n] * ps[c]
            terms.append((1 - d) * same + d * dif)
        assert len(terms) == k * k - 1
        expected.append(sum(terms) / len(terms))
    loss = spatial_loss(probs, labels)
    assert loss.item() == pytest.approx(float(np.mean(expected)), rel=1e-12)
    loss.backward()
    assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0
    # a single patch (k = 1) has no neighbours: zero, and still differentiable
    assert spatial_loss(probs[:, :1], labels[:, :1]).item() == 0.0


def test_objective_is_cross_entropy_plus_beta_spatial():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, 2, generator=g)
    labels = torch.randint(0, 2, (4, 9), generator=g)
    labels[0, 3] = -1
    total, ce, sp = spatial_objective(logits, labels, beta=0.5)
    keep = labels.reshape(-1) != -1
    ref_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2)[keep], labels.reshape(-1)[keep])
    ref_sp = spatial_loss(torch.softmax(logits, -1)[..., 1], labels)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-6)
    assert sp.item() == pytest.approx(ref_sp.item(), rel=1e-6)
    assert total.item() == pytest.approx(ref_ce.item() + 0.5 * ref_sp.item(), rel=1e-6)
    _, ce_c, _ = spatial_objective(logits, labels, beta=0.5, ce_cells="centre")
    ref_c = torch.nn.functional.cross_entropy(logits[:, 4], labels[:, 4])
    assert ce_c.item() == pytest.approx(ref_c.item(), rel=1e-6)
    # sigmoid head: one logit, BCE, phi = sigmoid
    t1, ce1, sp1 = spatial_objective(logits[..., 1:], labels, beta=2.0, head="sigmoid")
    assert sp1.item() == pytest.approx(
        spatial_loss(torch.sigmoid(logits[..., 1]), labels).item(), rel=1e-6)
    assert t1.item() == pytest.approx(ce1.item() + 2.0 * sp1.item(), rel=1e-6)
    with pytest.raises(InputError, match="2 classes"):
        spatial_objective(torch.randn(2, 9, 3), torch.zeros(2, 9), beta=1.0)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------
def _net(k=3, patch=16, bidirectional=False, seed=0) -> SpatialContextModel:
    torch.manual_seed(seed)
    cfg = SpatialConfig(backbone="lnmeta_cnn_small", k=k, hidden=16, bidirectional=bidirectional)
    return SpatialContextModel(cfg, 2, patch_size=patch).eval()


def test_cells_are_cut_in_raster_order_and_forward_is_the_centre():
    net = _net()
    # window whose cell (i, j) is filled with the value 3 * i + j
    x = torch.zeros(2, 3, 48, 48)
    for i in range(3):
        for j in range(3):
            x[:, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = 3 * i + j
    cells = net.cells(x).reshape(2, 9, 3, 16, 16)
    for n in range(9):
        assert (cells[:, n] == n).all()
    np.testing.assert_array_equal(raster_order(3)[5], [1, 2])
    with torch.inference_mode():
        grid = net.forward_grid(x)
        assert grid.shape == (2, 9, 2)
        torch.testing.assert_close(net(x), grid[:, 4])
    with pytest.raises(ModelError, match="48x48 px windows, got 16x16"):
        net(torch.zeros(1, 3, 16, 16))


def test_lstm_runs_over_the_grid_in_raster_order():
    """Unidirectional (seed 004): the centre's output depends on cells 0-4, not on 5-8."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 48, generator=g)
    late = x.clone()
    late[:, :, 32:, 32:] = 0  # cell 8, the last in raster order
    early = x.clone()
    early[:, :, :16, :16] = 0  # cell 0, the first
    with torch.inference_mode():
        uni = _net()
        assert torch.equal(uni(x), uni(late))
        assert not torch.allclose(uni(x), uni(early))
        bi = _net(bidirectional=True)
        assert not torch.allclose(bi(x), bi(late))


def test_model_file_roundtrip_and_metadata(tmp_path):
    net = _net()
    meta = spatial_meta(net.config, classes=["normal", "tumour"], patch_size=16, mpp=7.776,
                        mean=[0.7, 0.5, 0.7], std=[0.2, 0.2, 0.2])
    path = save_spatial_model(tmp_path / "spatial.safetensors", net, meta)
    m = read_meta(path)
    assert m.architecture == "spatial:lnmeta_cnn_small" and m.patch_size == 16
    assert m.mpp == pytest.approx(7.776) and m.extra["spatial"]["k"] == 3
    assert context_size(m) == 3
    back, meta2 = load_model(path)
    assert isinstance(back, SpatialContextModel) and not back.training
    x = torch.rand(3, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), net(x))
    back2, _ = load_spatial_model(path)
    assert back2.k == 3
    assert context_size(ModelMeta(architecture="lnmeta_cnn_small", classes=["a", "b"],
                                  patch_size=16)) == 1


def test_wrong_model_files_are_clear_errors(tmp_path):
    plain = small_model_file(tmp_path / "plain.safetensors")
    with pytest.raises(ModelError, match="lnmeta_cnn_small patch classifier, not a spatial"):
        load_spatial_model(plain)
    net = _net()
    meta = spatial_meta(net.config, classes=["normal", "tumour"], patch_size=16, mpp=1.0,
                        mean=[0.5] * 3, std=[0.25] * 3)
    # metadata that lost its spatial settings
    broken = dataclasses.replace(meta, extra={})
    save_model(tmp_path / "nok.safetensors", net, broken)
    with pytest.raises(ModelError, match="without its 'spatial' settings"):
        load_model(tmp_path / "nok.safetensors")
    # weights of another LSTM size than the metadata says
    other = dataclasses.replace(meta, extra={"spatial": {**meta.extra["spatial"], "hidden": 32}})
    save_model(tmp_path / "hidden.safetensors", net, other)
    with pytest.raises(ModelError, match="weights do not fit a spatial:lnmeta_cnn_small"):
        load_model(tmp_path / "hidden.safetensors")
    # an even neighbourhood has no centre
    even = dataclasses.replace(meta, extra={"spatial": {**meta.extra["spatial"], "k": 4}})
    save_model(tmp_path / "even.safetensors", net, even)
    with pytest.raises(ModelError, match="bad spatial settings.*odd"):
        load_model(tmp_path / "even.safetensors")
    # metadata for another k than the network, refused at save time
    with pytest.raises(ModelError, match="does not describe this spatial model"):
        save_spatial_model(tmp_path / "k5.safetensors", net,
                           spatial_meta(SpatialConfig(k=5, hidden=16), classes=["n", "t"],
                                        patch_size=16, mpp=1.0, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(InputError, match="odd"):
        SpatialConfig(k=2)


# --------------------------------------------------------------------------------------
# Through the inference engine
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory, camelyon):
    return make_synthetic_slide(tmp_path_factory.mktemp("synth"), camelyon)


@pytest.fixture(scope="module")
def small_tissue(synth):
    """Tissue restricted to a 256 x 320 px window of the synthetic slide (fast runs)."""
    from napari_lnmeta.core.tissue import tissue_mask

    t = tissue_mask(open_slide(synth.path))
    m = np.zeros_like(t.mask)
    d = t.downsample
    m[int(96 / d):int(352 / d), int(192 / d):int(512 / d)] = True
    return dataclasses.replace(t, mask=m & t.mask)


def _spatial_file(path, *, mpp: float, patch: int = 16, seed: int = 0):
    net = _net(patch=patch, seed=seed)
    meta = spatial_meta(net.config, classes=["normal", "tumour"], patch_size=patch, mpp=mpp,
                        mean=[0.5] * 3, std=[0.25] * 3)
    return save_spatial_model(path, net, meta, overwrite=True)


@pytest.fixture(scope="module")
def spatial_file(tmp_path_factory):
    """A random spatial model: 16 px cells at 1 µm/px (pyramid level 1 of the slide)."""
    return _spatial_file(tmp_path_factory.mktemp("sp") / "spatial.safetensors", mpp=1.0)


def test_engine_reads_the_neighbourhood_around_each_patch(synth, small_tissue, spatial_file):
    from napari_lnmeta.core.tiling import make_grid

    slide = open_slide(synth.path)
    cfg = InferenceConfig(model=str(spatial_file), device="cpu", batch_size=16, workers=2)
    res = run(run_inference_job(slide, cfg, tissue=small_tissue))
    assert res.params["context"] == 3 and res.params["patch_size"] == 16
    assert res.grid.level == 1 and res.grid.patch_size == 16
    # the heatmap is on the patch grid, exactly as a plain 16 px model's would be
    plain = make_grid(slide, patch_size=16, level=1, tissue=small_tissue)
    assert res.probability.shape == plain.grid_shape == res.grid.grid_shape
    np.testing.assert_array_equal(res.grid.coords, plain.coords)
    assert res.scored.sum() == len(plain) > 20
    # each value is the model on the 48 px window centred on its patch (level 1: 32 px
    # level-0 offset), including windows that reach past the slide's edge
    net, meta = load_model(spatial_file)
    win = context_grid(res.grid, 3)
    assert win.patch_size == 48 and np.all(win.coords == res.grid.coords - 32)
    x = np.stack([slide.read_region(tuple(int(v) - 32 for v in c), (48, 48), level=1)
                  for c in res.grid.coords])
    from napari_lnmeta.models.io import infer_batch

    ref = infer_batch(net, x, device="cpu", meta=meta)[:, 1]
    got = res.probability[res.grid.index[:, 0], res.grid.index[:, 1]]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # 8-direction TTA rotates whole windows: still one value per patch
    tta = run(run_inference_job(slide, dataclasses.replace(cfg, tta=True), tissue=small_tissue))
    assert tta.probability.shape == res.probability.shape
    assert np.array_equal(tta.scored, res.scored)
    assert not np.allclose(tta.probability[tta.scored], got)  # not rotation invariant


def test_predict_cli_runs_a_spatial_model_and_resumes(synth, tmp_path, capsys):
    from napari_lnmeta._napari.prediction_layers import prediction_layer_data
    from napari_lnmeta.cli import main
    from napari_lnmeta.core.inference import PartialHeatmap
    from napari_lnmeta.core.predict import predict_to_folder_job

    model = _spatial_file(tmp_path / "sp2.safetensors", mpp=2.0, seed=1)  # resampled reads
    out = tmp_path / "pred"
    argv = ["predict", str(synth.path), "-o", str(out), "--model", str(model), "--device",
            "cpu", "--batch-size", "8", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["complete"] and s["model"]["architecture"] == "spatial:lnmeta_cnn_small"
    assert s["parameters"]["context"] == 3 and s["parameters"]["patch_size"] == 16
    rows, cols = s["parameters"]["grid_shape"]
    # 16 px at 2 µm/px = 64 level-0 px (0.5 µm/px), the same grid as a plain 16 px model
    assert (rows, cols) == (-(-(900 - 64) // 64) + 1, -(-(740 - 64) // 64) + 1)
    from napari_lnmeta.io.omezarr import read_ome_zarr

    heat = read_ome_zarr(out / "probability.ome.zarr")
    assert np.asarray(heat.data).shape == (rows, cols)
    # cancel half-way, resume: equals the uninterrupted run
    cfg = InferenceConfig(model=str(model), device="cpu", batch_size=8, partial_seconds=0.0)
    part = tmp_path / "part"
    job = predict_to_folder_job(synth.path, part, cfg)
    seen = []
    for p in job:
        seen.append(p)
        if p.message == "inference" and p.done >= 3 * 8:
            break
    job.close()
    assert any(isinstance(p.partial, PartialHeatmap) for p in seen)
    pred = run(predict_to_folder_job(synth.path, part, cfg))
    assert pred.result.resumed >= 3 * 8
    np.testing.assert_allclose(pred.probability,
                               np.asarray(heat.data, dtype=np.float32), atol=1e-3)
    # napari layers of the prediction: heatmap, binary, tiers on the patch grid
    layers = prediction_layer_data(pred)
    assert [t for _, _, t in layers] == ["image", "labels", "labels", "points"]
    assert layers[0][0].shape == (rows, cols)
    assert layers[0][1]["scale"][0] == pytest.approx(64 * 0.5)  # one cell per 64 px patch
    # a pickle given as --model: one line, exit 2
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04K\x01.")
    assert main(["predict", str(synth.path), "-o", str(tmp_path / "o"), "--model", str(bad),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln]  # after the progress line
    assert len(errors) == 1 and errors[0].startswith("lnmeta: error: ") and "pickle" in errors[0]
