"""Spatial-context training on real CAMELYON16 data: neighbourhoods, the seed-004 sampler, the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from napari_lnmeta.errors import InputError
from napari_lnmeta.models.spatial import SpatialConfig, load_spatial_model
from napari_lnmeta.progress import run
from napari_lnmeta.train.datasets import PatchConfig, PatchSet
from napari_lnmeta.train.spatial import (
    ClassSlideSampler,
    NeighbourhoodSet,
    SpatialTrainConfig,
    dihedral_windows,
    neighbourhoods_from_slide_job,
    predict_neighbourhoods_job,
    split_neighbourhoods,
    train_spatial_job,
)

#: the region of tumor_001 (level-0 rows 4050-7168 of the 7.776 µm/px image) held out
HOLDOUT = (4050, 0, 7168, 3072)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------
def test_sampler_picks_class_then_slide_then_patch_uniformly():
    # slide 0: 1000 normal + 10 tumour; slide 1: 50 normal, no tumour; slide 2: 5 normal +
    # 200 tumour; plus 30 unlabelled (-1) patches on slide 0
    labels = np.r_[np.zeros(1000), np.ones(10), np.zeros(50), np.zeros(5), np.ones(200),
                   -np.ones(30)].astype(int)
    slides = np.r_[np.zeros(1010), np.ones(50), np.full(205, 2), np.zeros(30)].astype(int)
    s = ClassSlideSampler(labels, slides)
    idx = s.sample(30000, np.random.default_rng(0))
    y, sl = labels[idx], slides[idx]
    assert (y >= 0).all()  # never an unlabelled patch
    n0, n1 = int((y == 0).sum()), int((y == 1).sum())
    assert chisquare([n0, n1]).pvalue > 1e-3  # classes 50/50, whatever their sizes
    assert abs(n0 / len(y) - 0.5) < 0.01
    # given a class: every slide that has it equally often (not by its patch count)
    per_slide_normal = np.bincount(sl[y == 0], minlength=3)
    assert chisquare(per_slide_normal).pvalue > 1e-3
    per_slide_tumour = np.bincount(sl[y == 1], minlength=3)
    assert per_slide_tumour[1] == 0  # slide 1 has no tumour: never drawn for it
    assert chisquare(per_slide_tumour[[0, 2]]).pvalue > 1e-3
    # given class and slide: its patches uniformly
    t0 = np.flatnonzero((labels == 1) & (slides == 0))
    counts = np.array([(idx == i).sum() for i in t0])
    assert chisquare(counts).pvalue > 1e-3 and counts.sum() == per_slide_tumour[0]
    # reproducible with the same seed
    np.testing.assert_array_equal(idx, s.sample(30000, np.random.default_rng(0)))
    with pytest.raises(InputError, match="no labelled patches"):
        ClassSlideSampler([-1, -1], [0, 0])


# --------------------------------------------------------------------------------------
# Neighbourhood sets from the real slide
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t001_nb(t001):
    """3x3 neighbourhoods of 16 px patches (stride 16) of tumor_001, windows in memory."""
    slide, tissue, polys = t001
    ns = run(neighbourhoods_from_slide_job(slide, polys, PatchConfig(patch_size=16, balance=False),
                                           k=3, tissue=tissue))
    ns.load_pixels()
    return ns


def test_neighbourhoods_read_windows_and_label_every_cell(t001_nb, t001):
    ns = t001_nb
    assert ns.k == 3 and ns.cell_size == 16 and ns.windows.patch_size == 48
    assert ns.read_mpp == pytest.approx(7.776)
    counts = ns.windows.counts()
    assert counts[1] > 30 and counts[0] > 50 * counts[1]  # all normals kept (no balancing)
    # the centre 16 px of every window is the patch itself
    centres = ns.centres()
    idx = np.r_[np.flatnonzero(ns.labels == 1)[:20], np.arange(0, len(ns), 97)]
    np.testing.assert_array_equal(ns.read(idx)[:, 16:32, 16:32], centres.read_blocked(idx))
    np.testing.assert_array_equal(ns.grid_labels[:, 1, 1], ns.labels)
    # stride = patch size: a neighbour cell is the next patch of the same set, same label
    key = {tuple(c): lab for c, lab in zip(centres.coords.tolist(), ns.labels.tolist(),
                                            strict=True)}
    checked = 0
    for n, (r, c) in enumerate(centres.coords.tolist()):
        for (i, j) in ((0, 1), (1, 2), (2, 1), (1, 0)):
            other = key.get((r + 16 * (i - 1), c + 16 * (j - 1)))
            if other is not None:
                assert ns.grid_labels[n, i, j] == other
                checked += 1
    assert checked > 1000
    # tumour centres mostly have tumour neighbours; normal centres normal ones
    tum = ns.grid_labels[ns.labels == 1].reshape(-1, 9)
    nor = ns.grid_labels[ns.labels == 0].reshape(-1, 9)
    assert (tum == 1).mean() > 0.5 and (nor == 0).mean() > 0.95
    # region hold-out on whole windows: nothing a training window reads is in a test window
    tr, te = split_neighbourhoods(ns, region=HOLDOUT, margin=16)
    assert len(tr) + len(te) < len(ns) and te.labels.sum() > 5 and tr.labels.sum() > 20
    assert (te.windows.coords[:, 0] >= HOLDOUT[0]).all()
    assert (tr.windows.coords[:, 0] + 48 <= HOLDOUT[0] - 16).all()
    with pytest.raises(InputError, match="at least 2 slides"):
        split_neighbourhoods(ns, test_fraction=0.3)


def test_dihedral_keeps_labels_under_their_cells():
    grid = torch.arange(9).reshape(1, 3, 3).repeat(8, 1, 1)
    x = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].float().repeat(1, 3, 1, 1)
    xo, go = dihedral_windows(x, grid, torch.arange(8))
    cells = xo[:, 0].reshape(8, 3, 4, 3, 4)[:, :, 0, :, 0]
    torch.testing.assert_close(cells.long(), go)
    assert len({tuple(g.flatten().tolist()) for g in go}) == 8  # 8 distinct transforms
    assert (go[:, 1, 1] == 4).all()  # the centre stays the centre


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _cfg(**kw) -> SpatialTrainConfig:
    base = dict(spatial=SpatialConfig(k=3, hidden=32), beta=1.0, epochs=4, epoch_size=256,
                batch_size=32, lr=3e-3, scheduler="none", device="cpu", workers=1, seed=0,
                val_every=4)
    base.update(kw)
    return SpatialTrainConfig(**base)


def test_short_training_run_decreases_the_loss(t001_nb, t001, tmp_path):
    from napari_lnmeta.core.inference import InferenceConfig, run_inference_job

    tr, te = split_neighbourhoods(t001_nb, region=HOLDOUT, margin=16)
    te = te.subset((te.labels == 1) | (np.arange(len(te)) % 4 == 0))  # a quick validation
    steps = []
    job = train_spatial_job(_cfg(), tr, te, out_dir=tmp_path / "run")
    res = None
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            res = stop.value
            break
        if isinstance(p.partial, dict) and p.partial["kind"] == "step":
            steps.append(p.partial)
    assert len(steps) == res.steps == 4 * 256 // 32
    assert {"loss", "ce", "spatial"} <= set(steps[0])
    hist = res.history
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"], hist
    assert hist[-1]["train_spatial"] < hist[0]["train_spatial"]
    assert "val_auc" in hist[-1] and "val_auc" not in hist[0]
    for name in ("last.safetensors", "best.safetensors", "log.csv", "config.json"):
        assert (tmp_path / "run" / name).exists(), name
    model, meta = load_spatial_model(res.last)
    assert meta.extra["spatial"]["k"] == 3 and meta.patch_size == 16
    assert meta.mpp == pytest.approx(7.776)
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_json["train_spatial"]["beta"] == 1.0
    # the saved model separates the training classes
    some = tr.subset((tr.labels == 1) | (np.arange(len(tr)) % 16 == 0))
    probs = run(predict_neighbourhoods_job(model, some, meta, device="cpu"))
    from napari_lnmeta.core.metrics import roc_auc

    assert roc_auc(some.labels, probs[:, 1]) > 0.85
    # ... and runs through the whole-slide engine on a part of the slide
    slide, tissue, _ = t001
    import dataclasses

    m = np.zeros_like(tissue.mask)
    d = tissue.downsample
    m[int(3800 / d):int(4200 / d), int(2000 / d):int(2400 / d)] = True
    part = dataclasses.replace(tissue, mask=m & tissue.mask)
    inf = run(run_inference_job(slide, InferenceConfig(model=str(res.last), device="cpu"),
                            tissue=part))
    assert inf.probability.shape == (7168 // 16, 3072 // 16) and inf.params["context"] == 3
    assert 50 < inf.scored.sum() < 700
    # refusals: an existing run, other classes, another k
    with pytest.raises(InputError, match="already holds a training run"):
        run(train_spatial_job(_cfg(), tr, out_dir=tmp_path / "run"))
    with pytest.raises(InputError, match="k=5"):
        run(train_spatial_job(_cfg(spatial=SpatialConfig(k=5)), tr, out_dir=tmp_path / "k5"))
    three = NeighbourhoodSet(PatchSet(tr.windows.slides, tr.slide_index, tr.windows.coords,
                                      tr.labels, None, ["a", "b", "c"]), tr.grid_labels, 3)
    with pytest.raises(InputError, match="two classes"):
        run(train_spatial_job(_cfg(), three, out_dir=tmp_path / "three"))


def test_cli_train_spatial(camelyon, tmp_path, capsys):
    from napari_lnmeta.cli import main

    out = tmp_path / "cli"
    argv = ["train-spatial", "--slide", str(camelyon / "tumor_001_level5.ome.tif"),
            "--labels", str(camelyon / "Tumor_001.json"), "--labels-mpp", "0.243",
            "--patch-size", "16", "--stride", "32", "--holdout-region", "4050,0,7168,3072",
            "--holdout-margin", "16", "--hidden", "16", "--epochs", "1", "--epoch-size", "64",
            "--batch-size", "16", "--device", "cpu", "--workers", "1", "--in-memory", "--eval",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 steps" in text and "AUC" in text
    assert (out / "last.safetensors").exists() and (out / "eval" / "metrics.json").exists()
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["n"] > 100 and "AUC_CI" in m["metrics"]
    assert main(argv) == 2  # an existing run is not overwritten
    err = capsys.readouterr().err
    assert "already holds a training run" in err and len(err.strip().splitlines()) == 1
    labels = str(camelyon / "Tumor_001.json")
    assert main(argv[:3] + ["--labels", labels, "--labels", labels, "--out",
                            str(tmp_path / "x")]) == 2
    assert "one --labels per --slide" in capsys.readouterr().err
