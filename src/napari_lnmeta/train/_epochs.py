"""The epoch skeleton the training loops share.

``train_job`` (patch classifiers), ``train_spatial_job`` (spatial context) and
``train_mil_job`` (attention MIL) each run their own batches, but end every epoch the same
way: validate when due, append the epoch's row to the history, decide whether it is the
best so far, step a per-epoch scheduler, write the checkpoints and the log, report
progress, and stop early once the monitored value has not improved for ``patience``
epochs. :class:`Monitor` holds the best-so-far/early-stopping state (saved with a
training state and restored on resume, so a resumed run decides exactly as an
uninterrupted one); :func:`close_epoch` is the shared end of an epoch;
:func:`optimiser_step` the shared step (a non-finite loss stops before the weights change);
``_save_state``/``_load_state`` the training state (optimiser, scheduler, every RNG) beside
a checkpoint, from which ``train_job`` resumes bit-identically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ModelError
from ..io.atomic import write_text_atomic
from ..progress import Job, Progress, relay


@dataclass
class Monitor:
    """The best epoch so far, and when to stop early.

    ``name`` is the monitored row key (lower is better when it ends in ``loss``, higher
    otherwise) unless ``better(value, best_value)`` is given. ``patience``: epochs without
    improvement before :attr:`exhausted` (``None``: never). A NaN value (no validation this
    epoch) neither improves nor counts as a bad epoch.
    """

    name: str
    patience: int | None = None
    better: Callable[[Any, Any], bool] | None = None
    best_value: Any = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        lower = self.name.endswith("loss")
        if self.better is None:
            self.better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
        if self.best_value is None:
            self.best_value = math.inf if lower else -math.inf

    def update(self, value: Any, epoch: int) -> bool:
        """Record ``epoch``'s ``value``; True when it is the best so far."""
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.better(value, self.best_value):
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def exhausted(self) -> bool:
        """``patience`` epochs in a row without improvement."""
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (as saved in a training state)."""
        self.best_value = float(state.get("best_value", self.best_value))
        self.best_epoch = int(state.get("best_epoch", -1))
        self.bad_epochs = int(state.get("bad_epochs", 0))


def optimiser_step(loss, opt, scaler, sched, step: int) -> None:
    """Backward pass and one optimiser step (through the AMP ``scaler`` when given).

    A non-finite loss stops training with an :class:`InputError` before the weights are
    touched, so the last good checkpoint stays the last good one. ``sched`` is stepped
    when it is a per-step schedule (pass ``None`` for per-epoch ones).
    """
    import torch

    if not torch.isfinite(loss):
        raise InputError(f"the loss became {loss.item()} at step {step}; lower the "
                         "learning rate (the last good checkpoint is kept)")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    if sched is not None:
        sched.step()


def _latest_state(out: Path, step: int) -> Path | None:
    p = out / f"state-{step}.safetensors"
    return p if p.exists() else None


# -- training state (optimiser / scheduler / RNG) as safetensors + JSON ------------------
def _state_tensors(opt, sched, rng_state: dict, extra: dict) -> tuple[dict, dict]:
    import torch

    sd = opt.state_dict()
    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                plain[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state().clone()
    np_state = np.random.get_state()
    tensors["rng.numpy.key"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    rng_state = {**rng_state, "python": json.loads(json.dumps(random.getstate())),
                 "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    sched_state = None
    if sched is not None:
        try:
            sched_state = json.loads(json.dumps(sched.state_dict(), default=_no_json))
        except TypeError:
            sched_state = None
    meta = {"param_groups": sd["param_groups"], "plain": plain, "scheduler": sched_state,
            "rng": rng_state, **extra}
    return tensors, {"lnmeta_train_state": json.dumps(meta, default=_no_json)}


def _no_json(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


def _save_state(path: Path, opt, sched, rng_state: dict, extra: dict) -> None:
    from safetensors.torch import save_file

    from ..io.atomic import atomic_path

    tensors, md = _state_tensors(opt, sched, rng_state, extra)
    with atomic_path(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata=md)


def _load_state(path: Path, opt, sched) -> dict:
    import torch

    from ..models.io import read_safetensors

    tensors, md = read_safetensors(path)
    if "lnmeta_train_state" not in md:
        raise ModelError(path, "not a training-state file")
    meta = json.loads(md["lnmeta_train_state"])
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta["plain"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    if sched is not None and meta.get("scheduler") is not None:
        sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    rng = meta.get("rng") or {}
    if "python" in rng:  # random / numpy global states (files from older versions lack them)
        v, internal, gauss = rng["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in rng and "rng.numpy.key" in tensors:
        name, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, tensors["rng.numpy.key"].numpy().astype(np.uint32), pos,
                             has_gauss, cached))
    if torch.cuda.is_available():
        states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                  if f"rng.cuda.{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    return meta


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Write the per-epoch history as ``log.csv`` (the union of the keys as columns)."""
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            if k not in keys and not isinstance(v, (list, dict)):
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()
                    if k in keys})
    write_text_atomic(path, buf.getvalue(), overwrite=True)


def epoch_row(epoch: int, step: int, sums: dict[str, float], n: int, correct: int,
              lr: float, seconds: float) -> dict[str, Any]:
    """An epoch's log row: ``train_<k>`` means of ``sums`` (per-sample sums over ``n``)."""
    row: dict[str, Any] = {"epoch": epoch + 1, "step": step}
    row.update({f"train_{k}": v / max(n, 1) for k, v in sums.items()})
    row.update({"train_acc": correct / max(n, 1), "lr": lr, "seconds": round(seconds, 3)})
    return row


def step_progress(step: int, total_steps: int, epoch: int, epochs: int, batch: int,
                  steps_per_epoch: int, loss: float, lr: float, **extra: float) -> Progress:
    """The per-step progress (``partial`` kind ``step``) of the patch and spatial loops."""
    return Progress(step, total_steps, f"epoch {epoch + 1}/{epochs} loss {loss:.4f}",
                    partial={"kind": "step", "step": step, "epoch": epoch,
                             "epoch_float": epoch + (batch + 1) / steps_per_epoch,
                             "loss": loss, **extra, "lr": lr})


def close_epoch(row: dict[str, Any], *, epoch: int, epochs: int, step: int, total_steps: int,
                history: list[dict[str, Any]], monitor: Monitor,
                validate: Callable[[], Job[dict[str, float]]] | None, val_every: int,
                sched: Any, sched_unit: str | None, save: Callable[[bool], None],
                log: Path, shown: tuple[str, ...]) -> Job[bool]:
    """End epoch ``epoch`` (0-based) of a patch or spatial loop; returns whether to stop.

    ``validate()`` (when given, every ``val_every`` epochs and at the last) returns a job
    whose metrics join ``row``; ``save(improved)`` writes the checkpoints; the history goes
    to ``log`` (log.csv); the progress message shows the row's keys ending in ``shown``.
    """
    last_epoch = epoch + 1 == epochs or step >= total_steps
    if validate is not None and ((epoch + 1) % max(1, val_every) == 0 or last_epoch):
        metrics = yield from relay(validate(), lambda p: Progress(
            step, total_steps, f"epoch {epoch + 1}: {p.message} {p.done}/{p.total}"))
        row.update(metrics)
    history.append(row)
    value = row.get(monitor.name, math.nan)
    improved = monitor.update(value, epoch + 1)
    if sched is not None and sched_unit == "epoch" and not math.isnan(value):
        sched.step(value)
    save(improved)
    write_log(log, history)
    yield Progress(step, total_steps, f"epoch {epoch + 1}/{epochs} done: "
                   + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith(shown)),
                   partial={"kind": "epoch", "row": row, "history": list(history)})
    return monitor.exhausted
