"""The "Evaluate" widget: CAMELYON16 FROC / slide AUC in napari, and Grad-CAM of the view.

Evaluation (the computing is :mod:`napari_lnmeta.core.froc`, run through one
:class:`~napari_lnmeta._qt.worker.JobPanel`):

* **current slide**: a Points layer of detections (lesion candidates, with a
  ``probability`` feature) against a ground-truth Labels layer (non-zero = tumour) or
  Shapes layer (polygons), or "tumour-free slide";
* **folders**: a prediction folder and a ground-truth folder, as ``lnmeta
  evaluate-slides`` (optionally writing the same report folder).

Results: the FROC score and slide AUC, a *Slides* table, a *Detections* table (clicking a
row centres the view on that detection and selects it in the ``Evaluation: detections``
Points layer, coloured TP green, FP red, duplicate orange, ITC grey), the evaluation
regions as a Labels layer (``Evaluation: regions``), and the ROC and FROC plots.

Explain: Grad-CAM (seed 001) of the slide area in view with the bundled model or a model
file, added as the ``Grad-CAM`` Image layer placed exactly over the slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .._napari.evaluation_layers import (
    check_units,
    detection_probabilities,
    level0_points,
    slide_shape,
    truth_from_layer,
)
from .._napari.layers import layer_kind, slide_layer_names, view_box, viewer_camera
from ..errors import InputError, LnmetaError
from .base import DockWidget
from .worker import JobPanel, float_spin, int_spin

if TYPE_CHECKING:
    import napari

    from ..core.froc import EvaluationReport, FrocConfig, SlideResult

MODE_LAYERS = "current slide (layers)"
MODE_FOLDERS = "folders"
NO_TRUTH = "(none: tumour-free slide)"
BUNDLED = "bundled model"
FROM_FILE = "model file…"
DETECTIONS_LAYER = "Evaluation: detections"
REGIONS_LAYER = "Evaluation: regions"
GRADCAM_LAYER = "Grad-CAM"
#: face colours of detections by outcome
OUTCOME_COLORS = {"TP": "#00c000", "FP": "#ff2020", "duplicate": "#ff9900", "ITC": "#a0a0a0"}
DETECTION_HEADERS = ("#", "probability", "outcome", "row", "col", "region")
SLIDE_HEADERS = ("slide", "status", "label", "score", "tumours", "hits", "fp", "sensitivity",
                 "reason")


@dataclass
class EvaluateSession:
    """State of one widget: the last report, the slide whose detections are shown."""

    report: EvaluationReport | None = None
    shown: SlideResult | None = None
    gradcam: dict[str, Any] = field(default_factory=dict)


class EvaluateWidget(DockWidget):
    """Evaluate detections (FROC, slide AUC) and explain the view (see module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = EvaluateSession()

        # -- evaluation inputs ------------------------------------------------------------
        self.mode = QComboBox()
        self.mode.addItems([MODE_LAYERS, MODE_FOLDERS])
        self.pred_combo = QComboBox()
        self.truth_combo = QComboBox()
        self.pred_dir = QLineEdit()
        self.pred_dir.setPlaceholderText("folder of lnmeta predictions / <slide>.geojson")
        self.truth_dir = QLineEdit()
        self.truth_dir.setPlaceholderText("folder of XML / JSON / GeoJSON / mask files")
        self.negatives = QLineEdit()
        self.negatives.setPlaceholderText("tumour-free slides: names or a list file")
        self.out_dir = QLineEdit()
        self.out_dir.setPlaceholderText("optional: write the report folder here")
        self.lesions = QComboBox()
        self.lesions.addItems(["file", "nms", "components"])
        self.dilation = float_spin(0.0, 1000.0, 75.0, suffix=" µm")
        self.itc = float_spin(0.0, 5000.0, 200.0, suffix=" µm")
        self.truth_scale = float_spin(0.00001, 100000.0, 1.0, decimals=5, step=0.5)
        self.truth_scale.setToolTip(
            "slide pixels per ground-truth pixel of polygon files (as --truth-scale): "
            "0.03125 (1/32) for CAMELYON16 level-0 polygons against a level-5 slide. "
            "For layers, place them with the Pixel size widget instead.")
        self.panel = JobPanel("Evaluate")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.slide_table = QTableWidget(0, len(SLIDE_HEADERS))
        self.slide_table.setHorizontalHeaderLabels(SLIDE_HEADERS)
        self.det_table = QTableWidget(0, len(DETECTION_HEADERS))
        self.det_table.setHorizontalHeaderLabels(DETECTION_HEADERS)
        for t in (self.slide_table, self.det_table):
            t.setEditTriggers(QAbstractItemView.NoEditTriggers)
            t.setSelectionBehavior(QAbstractItemView.SelectRows)
            t.setSelectionMode(QAbstractItemView.SingleSelection)
        self.roc_label = QLabel("slide-level ROC: needs tumour and normal slides")
        self.froc_label = QLabel("FROC: run an evaluation")
        for lab in (self.roc_label, self.froc_label):
            lab.setAlignment(Qt.AlignCenter)
            lab.setWordWrap(True)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.det_table, "Detections")
        self.tabs.addTab(self.slide_table, "Slides")
        self.tabs.addTab(self.froc_label, "FROC")
        self.tabs.addTab(self.roc_label, "ROC")

        pred_row, self._browse_pred = _with_browse(self.pred_dir)
        truth_row, self._browse_truth = _with_browse(self.truth_dir)
        out_row, self._browse_out = _with_browse(self.out_dir)
        form = QFormLayout()
        form.addRow("Source", self.mode)
        form.addRow("Detections", self.pred_combo)
        form.addRow("Ground truth", self.truth_combo)
        form.addRow("Predictions", pred_row)
        form.addRow("Truth folder", truth_row)
        form.addRow("Negatives", self.negatives)
        form.addRow("Report to", out_row)
        form.addRow("Lesions", self.lesions)
        form.addRow("Dilation", self.dilation)
        form.addRow("ITC below", self.itc)
        form.addRow("Truth scale", self.truth_scale)
        self._form = form
        box = QGroupBox("CAMELYON16 evaluation")
        blay = QVBoxLayout(box)
        blay.addLayout(form)
        blay.addWidget(self.panel)
        blay.addWidget(self.summary)
        blay.addWidget(self.tabs)

        # -- Grad-CAM ----------------------------------------------------------------------
        self.slide_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.addItems([BUNDLED, FROM_FILE])
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("path to a .safetensors patch model")
        self.max_patches = int_spin(1, 4096, 256)
        self.cam_opacity = float_spin(0.0, 1.0, 0.5, step=0.1)
        self.cam_panel = JobPanel("Grad-CAM of the view")
        self.cam_info = QLabel("")
        self.cam_info.setWordWrap(True)
        model_row, self._browse_model = _with_browse(self.model_path, file=True)
        cform = QFormLayout()
        cform.addRow("Slide", self.slide_combo)
        cform.addRow("Model", self.model_combo)
        cform.addRow("", model_row)
        cform.addRow("Max patches", self.max_patches)
        cform.addRow("Opacity", self.cam_opacity)
        cbox = QGroupBox("Explain (Grad-CAM)")
        clay = QVBoxLayout(cbox)
        clay.addLayout(cform)
        clay.addWidget(self.cam_panel)
        clay.addWidget(self.cam_info)

        lay = QVBoxLayout(self)
        lay.addWidget(box)
        lay.addWidget(cbox)
        lay.addStretch(1)

        self.mode.currentTextChanged.connect(self._mode_changed)
        self.panel.run_button.clicked.connect(self.run)
        self.cam_panel.run_button.clicked.connect(self.run_gradcam)
        self.det_table.cellClicked.connect(lambda r, _c: self.jump_to(r))
        self.slide_table.cellClicked.connect(lambda r, _c: self._slide_clicked(r))
        self.model_combo.currentTextChanged.connect(
            lambda t: self.model_path.setEnabled(t == FROM_FILE))
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                   self.viewer.layers.events.changed):
            self.listen(ev, self._refresh_layers)
        self._refresh_layers()
        self._mode_changed(self.mode.currentText())
        self.model_path.setEnabled(False)

    # -- inputs ----------------------------------------------------------------------------
    def _refresh_layers(self, *_):

        def fill(combo: QComboBox, names: list[str]):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if cur in names:
                combo.setCurrentText(cur)
            combo.blockSignals(False)

        own = {DETECTIONS_LAYER, REGIONS_LAYER, GRADCAM_LAYER}
        points = [ly.name for ly in self.viewer.layers
                  if layer_kind(ly) == "points" and ly.name not in own]
        truth = [ly.name for ly in self.viewer.layers
                 if layer_kind(ly) in ("labels", "shapes") and ly.name not in own]
        slides = slide_layer_names(self.viewer)
        fill(self.pred_combo, points)
        fill(self.truth_combo, truth + [NO_TRUTH])
        fill(self.slide_combo, slides)

    def _mode_changed(self, text: str):
        layers = text == MODE_LAYERS
        for w in (self.pred_combo, self.truth_combo):
            w.setEnabled(layers)
        for w in (self.pred_dir, self.truth_dir, self.negatives, self.out_dir, self.lesions,
                  self.truth_scale,
                  self._browse_pred, self._browse_truth, self._browse_out):
            w.setEnabled(not layers)

    def config(self) -> FrocConfig:
        from ..core.froc import FrocConfig

        # µm/px for detections that do not carry one (flat files): the open slide's
        return FrocConfig(dilation_um=self.dilation.value(), itc_um=self.itc.value(),
                          lesions=self.lesions.currentText(), n_boot=1000,
                          mpp=self._slide_mpp(), truth_scale=self.truth_scale.value())

    def _slide_layer(self):
        name = self.slide_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _slide_mpp(self) -> float | None:
        """Level-0 µm/px: the slide layer's, else the scale of a Points layer made by
        *Detect metastases* (level-0 points with ``scale = µm/px``), else unknown."""
        from .._napari.layers import META

        ly = self._slide_layer()
        if ly is not None and ly.metadata.get(META, {}).get("mpp"):
            return float(ly.metadata[META]["mpp"])
        name = self.pred_combo.currentText()
        if name in self.viewer.layers:
            pts = self.viewer.layers[name]
            if "lesions" in pts.metadata.get(META, {}) and float(pts.scale[-1]) != 1.0:
                return float(pts.scale[-1])
        return None

    def layer_inputs(self) -> dict[str, Any]:
        """Detections (level-0) and ground truth of the chosen layers, for the core job."""
        pname, tname = self.pred_combo.currentText(), self.truth_combo.currentText()
        if not pname or pname not in self.viewer.layers:
            raise InputError("choose a Points layer of detections (e.g. 'Lesion candidates' "
                             "from Detect metastases)")
        pts = self.viewer.layers[pname]
        mpp = self._slide_mpp()
        coords = level0_points(pts, mpp)
        prob = detection_probabilities(pts, len(coords))
        truth: Any = None
        slide = self._slide_layer()
        if tname and tname != NO_TRUTH:
            tl = self.viewer.layers[tname]
            if slide is not None:
                check_units(tl, slide)
            check_units(pts, slide if slide is not None else tl)
            truth = truth_from_layer(tl, mpp)
        shape = slide_shape(slide)
        return {"coords": coords, "probability": prob, "truth": truth, "slide_mpp": mpp,
                "slide": pname, "slide_shape": shape}

    # -- evaluation --------------------------------------------------------------------------
    def run(self):
        """Start an evaluation (Run button or a test)."""
        from napari.utils.notifications import show_error

        from ..core.froc import evaluate_folders_job, evaluate_slide_job

        try:
            cfg = self.config()
            if self.mode.currentText() == MODE_LAYERS:
                inp = self.layer_inputs()

                def make():
                    job = evaluate_slide_job(inp["coords"], inp["probability"], inp["truth"],
                                             slide=inp["slide"], slide_mpp=inp["slide_mpp"],
                                             slide_shape=inp["slide_shape"], config=cfg)
                    return _with_plots(job, None, ())
            else:
                pred, truth = self.pred_dir.text().strip(), self.truth_dir.text().strip()
                if not pred or not truth:
                    raise InputError("choose a prediction folder and a ground-truth folder")
                negs = self.negatives.text().strip() or None
                out = self.out_dir.text().strip() or None

                def make():
                    job = evaluate_folders_job(pred, truth, cfg, negatives=negs)
                    return _with_plots(job, out, (pred, truth))
        except LnmetaError as e:
            show_error(str(e))
            self.panel.status.setText(f"error: {e}")
            return None
        return self.panel.start(make, on_returned=lambda r: self.show_report(*r))

    def show_report(self, rep: EvaluationReport, plots: dict[str, bytes] | None = None) -> None:
        """Fill the summary, tables, plots and layers from a report."""
        plots = _plots(rep) if plots is None else plots
        self.session.report = rep
        parts = [f"{len(rep.slides)} slide(s) evaluated, {len(rep.skipped)} skipped"]
        if rep.froc:
            f = rep.froc
            parts.append(f"FROC score {f['score']:.3f} ({f['n_tumours']} lesions, "
                         f"{f['n_itc']} ITC regions ignored)")
        if rep.roc:
            r = rep.roc
            parts.append(f"slide AUC {r['AUC']:.3f} [{r['AUC_CI'][0]:.3f}, {r['AUC_CI'][1]:.3f}]")
        parts += rep.notes
        self.summary.setText("\n".join(parts))
        self._fill_slides(rep)
        self._set_plot(self.froc_label, plots.get("froc"),
                       "FROC: " + next((n for n in rep.notes if n.startswith("FROC")), "-"))
        self._set_plot(self.roc_label, plots.get("roc"),
                       next((n for n in rep.notes if "AUC" in n), "slide-level ROC: -"))
        if rep.slides:
            self.show_slide(self._default_slide(rep))
        else:
            self.det_table.setRowCount(0)

    def _default_slide(self, rep: EvaluationReport) -> SlideResult:
        from ..core.froc import slide_key

        ly = self._slide_layer()
        if ly is not None:
            from .._napari.layers import META

            key = slide_key(ly.metadata.get(META, {}).get("path") or ly.name)
            for r in rep.slides:
                if r.slide == key:
                    return r
        return rep.slides[0]

    def _fill_slides(self, rep: EvaluationReport) -> None:
        rows = rep.slide_rows()
        t = self.slide_table
        t.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, key in enumerate(SLIDE_HEADERS):
                v = row.get(key)
                text = "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
                t.setItem(i, j, QTableWidgetItem(text))
        t.resizeColumnsToContents()

    def _slide_clicked(self, row: int) -> None:
        rep = self.session.report
        if rep is not None and row < len(rep.slides):
            self.show_slide(rep.slides[row])
            self.tabs.setCurrentWidget(self.det_table)

    def show_slide(self, res: SlideResult) -> None:
        """Detections table and layers of one evaluated slide."""
        from .._napari.layers import add_or_update, frame_kwargs

        self.session.shown = res
        rows = res.detection_rows()
        t = self.det_table
        t.setRowCount(len(rows))
        for i, d in enumerate(rows):
            vals = (str(d["index"]), f"{d['probability']:.3f}", d["outcome"],
                    f"{d['row']:.0f}", f"{d['col']:.0f}", str(d["region"] or ""))
            for j, v in enumerate(vals):
                it = QTableWidgetItem(v)
                if j == 2:
                    it.setForeground(_qcolor(OUTCOME_COLORS.get(v, "#000000")))
                t.setItem(i, j, it)
        t.resizeColumnsToContents()
        mpp = res.slide_mpp
        scale = (mpp, mpp) if mpp else (1.0, 1.0)
        colors = [OUTCOME_COLORS.get(o, "#ffffff") for o in res.outcome]
        kw: dict[str, Any] = {
            "name": DETECTIONS_LAYER, "scale": scale,
            "size": 100.0 / mpp if mpp else 64.0,  # 100 µm markers, in level-0 px
            "face_color": colors if len(colors) else "white", "border_color": "black",
            "features": {"probability": res.probability.astype(np.float32),
                         "outcome": np.asarray(res.outcome, dtype=str)},
            "metadata": {"lnmeta": {"evaluation": {"slide": res.slide}}},
        }
        if mpp:
            kw["units"] = ("µm", "µm")
        data = np.asarray(res.coords, dtype=np.float64).reshape(-1, 2)
        if DETECTIONS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(DETECTIONS_LAYER)  # point count and colours change
        self.viewer.add_points(data, **kw)
        if res.regions is not None:
            rk = frame_kwargs(res.regions.frame)
            rk.update(name=REGIONS_LAYER, opacity=0.35)
            add_or_update(self.viewer, res.regions.labels, rk, "labels")
        elif REGIONS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(REGIONS_LAYER)

    def jump_to(self, row: int) -> None:
        """Centre the view on detection ``row`` of the shown slide and select it."""
        res = self.session.shown
        if res is None or not 0 <= row < len(res.coords) or \
                DETECTIONS_LAYER not in self.viewer.layers:
            return
        layer = self.viewer.layers[DETECTIONS_LAYER]
        world = layer.data_to_world(tuple(res.coords[row]))
        cam = viewer_camera(self.viewer)
        cam.center = tuple(float(v) for v in world)[-2:]
        # about 1 mm (or 2000 px) across the canvas, unless already zoomed in further
        unit_per_px = 1000.0 if res.slide_mpp else 2000.0
        want = 600.0 / unit_per_px
        if cam.zoom < want:
            cam.zoom = want
        self.viewer.layers.selection.active = layer
        layer.selected_data = {int(row)}
        self.det_table.selectRow(row)

    @staticmethod
    def _set_plot(label: QLabel, png: bytes | None, text: str) -> None:
        if not png:
            label.setPixmap(QPixmap())
            label.setText(text)
            return
        pix = QPixmap()
        pix.loadFromData(png, "PNG")
        label.setText("")
        label.setPixmap(pix)

    # -- Grad-CAM --------------------------------------------------------------------------
    def view_box(self) -> tuple[float, float, float, float]:
        """Level-0 ``(row0, col0, row1, col1)`` of the slide area in view."""
        ly = self._slide_layer()
        if ly is None:
            raise InputError("open a slide first (File > Open, or a sample)")
        return view_box(self.viewer, ly)

    def _model(self):
        from ..models.io import default_model_path, load_model

        if self.model_combo.currentText() == BUNDLED:
            path = default_model_path()
        else:
            path = self.model_path.text().strip()
            if not path:
                raise InputError("choose a model file (or the bundled model)")
        return load_model(path, device="cpu")

    def run_gradcam(self, box: tuple[float, float, float, float] | None = None):
        """Grad-CAM of ``box`` (level-0; default the view) as the ``Grad-CAM`` layer."""
        from napari.utils.notifications import show_error

        from .._napari.layers import slide_from_layer
        from ..core.gradcam import gradcam_region_job

        try:
            ly = self._slide_layer()
            if ly is None:
                raise InputError("open a slide first (File > Open, or a sample)")
            slide = slide_from_layer(ly)
            box = box if box else self.view_box()
            model, meta = self._model()
        except LnmetaError as e:
            show_error(str(e))
            self.cam_panel.status.setText(f"error: {e}")
            return None
        n = self.max_patches.value()
        return self.cam_panel.start(
            lambda: gradcam_region_job(slide, model, meta, box, max_patches=n),
            on_returned=self._show_gradcam)

    def _show_gradcam(self, out) -> None:
        from .._napari.layers import add_or_update, frame_kwargs

        cam, frame, info = out
        kw = frame_kwargs(frame)
        kw["metadata"]["lnmeta"]["gradcam"] = {"class": info["class"],
                                               "n_patches": info["n_patches"]}
        kw.update(name=GRADCAM_LAYER, colormap="inferno", contrast_limits=(0.0, 1.0),
                  opacity=float(self.cam_opacity.value()), blending="translucent")
        add_or_update(self.viewer, cam, kw, "image")
        self.session.gradcam = info
        p = info["probability"]
        self.cam_info.setText(
            f"{info['n_patches']} patches explained for class {info['class']!r}; "
            f"p({info['class']}) mean {float(p.mean()):.3f}, max {float(p.max()):.3f}"
            + "".join(f"\n{n}" for n in info["notes"]))


def _plots(rep: EvaluationReport) -> dict[str, bytes]:
    """FROC and ROC plots of a report as PNG bytes (those that are defined)."""
    from ..core.froc import froc_figure_png, roc_figure_png

    out = {}
    if rep.froc is not None:
        out["froc"] = froc_figure_png(rep.froc, dpi=80)
    if rep.roc is not None:
        out["roc"] = roc_figure_png(rep.slides, dpi=80)
    return out


def _with_plots(job, out: str | None, inputs):
    """Run an evaluation job, write the report folder when asked, render the plots (all
    in the worker thread); returns ``(report, plots)``."""
    from ..core.froc import write_report
    from ..progress import Progress

    rep = yield from job
    if out:
        yield Progress(1, 1, "writing the report")
        write_report(rep, out, overwrite=False, inputs=inputs)
    yield Progress(1, 1, "plots")
    return rep, _plots(rep)


def _qcolor(hex_: str):
    from qtpy.QtGui import QColor

    return QColor(hex_)


def _with_browse(edit: QLineEdit, *, file: bool = False) -> tuple[QWidget, QPushButton]:
    """A line edit with a "…" button that opens a folder (or file) dialog."""
    button = QPushButton("…")
    button.setMaximumWidth(30)

    def browse():
        if file:
            path, _ = QFileDialog.getOpenFileName(edit, "Choose a file", "",
                                                  "safetensors (*.safetensors);;All files (*)")
        else:
            path = QFileDialog.getExistingDirectory(edit, "Choose a folder")
        if path:
            edit.setText(str(Path(path)))

    button.clicked.connect(browse)
    row = QWidget()
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit)
    lay.addWidget(button)
    return row, button
