"""Training on real CAMELYON16 patches: loss falls, checkpoints reload, cancel/crash/resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lnmeta.errors import InputError
from napari_lnmeta.models.io import infer_batch, load_model, read_meta
from napari_lnmeta.progress import run
from napari_lnmeta.train.augment import PRESETS, make_augment
from napari_lnmeta.train.datasets import PatchSet
from napari_lnmeta.train.loop import TrainConfig, train_job


def _small(ps: PatchSet, n_per_class: int = 24) -> PatchSet:
    idx = np.concatenate([np.flatnonzero(ps.labels == c)[:n_per_class] for c in (0, 1)])
    return ps.subset(np.sort(idx))


def _cfg(**kw) -> TrainConfig:
    base = dict(architecture="lnmeta_cnn_small", epochs=1, batch_size=16, lr=3e-3,
                scheduler="none", device="cpu", workers=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _loss(model, ps, meta):
    p = infer_batch(model, ps.read(np.arange(len(ps))), device="cpu", meta=meta)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(ps)), ps.labels], 1e-7, 1))))


def test_loss_falls_and_checkpoint_reloads_identically(t001_patches, tmp_path):
    ps = _small(t001_patches)
    res = run(train_job(_cfg(epochs=6, val_every=6), ps, ps, out_dir=tmp_path / "run"))
    hist = [h["train_loss"] for h in res.history]
    assert hist[-1] < 0.7 * hist[0], hist
    assert "val_loss" in res.history[-1] and "val_loss" not in res.history[0]
    model, meta = load_model(res.last)
    assert meta.classes == ["normal", "tumour"] and meta.patch_size == 32
    assert meta.mpp == pytest.approx(7.776)
    assert meta.extra["train"]["architecture"] == "lnmeta_cnn_small"
    x = ps.read(np.arange(len(ps)))
    np.testing.assert_array_equal(infer_batch(res.model, x, device="cpu", meta=res.meta),
                                  infer_batch(model, x, device="cpu", meta=meta))
    assert _loss(model, ps, meta) < 0.6  # chance is 0.693
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,train_loss") and len(log) == 7
    with pytest.raises(InputError, match="already holds a training run"):
        run(train_job(_cfg(), ps, out_dir=tmp_path / "run"))


def _digest(p):
    return p.read_bytes()


def test_cancel_and_crash_leave_last_good_checkpoint(t001_patches, tmp_path):
    ps = _small(t001_patches, 16)  # 32 patches: 2 steps per epoch
    out = tmp_path / "run"
    job = train_job(_cfg(epochs=4), ps, out_dir=out)
    saved = None
    for p in job:
        if isinstance(p.partial, dict) and p.partial.get("kind") == "epoch" and saved is None:
            saved = _digest(out / "last.safetensors")
            epoch_meta = read_meta(out / "last.safetensors").extra["checkpoint"]
        elif saved is not None and isinstance(p.partial, dict) and p.partial.get("kind") == "step":
            break  # the user presses Cancel in the middle of epoch 2
    job.close()
    assert _digest(out / "last.safetensors") == saved
    assert epoch_meta == {**epoch_meta, "step": 2, "epochs_done": 1}
    assert not list(out.glob(".*tmp*"))
    load_model(out / "last.safetensors")

    class Exploding(PatchSet):
        calls = 0

        def read(self, idx):
            Exploding.calls += 1
            if Exploding.calls > 3:
                raise OSError("disk went away")
            return super().read(idx)

    bad = Exploding(ps.slides, ps.slide_index, ps.coords, ps.labels, ps.fractions, ps.classes)
    bad._pixels = ps._pixels  # in memory: read() is still called per batch
    out2 = tmp_path / "crash"
    with pytest.raises(OSError, match="disk went away"):
        run(train_job(_cfg(epochs=4), bad, out_dir=out2))
    good = read_meta(out2 / "last.safetensors")  # epoch 1 survived the crash
    assert good.extra["checkpoint"]["epochs_done"] == 1
    load_model(out2 / "last.safetensors")

    # resume the cancelled run to the end
    res = run(train_job(_cfg(epochs=4), ps, out_dir=out, resume=True))
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4] and res.steps == 8


@pytest.mark.parametrize("opt,sched", [("sgd", "cosine"), ("adamw", "onecycle"),
                                       ("rmsprop", "cosine_restarts"), ("adam", "plateau")])
def test_optimisers_and_schedules_run(t001_patches, tmp_path, opt, sched):
    ps = _small(t001_patches, 8)
    res = run(train_job(_cfg(optimizer=opt, scheduler=sched, epochs=2, lr=1e-3, t0=1,
                             head="sigmoid" if opt == "sgd" else "softmax",
                             early_stopping=1 if sched == "plateau" else None),
                        ps, ps, out_dir=tmp_path / opt))
    assert res.steps >= 1 and np.isfinite(res.history[-1]["train_loss"])
    assert read_meta(res.best).head == ("sigmoid" if opt == "sgd" else "softmax")


def test_augment_presets_batch_and_per_sample():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    for name in PRESETS:
        y = make_augment(name)(x)
        assert y.shape == (8, 3, 32, 32) and y.dtype == torch.float32
        assert float(y.min()) >= 0 and float(y.max()) <= 1
    # dihedral: every sample keeps its pixels, samples get different transforms
    y = make_augment("flips")(x.float() / 255)
    xs = x.float() / 255
    for i in range(8):
        assert torch.equal(torch.sort(y[i].flatten()).values, torch.sort(xs[i].flatten()).values)
    assert sum(not torch.equal(y[i], xs[i]) for i in range(8)) >= 4
    # seed-004 colour jitter draws its factors per sample
    z = make_augment("dihedral-jitter")(torch.full((6, 3, 8, 8), 0.5))
    assert len({round(float(z[i].mean()), 4) for i in range(6)}) > 3
    with pytest.raises(InputError, match="unknown augmentation preset"):
        make_augment("seed999")


def test_earlier_preset_names_are_read_as_the_current_ones():
    from napari_lnmeta.cli import build_parser
    from napari_lnmeta.train.options import AUGMENT_ALIASES
    from napari_lnmeta.train.spatial import SpatialTrainConfig

    for old, new in AUGMENT_ALIASES.items():
        assert new in PRESETS
        assert make_augment(old).name == new
        assert ([type(t) for t in make_augment(old).transforms]
                == [type(t) for t in make_augment(new).transforms])
    assert type(make_augment("seed003").transforms[2].transform).__name__ == "TrivialAugmentWide"
    args = build_parser(["train"]).parse_args(["train", "p.npz", "-o", "r",
                                               "--augment", "seed000"])
    assert args.augment == "photometric"
    assert SpatialTrainConfig(augment="seed004").augment == "dihedral-jitter"


@pytest.mark.gpu
def test_amp_training_on_cuda(t001_patches, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ps = _small(t001_patches, 8)
    res = run(train_job(_cfg(device="cuda", amp=True, epochs=1), ps, out_dir=tmp_path / "gpu"))
    assert res.extra["amp"] and res.extra["device"].startswith("cuda")
