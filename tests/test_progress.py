"""The progress protocol: ``in_thread`` (a step that cannot yield still lets its job be
cancelled) and ``relay`` (a sub-job inside a job)."""

from __future__ import annotations

import threading

import pytest

from napari_lnmeta.progress import Progress, in_thread, relay, run


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


def test_relay_rescales_steps_returns_the_value_and_closes_the_sub_job():
    closed = []

    def sub():
        try:
            for k in range(3):
                yield Progress(k, 3, "sub")
            return "value"
        finally:
            closed.append(True)

    def outer():
        got = yield from relay(sub(), lambda p: Progress(10 + p.done, 13, f"outer: {p.message}"))
        return got.upper()

    seen = []
    assert run(outer(), seen.append) == "VALUE"
    assert [(p.done, p.total, p.message) for p in seen] == [(10, 13, "outer: sub"),
                                                            (11, 13, "outer: sub"),
                                                            (12, 13, "outer: sub")]
    assert list(relay(sub(), lambda p: None)) == []          # None: nothing relayed
    job = relay(sub())
    assert next(job).done == 0
    job.close()                                              # cancelling the outer job ...
    assert closed[-1] and len(closed) == 3                   # ... closes the sub-job


def test_an_executor_runs_every_call_on_its_one_thread_with_heartbeats():
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(1)
    release = threading.Event()
    names = []

    def step(k):
        names.append(threading.current_thread().name)
        release.wait(5)
        return k * 2

    job = in_thread(step, 21, interval=0.01, beat=Progress(3, 9, "inference"), executor=ex)
    beats = [next(job) for _ in range(3)]  # the call is still waiting: heartbeats come
    assert all(b.done == 3 and b.total == 9 for b in beats)
    release.set()
    with pytest.raises(StopIteration) as stop:
        while True:
            next(job)
    assert stop.value.value == 42
    assert run(in_thread(step, 5, executor=ex)) == 10
    assert len(set(names)) == 1 and names[0] != threading.current_thread().name

    def bad():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run(in_thread(bad, executor=ex))
    ex.shutdown()
