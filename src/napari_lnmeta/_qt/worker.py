"""One thin adapter between progress generators and the napari GUI.

A widget builds a generator (``core``'s protocol: yields :class:`Progress`, returns a
result), hands it to :class:`JobPanel.start`, and gets ``on_yielded`` /
``on_returned`` callbacks in the GUI thread. The panel owns the Run / Cancel buttons,
a progress bar and a status line; Cancel calls ``worker.quit()``, which stops the
generator at its next ``yield``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QHBoxLayout, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..progress import Progress


class JobPanel(QWidget):
    """Run / Cancel buttons, a progress bar and a status line for one long job at a time."""

    def __init__(self, run_text: str = "Run", parent: QWidget | None = None):
        super().__init__(parent)
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        from .base import WrapLabel

        self.status = WrapLabel("")
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(buttons)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        self.worker: GeneratorWorker | None = None
        self.cancel_button.clicked.connect(self.cancel)
        self.last_error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, make_job: Callable[[], Generator[Progress, None, Any]], *,
              on_returned: Callable[[Any], None] | None = None,
              on_yielded: Callable[[Progress], None] | None = None,
              on_finished: Callable[[], None] | None = None) -> GeneratorWorker:
        """Run ``make_job()`` in a thread worker and wire it to the panel."""
        if self.worker is not None:
            raise RuntimeError("a job is already running")

        def job():
            return (yield from make_job())

        # Errors go to ``errored`` (status line + notification) instead of being re-raised
        # in the GUI thread, where napari would treat them as uncaught.
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        self.last_error = None
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setRange(0, 0)  # busy until the job's first step says how far it is
        self.status.setText("starting…")
        self._clear_stale_errors()

        def yielded(p):
            if isinstance(p, Progress):
                if p.total:
                    self.bar.setRange(0, 1000)
                    self.bar.setValue(int(1000 * p.fraction))
                    self.status.setText(f"{p.message} {p.done}/{p.total}".strip())
                else:  # a step of unknown length: a busy bar that moves
                    self.bar.setRange(0, 0)
                    self.status.setText(p.message or "working…")
            if on_yielded is not None:
                on_yielded(p)

        def returned(value):
            self.bar.setRange(0, 1000)
            self.bar.setValue(1000)
            self.status.setText("done")
            if on_returned is not None:
                on_returned(value)

        def errored(exc):
            self.last_error = exc
            self.status.setText(f"error: {exc}")
            show_error(str(exc))

        def aborted():
            self.status.setText("cancelled")
            show_info("cancelled")

        def finished():
            self.worker = None
            if self.bar.maximum() == 0:
                self.bar.setRange(0, 1000)
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
            if on_finished is not None:
                on_finished()

        worker.yielded.connect(yielded)
        worker.returned.connect(returned)
        worker.errored.connect(errored)
        worker.aborted.connect(aborted)
        worker.finished.connect(finished)
        worker.start()
        return worker

    def _clear_stale_errors(self) -> None:
        """A new run starts: errors of earlier runs in this widget's other panels are stale."""
        from .base import DockWidget

        root = self.parentWidget()
        while root is not None and not isinstance(root, DockWidget):
            root = root.parentWidget()
        if root is None:
            return
        for panel in root.findChildren(JobPanel):
            if panel is not self and panel.status.text().startswith("error"):
                panel.status.setText("")
                panel.last_error = None

    def cancel(self) -> None:
        if self.worker is not None:
            self.status.setText("cancelling…")
            self.worker.quit()


def notify_error(panel: JobPanel, e: Exception) -> None:
    """Show a refused action (bad input before a job starts) in ``panel`` and napari."""
    panel.status.setText(f"error: {e}")
    show_error(str(e))


def int_spin(lo: int, hi: int, value: int | None = None, *, step: int | None = None,
             special: str | None = None, suffix: str | None = None):
    """A ``QSpinBox`` with range, value and the optional texts set in one call."""
    from qtpy.QtWidgets import QSpinBox

    return _setup(QSpinBox(), lo, hi, value, step=step, special=special, suffix=suffix)


def float_spin(lo: float, hi: float, value: float | None = None, *, decimals: int | None = None,
               step: float | None = None, special: str | None = None,
               suffix: str | None = None):
    """A ``QDoubleSpinBox``; ``decimals`` is applied first so that ``value`` is not rounded."""
    from qtpy.QtWidgets import QDoubleSpinBox

    box = QDoubleSpinBox()
    if decimals is not None:
        box.setDecimals(decimals)
    return _setup(box, lo, hi, value, step=step, special=special, suffix=suffix)


def _setup(box, lo, hi, value, *, step, special, suffix):
    box.setRange(lo, hi)
    if step is not None:
        box.setSingleStep(step)
    if value is not None:
        box.setValue(value)
    if special is not None:
        box.setSpecialValueText(special)
    if suffix is not None:
        box.setSuffix(suffix)
    return box
