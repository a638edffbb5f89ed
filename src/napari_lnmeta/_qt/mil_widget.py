"""The "Slide-level MIL" widget: slide probability, attention heatmap and top patches.

The computing is :func:`napari_lnmeta.core.mil.predict_slide_job` (features from the
model's backbone, cached; bags; attention over every patch). The widget collects a
:class:`~napari_lnmeta.core.mil.MILInferenceConfig` and the clinical values, runs one job
over the chosen slide layers through a :class:`~napari_lnmeta._qt.worker.JobPanel`
(progress + Cancel), and then, per slide:

* shows the class probabilities;
* pushes ``<slide> MIL attention``, an Image layer on the patch grid's frame (one cell
  per stride, via :func:`~napari_lnmeta._napari.layers.frame_kwargs`), so every cell lies
  on its patch;
* fills a gallery with the top-attended patches; clicking one centres the view on it.

Clinical values: when the model fuses clinical data, a small form is built from the
model's clinical schema (a number field per numeric column, a drop-down of the training
categories per categorical column), or "Load CSV…" takes each slide's row from a CSV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._napari.layers import slide_layer_names, viewer_camera
from ..errors import InputError, LnmetaError
from ..models.io import device_choices
from .base import DockWidget, WrapLabel
from .worker import JobPanel, int_spin

if TYPE_CHECKING:
    import napari

    from ..core.mil import MILInferenceConfig, MILResult
    from ..models.mil import MILInfo

ATTENTION_SUFFIX = " MIL attention"
ICON_SIZE = 96


@dataclass
class MILSession:
    """State of one widget: the model's metadata, the clinical CSV, the last results."""

    info: MILInfo | None = None
    model_path: str | None = None
    clinical_csv: str | None = None
    results: dict[str, MILResult] = field(default_factory=dict)
    patches: dict[str, np.ndarray] = field(default_factory=dict)
    shown: str | None = None


def attention_layer_data(result: MILResult, *, opacity: float = 0.6) -> tuple[Any, dict, str]:
    """Image layer tuple of a MIL attention heatmap, placed on its slide."""
    from .._napari.layers import frame_kwargs

    kw = frame_kwargs(result.frame)
    kw["metadata"]["lnmeta"].update(mil={"classes": result.classes,
                                         "probabilities": [float(p) for p in result.probabilities],
                                         "backbone": result.backbone})
    kw.update(name=f"{result.slide}{ATTENTION_SUFFIX}", colormap="inferno",
              contrast_limits=(0.0, 1.0), opacity=float(opacity), blending="additive",
              interpolation2d="nearest")
    return result.heatmap, kw, "image"


class MILWidget(DockWidget):
    """Slide-level MIL on slide layers (see module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = MILSession()

        self.slide_list = QListWidget()
        self.slide_list.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.slide_list.setMaximumHeight(90)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("MIL model .safetensors (lnmeta train-mil)")
        self.browse = QPushButton("…")
        self.browse.setMaximumWidth(30)
        self.model_info = WrapLabel("")
        self.model_info.setWordWrap(True)
        self.bags = int_spin(1, 10_000, 32)
        self.bag_size = int_spin(0, 100_000, special="model's")
        self.replace = QCheckBox("sample with replacement")
        self.device = QComboBox()
        self.device.addItems(device_choices())
        self.cache_dir = QLineEdit()
        self.cache_dir.setPlaceholderText("feature cache folder (default: user cache)")
        self.out_dir = QLineEdit()
        self.out_dir.setPlaceholderText("optional: write <slide>.mil/ results here")
        self.top_k = int_spin(1, 256, 12)

        self.clinical_box = QGroupBox("Clinical data")
        self.clinical_form = QFormLayout()
        self.clinical_fields: dict[str, QLineEdit | QComboBox] = {}
        self.csv_button = QPushButton("Load CSV…")
        self.csv_label = QLabel("")
        self.csv_label.setWordWrap(True)
        cl = QVBoxLayout(self.clinical_box)
        cl.addLayout(self.clinical_form)
        row = QHBoxLayout()
        row.addWidget(self.csv_button)
        row.addWidget(self.csv_label, 1)
        cl.addLayout(row)
        self.clinical_box.setVisible(False)

        self.panel = JobPanel("Run MIL")
        self.scores = QLabel("")
        self.scores.setWordWrap(True)
        self.scores.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.gallery = QListWidget()
        self.gallery.setViewMode(QListView.IconMode)
        self.gallery.setIconSize(QSize(ICON_SIZE, ICON_SIZE))
        self.gallery.setResizeMode(QListView.Adjust)
        self.gallery.setMovement(QListView.Static)
        self.gallery.setMinimumHeight(ICON_SIZE + 40)

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_path)
        model_row.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("Slides", self.slide_list)
        form.addRow("Model", model_row)
        form.addRow("", self.model_info)
        form.addRow("Bags (M)", self.bags)
        form.addRow("Bag size (N)", self.bag_size)
        form.addRow("", self.replace)
        form.addRow("Device", self.device)
        form.addRow("Feature cache", self.cache_dir)
        form.addRow("Output folder", self.out_dir)
        form.addRow("Top patches", self.top_k)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.clinical_box)
        lay.addWidget(self.panel)
        lay.addWidget(self.scores)
        lay.addWidget(QLabel("Top-attended patches (click to go there)"))
        lay.addWidget(self.gallery)
        lay.addStretch(1)

        self.model_path.editingFinished.connect(self.load_model_info)
        self.browse.clicked.connect(self._browse)
        self.csv_button.clicked.connect(self._csv_dialog)
        self.panel.run_button.clicked.connect(self.run)
        self.gallery.itemClicked.connect(self._go_to_patch)
        self.listen(self.viewer.layers.events.inserted, self._refresh_slides)
        self.listen(self.viewer.layers.events.removed, self._refresh_slides)
        self.listen(self.viewer.layers.events.changed, self._refresh_slides)
        self._refresh_slides()

    # -- inputs ----------------------------------------------------------------------------
    def _refresh_slides(self, *_):

        selected = {it.text() for it in self.slide_list.selectedItems()}
        names = slide_layer_names(self.viewer)
        self.slide_list.blockSignals(True)
        self.slide_list.clear()
        for n in names:
            it = QListWidgetItem(n)
            self.slide_list.addItem(it)
            it.setSelected(n in selected)
        if not self.slide_list.selectedItems() and self.slide_list.count():
            self.slide_list.item(0).setSelected(True)
        self.slide_list.blockSignals(False)

    def selected_slide_names(self) -> list[str]:
        return [it.text() for it in self.slide_list.selectedItems()]

    def _browse(self):
        path, _ = QFileDialog.getOpenFileName(self, "MIL model", "",
                                              "safetensors (*.safetensors);;All files (*)")
        if path:
            self.model_path.setText(path)
            self.load_model_info()

    def load_model_info(self) -> MILInfo | None:
        """Read the model header: show what it is and build the clinical form."""
        from ..models.mil import read_mil_info

        path = self.model_path.text().strip()
        self.session.info = None
        if not path:
            self.model_info.setText("")
            self._build_clinical_form(None)
            return None
        try:
            info = read_mil_info(path)
        except LnmetaError as e:
            self.model_info.setText(str(e))
            self._build_clinical_form(None)
            return None
        self.session.info, self.session.model_path = info, path
        b = info.backbone
        clin = f"; clinical: {', '.join(info.clinical.columns)}" if info.clinical else ""
        self.model_info.setText(
            f"{info.config.pooling} MIL, classes {', '.join(info.classes)}; backbone {b.name} "
            f"({b.feature_dim}-d, {b.patch_size} px"
            f"{f' at {b.mpp:g} µm/px' if b.mpp else ''}); bags of {info.bag_size}{clin}")
        self._build_clinical_form(info)
        return info

    def _build_clinical_form(self, info: MILInfo | None) -> None:
        while self.clinical_form.rowCount():
            self.clinical_form.removeRow(0)
        self.clinical_fields = {}
        enc = info.clinical if info is not None else None
        self.clinical_box.setVisible(enc is not None)
        if enc is None:
            return
        for col, (mean, _sd) in enc.numeric.items():
            w = QLineEdit()
            w.setPlaceholderText(f"number (training mean {mean:.3g})")
            self.clinical_fields[col] = w
            self.clinical_form.addRow(col, w)
        for col, cats in enc.categorical.items():
            w = QComboBox()
            w.addItems([""] + list(cats))
            self.clinical_fields[col] = w
            self.clinical_form.addRow(col, w)

    def set_clinical(self, values: dict[str, Any]) -> None:
        """Fill the form (values missing from the dict are left as they are)."""
        for col, w in self.clinical_fields.items():
            if col not in values:
                continue
            v = str(values[col])
            if isinstance(w, QComboBox):
                i = w.findText(v)
                if i < 0:
                    raise InputError(f"clinical {col}={v!r} is not a category the model "
                                     f"knows ({', '.join(w.itemText(k) for k in range(1, w.count()))})")
                w.setCurrentIndex(i)
            else:
                w.setText(v)

    def form_values(self) -> dict[str, str]:
        return {col: (w.currentText() if isinstance(w, QComboBox) else w.text()).strip()
                for col, w in self.clinical_fields.items()}

    def _csv_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Clinical CSV", "",
                                              "CSV (*.csv *.tsv *.txt);;All files (*)")
        if path:
            self.load_clinical_csv(path)

    def load_clinical_csv(self, path: str | Path | None) -> None:
        """Use a CSV's rows (one per slide) instead of the form; ``None`` goes back to the form."""
        from napari.utils.notifications import show_error

        from ..models.clinical import clinical_row

        self.session.clinical_csv = None if path is None else str(path)
        self.csv_label.setText("" if path is None else f"rows from {Path(path).name}")
        names = self.selected_slide_names()
        if path is not None and names:
            try:  # show the first slide's row in the form
                self.set_clinical(clinical_row(path, names[0]))
            except LnmetaError as e:
                show_error(str(e))
                self.csv_label.setText(f"error: {e}")

    def clinical_for(self, slide_name: str) -> dict[str, Any] | None:
        """The clinical values of a slide: its CSV row, or the form."""
        from ..models.clinical import clinical_row

        info = self.session.info
        if info is None or info.clinical is None:
            return None
        if self.session.clinical_csv:
            return clinical_row(self.session.clinical_csv, slide_name)
        return self.form_values()

    def config(self) -> MILInferenceConfig:
        from ..core.mil import MILInferenceConfig

        return MILInferenceConfig(bags=self.bags.value(), bag_size=self.bag_size.value() or None,
                                  replace=self.replace.isChecked(),
                                  device=self.device.currentText(),
                                  top_k=self.top_k.value(),
                                  cache_dir=self.cache_dir.text().strip() or None)

    # -- run -------------------------------------------------------------------------------
    def run(self):
        """Start a run over the selected slides (Run button or a test)."""
        from napari.utils.notifications import show_error

        from .._napari.layers import slide_from_layer

        try:
            info = self.session.info or self.load_model_info()
            if info is None:
                raise InputError(self.model_info.text() or "choose a MIL model file")
            names = self.selected_slide_names()
            if not names:
                raise InputError("open a slide and select it in the list")
            jobs = []
            for n in names:
                slide = slide_from_layer(self.viewer.layers[n])
                clinical = self.clinical_for(slide.name)
                if clinical is not None:  # fail now, in the GUI thread, with a clear message
                    info.clinical.transform(clinical, name=n, source=self.session.clinical_csv
                                            or "clinical form")
                jobs.append((n, slide, clinical))
            cfg = self.config()
            out = self.out_dir.text().strip() or None
        except LnmetaError as e:
            show_error(str(e))
            self.panel.status.setText(f"error: {e}")
            return None
        model_path = self.session.model_path
        names = [n for n, _, _ in jobs]

        def job():
            from ..core.mil import predict_slides_job

            done = yield from predict_slides_job(
                [s for _, s, _ in jobs], model_path, config=cfg,
                clinical=[c for _, _, c in jobs], out_dir=out, overwrite=True, names=names)
            return [(n, res, patches) for n, (res, patches) in zip(names, done, strict=True)]

        self.scores.setText("")
        return self.panel.start(job, on_returned=self._on_results)

    def _on_results(self, done: list[tuple[str, MILResult, np.ndarray]]) -> None:
        from .._napari.layers import add_or_update

        lines = []
        for name, res, patches in done:
            self.session.results[name] = res
            self.session.patches[name] = patches
            data, kw, kind = attention_layer_data(res)
            add_or_update(self.viewer, data, kw, kind)
            probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(res.classes, res.probabilities,
                                                             strict=True))
            sd = float(res.bag_probabilities[:, -1].std())
            lines.append(f"<b>{name}</b>: {res.predicted} — {probs} "
                         f"(over {len(res.bag_probabilities)} bags of {res.bag_size}, "
                         f"SD {sd:.3f}; {len(res.instances)} patches)")
            lines += [f"<i>note: {n}</i>" for n in res.extra.get("notes") or []]
        self.scores.setText("<br>".join(lines))
        if done:
            self.show_gallery(done[-1][0])

    # -- gallery ---------------------------------------------------------------------------
    def show_gallery(self, name: str) -> None:
        """Fill the gallery with the top-attended patches of slide ``name``."""
        res, patches = self.session.results[name], self.session.patches[name]
        self.gallery.clear()
        self.session.shown = name
        for rank, (i, patch) in enumerate(zip(res.top(len(patches)), patches, strict=True)):
            img = np.ascontiguousarray(patch)
            h, w = img.shape[:2]
            qimg = QImage(img.data, w, h, 3 * w, QImage.Format_RGB888).copy()
            pix = QPixmap.fromImage(qimg).scaled(ICON_SIZE, ICON_SIZE, Qt.KeepAspectRatio,
                                                 Qt.FastTransformation)
            att = float(res.patch_attention[i])
            it = QListWidgetItem(QIcon(pix), f"#{rank + 1} {att:.2f}")
            y, x = (int(v) for v in res.grid.coords[i])
            it.setToolTip(f"attention {att:.3f} (relative to the top patch)\n"
                          f"level-0 (row, col) = ({y}, {x})")
            it.setData(Qt.UserRole, int(i))
            self.gallery.addItem(it)

    def _go_to_patch(self, item: QListWidgetItem) -> None:
        name = self.session.shown
        if name is None:
            return
        res = self.session.results[name]
        i = int(item.data(Qt.UserRole))
        centre = res.grid.coords[i] + (res.grid.size0 - 1) / 2
        if name in self.viewer.layers:
            world = self.viewer.layers[name].data_to_world(tuple(centre))
            viewer_camera(self.viewer).center = tuple(world)[-2:]

