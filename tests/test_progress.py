"""``progress.in_thread``: a step that cannot yield still lets its job be cancelled."""

from __future__ import annotations

import threading

import pytest

from napari_lnmeta.progress import Progress, in_thread, run


def test_heartbeats_while_the_call_runs_and_close_does_not_wait():
    release = threading.Event()
    job = in_thread(release.wait, message="slow step", interval=0.01)
    beats = [next(job) for _ in range(3)]  # the call is blocked: only heartbeats come
    assert all(isinstance(b, Progress) and b.total == 0 for b in beats)
    assert beats[0].message == "slow step" and beats[-1].message.startswith("slow step")
    job.close()  # Cancel: returns at once although the call is still blocked
    assert not release.is_set()
    release.set()


def test_result_and_errors_come_back():
    assert run(in_thread(lambda a, b=0: a + b, 2, b=3, interval=0.01)) == 5

    def boom():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run(in_thread(boom, interval=0.01))
