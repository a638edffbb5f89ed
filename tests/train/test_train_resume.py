"""A deterministic run stopped mid-epoch or at an epoch boundary resumes to the same weights.

Stopping = closing the job (a Cancel) or killing the process: either way only what the
last checkpoint wrote survives (every file is written atomically), so resuming from it
must replay exactly what the uninterrupted run did after that point: same batch order
from the next batch, same augmentation and dropout random numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_lnmeta.errors import InputError
from napari_lnmeta.models.io import read_safetensors
from napari_lnmeta.progress import run
from napari_lnmeta.train.loop import TrainConfig, train_job


def _cfg(**kw) -> TrainConfig:
    # 48 patches / 16 = 3 steps per epoch; random flips + dropout use the torch RNG
    base = dict(architecture="lnmeta_cnn_small", epochs=3, batch_size=16, lr=3e-3,
                scheduler="cosine", optimizer="adamw", augment="seed000", device="cpu",
                workers=1, seed=3, deterministic=True, checkpoint_every=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ps(t001_patches):
    idx = np.concatenate([np.flatnonzero(t001_patches.labels == c)[:24] for c in (0, 1)])
    return t001_patches.subset(np.sort(idx))


@pytest.fixture(scope="module")
def reference(ps, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = run(train_job(_cfg(), ps, ps, out_dir=out))
    return read_safetensors(res.last)[0], res.history


def _stop_after(ps, out, stop) -> None:
    job = train_job(_cfg(), ps, ps, out_dir=out)
    for p in job:
        if stop(p.partial if isinstance(p.partial, dict) else {}):
            break
    job.close()


@pytest.mark.parametrize("where", ["mid-epoch", "epoch boundary"])
def test_resume_gives_the_uninterrupted_weights(ps, reference, tmp_path, where):
    ref, ref_hist = reference
    if where == "mid-epoch":  # after step 5 = batch 2 of 3 of epoch 2 (checkpointed)
        _stop_after(ps, tmp_path, lambda d: d.get("kind") == "step" and d["step"] == 5)
    else:
        _stop_after(ps, tmp_path, lambda d: d.get("kind") == "epoch" and d["row"]["epoch"] == 1)
    res = run(train_job(_cfg(), ps, ps, out_dir=tmp_path, resume=True))
    got = read_safetensors(res.last)[0]
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert np.array_equal(got[k].numpy(), ref[k].numpy()), k
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref_hist]


def test_overwrite_keeps_the_old_run_until_the_new_one_is_complete(ps, tmp_path):
    out = tmp_path / "run"
    run(train_job(_cfg(epochs=1), ps, out_dir=out))
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    job = train_job(_cfg(epochs=2, seed=11), ps, out_dir=out, overwrite=True)
    for p in job:  # stopped (Cancel, a crash, a kill) after its first epoch was saved
        if isinstance(p.partial, dict) and p.partial.get("kind") == "epoch":
            break
    job.close()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    res = run(train_job(_cfg(epochs=2, seed=11), ps, out_dir=out, overwrite=True))
    assert res.last == out / "last.safetensors" and res.last.read_bytes() != old["last.safetensors"]
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (out / "my_notes.txt").write_text("not a training file")
    with pytest.raises(InputError, match="my_notes.txt"):
        run(train_job(_cfg(epochs=1), ps, out_dir=out, overwrite=True))
