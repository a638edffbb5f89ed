""""Batch" widget: submit a folder of slides to Dask and watch per-slide status."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, FileEdit, LineEdit, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..cohort import STEPS, load_cohort, parse_params, run_cohort_job
from .base import DockWidget
from .worker import JobPanel

if TYPE_CHECKING:
    import napari


class BatchWidget(DockWidget):
    """Pick a cohort (folder or CSV), a step and an output folder; runs on a LocalCluster."""

    COLUMNS = ("slide", "status", "seconds", "error")

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.cohort = FileEdit(mode="d", label="cohort folder")
        self.csv = FileEdit(mode="r", filter="*.csv", label="or cohort CSV")
        self.step = ComboBox(choices=sorted(STEPS), value="tissue", label="step")
        self.out = FileEdit(mode="d", label="output folder")
        self.params = LineEdit(value="", label="parameters",
                               tooltip="KEY=VALUE, comma separated (e.g. model=/path/m.safetensors)")
        self.workers = SpinBox(value=0, min=0, max=64, label="workers (0 = auto)")
        self.scheduler = LineEdit(value="", label="scheduler",
                                  tooltip="empty: a LocalCluster here; tcp://host:8786: a cluster")
        form = QFormLayout()
        for w in (self.cohort, self.csv, self.step, self.out, self.params, self.workers,
                  self.scheduler):
            form.addRow(w.label, w.native)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.dashboard = QLabel("")
        self.dashboard.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.panel = JobPanel("Run cohort")
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.panel)
        lay.addWidget(self.dashboard)
        lay.addWidget(self.table)
        self.panel.run_button.clicked.connect(self.start)
        self.report = None
        self._rows: dict[str, int] = {}

    def _source(self) -> str:
        csv = str(self.csv.value or "")
        if csv and csv != "." and Path(csv).is_file():
            return csv
        return str(self.cohort.value)

    def _params(self) -> dict:
        return parse_params(filter(None, (s.strip() for s in self.params.value.split(","))),
                            what="parameter")

    def start(self):
        items = load_cohort(self._source())
        self._rows = {}
        self.table.setRowCount(len(items))
        for i, it in enumerate(items):
            self._rows[it.id] = i
            self._set_row(i, {"slide": it.slide, "status": "failed" if it.error else "queued",
                              "error": it.error or ""})
        scheduler = self.scheduler.value.strip() or None

        def job():
            return (yield from run_cohort_job(items, self.step.value, self.out.value,
                                         params=self._params(), scheduler=scheduler,
                                         n_workers=self.workers.value or None,
                                         on_start=self._started))

        self.panel.start(job, on_yielded=self._progress, on_returned=self._finished)

    def _started(self, client):  # called from the worker thread: only store text
        self._dashboard_link = client.dashboard_link

    def _progress(self, p):
        link = getattr(self, "_dashboard_link", None)
        if link:
            self.dashboard.setText(f"Dask dashboard: {link}")
        rec = p.partial
        if rec and rec.get("id") in self._rows:
            self._set_row(self._rows[rec["id"]], rec)

    def _finished(self, report):
        self.report = report
        for rec in report.records:
            self._set_row(self._rows[rec["id"]], rec)

    def _set_row(self, row: int, rec: dict):
        for col, key in enumerate(self.COLUMNS):
            val = rec.get(key, "")
            self.table.setItem(row, col, QTableWidgetItem("" if val is None else str(val)))
