"""The shared epoch skeleton: best-epoch choice, early stopping and its resume state."""

from __future__ import annotations

import math

from napari_lnmeta.train._epochs import Monitor, epoch_row


def _run(monitor: Monitor, values):
    """Feed one value per epoch; the epochs that improved and where it would stop."""
    improved, stop = [], None
    for e, v in enumerate(values, start=1):
        if monitor.update(v, e):
            improved.append(e)
        if monitor.exhausted:
            stop = e
            break
    return improved, stop


def test_loss_monitor_lower_is_better_and_nan_is_neutral():
    m = Monitor("val_loss", patience=2)
    improved, stop = _run(m, [1.0, 0.5, math.nan, 0.7, 0.5, 0.4])
    # NaN (no validation that epoch) neither improves nor counts as bad; a tie is not better
    assert improved == [1, 2]
    assert stop == 5
    assert (m.best_value, m.best_epoch, m.bad_epochs) == (0.5, 2, 2)


def test_score_monitor_higher_is_better_and_no_patience_never_stops():
    m = Monitor("val_auc")
    improved, stop = _run(m, [0.6, 0.7, 0.65, 0.9, 0.1, 0.2, 0.3])
    assert improved == [1, 2, 4] and stop is None
    assert (m.best_value, m.best_epoch, m.bad_epochs) == (0.9, 4, 3)


def test_resumed_monitor_decides_as_an_uninterrupted_one():
    values = [0.9, 0.8, 0.85, 0.95, 0.7, 0.75, 0.76, 0.77]
    whole = Monitor("train_loss", patience=3)
    expected = _run(whole, values)
    first = Monitor("train_loss", patience=3)
    _run(first, values[:4])
    resumed = Monitor("train_loss", patience=3)
    resumed.restore(first.state())
    improved, stop = [], None
    for e, v in enumerate(values[4:], start=5):
        if resumed.update(v, e):
            improved.append(e)
        if resumed.exhausted:
            stop = e
            break
    assert ([e for e in expected[0] if e <= 4] + improved, stop) == expected
    assert resumed.state() == whole.state()


def test_custom_comparator():
    # any value type: here (auc, loss) pairs, best by AUC then loss
    m = Monitor("auc-then-loss", patience=1, best_value=(-1.0, math.inf), best_epoch=0,
                better=lambda v, b: v[0] > b[0] or (v[0] == b[0] and v[1] < b[1]))
    improved, stop = _run(m, [(0.5, 1.0), (0.5, 0.9), (0.5, 0.95)])
    assert improved == [1, 2] and stop == 3 and m.best_epoch == 2


def test_epoch_row_keeps_the_log_column_order():
    row = epoch_row(2, 30, {"loss": 6.0, "ce": 4.0, "spatial": 2.0}, 4, 3, 0.01, 1.23456)
    assert list(row) == ["epoch", "step", "train_loss", "train_ce", "train_spatial",
                         "train_acc", "lr", "seconds"]
    assert row["epoch"] == 3 and row["train_loss"] == 1.5 and row["train_acc"] == 0.75
    assert row["seconds"] == 1.235
    assert epoch_row(0, 0, {"loss": 0.0}, 0, 0, 0.1, 0.0)["train_loss"] == 0.0
