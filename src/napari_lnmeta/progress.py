"""The progress protocol shared by the CLI, the widgets and the tests.

Long work is written as a generator that yields :class:`Progress` and *returns* its
result (stardist-napari's protocol). The same generator runs

* synchronously, through :func:`run`, in the CLI and in tests;
* inside ``napari.qt.threading.thread_worker`` in the GUI, where ``worker.quit()``
  cancels it at the next ``yield``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

Job = Generator["Progress", None, T]


@dataclass
class Progress:
    """One step of a long job.

    Parameters
    ----------
    done, total
        Units of work finished and planned (patches, tiles, slides, epochs...).
    message
        Short human-readable stage, e.g. ``"reading tiles"``.
    partial
        Optional intermediate result (e.g. a heatmap filling in) that a GUI may show.
    """

    done: int
    total: int
    message: str = ""
    partial: Any = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def relay(job: Job[T], step: Callable[[Any], Any] | None = None) -> Job[T]:
    """Run a sub-job inside another job: ``value = yield from relay(sub, step)``.

    Yields ``step(p)`` for every step ``p`` of ``sub`` (``p`` itself without ``step``;
    nothing when ``step`` returns ``None``) and returns what ``sub`` returns. Cancelling
    the outer job (``worker.quit()``, closing the generator) closes ``sub`` as well.
    """
    try:
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                return stop.value
            out = p if step is None else step(p)
            if out is not None:
                yield out
    finally:
        job.close()


def run(job: Job[T], callback: Callable[[Progress], Any] | None = None) -> T:
    """Drive a progress generator to completion and return what it returns."""
    while True:
        try:
            step = next(job)
        except StopIteration as stop:
            return stop.value
        if callback is not None and isinstance(step, Progress):
            callback(step)


class TextProgress:
    """A small stderr progress printer for the CLI (no extra dependency).

    ``TextProgress.open_line`` is true while a progress line waits for its newline, so a
    message printed next (an error) can start on a line of its own.
    """

    open_line = False

    def __init__(self, stream=None, min_interval: float = 0.5):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last = 0.0
        self._t0 = time.perf_counter()

    def __call__(self, p: Progress) -> None:
        now = time.perf_counter()
        final = p.total and p.done >= p.total
        if not final and now - self._last < self.min_interval:
            return
        self._last = now
        pct = f"{100 * p.fraction:5.1f}%" if p.total else "     "
        self.stream.write(f"\r{pct} {p.done}/{p.total} {p.message} [{now - self._t0:.1f}s]")
        if final:
            self.stream.write("\n")
        TextProgress.open_line = not final
        self.stream.flush()


def in_thread(fn: Callable[..., T], *args: Any, message: str = "", interval: float = 0.2,
              beat: Progress | None = None, executor: Any = None, **kwargs: Any) -> Job[T]:
    """Run a long call that cannot yield (one NumPy/SciPy step) so that its job still can.

    ``fn(*args, **kwargs)`` runs in a daemon thread; meanwhile this generator yields a
    ``Progress(0, 0, "<message> <seconds> s")`` heartbeat every ``interval`` seconds and
    finally returns ``fn``'s result (or raises its exception). A GUI that cancels at a
    ``yield`` is thus answered within ``interval``, whatever ``fn`` is doing: the call
    finishes in the background and its result is dropped.

    With ``beat``, the heartbeats are that ``Progress`` (e.g. the patches done so far, so
    that a progress bar does not flicker) and nothing is yielded before the first
    ``interval`` has passed: cheap enough to wrap every batch of a loop.

    With ``executor`` (a ``concurrent.futures`` executor), ``fn`` runs there instead of
    in a new thread: a loop whose every step calls into torch on the CPU keeps one
    thread (and its OpenMP team, which each new thread would build again).
    """
    from concurrent.futures import Future, wait

    if executor is not None:
        fut = executor.submit(fn, *args, **kwargs)
    else:  # a daemon thread of its own: a cancelled call never holds up the exit
        import threading

        fut = Future()

        def target() -> None:
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the job's caller below
                fut.set_exception(e)

        threading.Thread(target=target, name=f"lnmeta:{message or fn.__name__}",
                         daemon=True).start()
    t0 = time.perf_counter()
    if beat is None:
        yield Progress(0, 0, message)
    while not wait([fut], timeout=interval).done:
        yield beat if beat is not None else Progress(
            0, 0, f"{message} {time.perf_counter() - t0:.0f} s".strip())
    return fut.result()
