"""The "Detect metastases" widget: whole-slide inference with live heatmap layers.

The computing is :func:`napari_lnmeta.core.predict.predict_job` (tissue-only patch grid,
parallel reads, model on CUDA or CPU, derived maps and lesions). This widget collects an
:class:`~napari_lnmeta.core.inference.InferenceConfig`, runs the job through one
:class:`~napari_lnmeta._qt.worker.JobPanel` (progress + Cancel), fills the heatmap layer
in while the run goes, then pushes (by name, re-used across runs):

* ``Tumour probability``: Image, transparent-to-red colour map (hover shows p);
* ``Tumour (p > 0.5)``: Labels, red (seed 000's binary map; hidden by default);
* ``Tumour tiers``: Labels, red > 0.9, green 0.7–0.9, blue 0.5–0.7 (seed 000), with its
  legend in the widget;
* ``Lesion candidates``: Points with their probabilities (seed 004's NMS); only the
  "Label top" most probable (default 10) carry their probability as text.

The heatmap shows napari's colour bar.

"Save results…" writes the same folder as ``lnmeta predict``.

Re-runs: while a run goes, its heatmap fills in a separate ``Tumour probability
(running)`` layer, so the layers of the last complete run stay as they were. When the
run returns, its four layers replace the previous four together (each carries the run
number in its metadata) and the running layer goes. A cancelled or failed run leaves
the earlier result and *Save results…* untouched and renames its partial heatmap
``Tumour probability (incomplete)``. The tissue mask is re-used when *Tissue & stain*
(or an earlier run) computed it with the same parameters in this napari session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import InputError, LnmetaError
from ..models.io import device_choices
from ..progress import Progress
from .base import DockWidget, WrapLabel
from .worker import JobPanel, float_spin, int_spin

if TYPE_CHECKING:
    import napari

    from ..core.inference import InferenceConfig
    from ..core.predict import Prediction
    from ..io.slide import Slide
    from ..models.io import ModelMeta

BUNDLED = "bundled model"
FROM_FILE = "model file…"
#: suffix of a heatmap layer left by a cancelled or failed run
INCOMPLETE = "(incomplete)"
#: suffix of the heatmap layer a run fills in while it goes
RUNNING = "(running)"


@dataclass
class PredictSession:
    """State of one widget: the slide it runs on, model metadata, the last prediction."""

    slide: Slide | None = None
    layer_name: str | None = None
    meta: ModelMeta | None = None
    meta_path: str | None = None
    prediction: Prediction | None = None
    partial_updates: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: int = 0


class PredictWidget(DockWidget):
    """Detect metastases: run a patch classifier over a slide layer (see module docstring)."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = PredictSession()
        self._returned = False

        self.slide_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.addItems([BUNDLED, FROM_FILE])
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("path to a .safetensors model")
        self.browse = QPushButton("…")
        self.browse.setMaximumWidth(30)
        self.model_info = WrapLabel("")
        self.model_info.setWordWrap(True)
        self.mpp = float_spin(0.0, 1000.0, decimals=3, special="level 0", suffix=" µm/px")
        self.patch = int_spin(8, 4096, 256, suffix=" px")
        self.stride = int_spin(0, 4096, special="= patch", suffix=" px")
        self.tta = QCheckBox("8-direction TTA")
        self.device = QComboBox()
        self.device.addItems(device_choices())
        self.batch = int_spin(0, 4096, special="auto")
        self.opacity = float_spin(0.0, 1.0, 0.7, step=0.1)
        self.lesion_threshold = float_spin(0.0, 1.0, 0.5, decimals=2, step=0.05)
        self.lesion_method = QComboBox()
        self.lesion_method.addItems(["nms", "components"])
        self.label_top = int_spin(0, 10_000, 10)
        self.label_top.setToolTip("write the probability beside this many of the most probable "
                                  "lesion candidates; the others are plain rings (hover shows "
                                  "their probability)")
        self.lesion_method.setToolTip("nms: non-maximum suppression within 200 µm (seed 004); "
                                      "components: one lesion per connected region above the "
                                      "threshold (CAMELYON16 winner)")
        self.panel = JobPanel("Detect metastases")
        self.save_button = QPushButton("Save results…")
        self.save_button.setEnabled(False)
        self.summary = WrapLabel("")
        from .._napari.prediction_layers import tier_legend_html

        self.tier_legend = WrapLabel(tier_legend_html())

        model_row = QHBoxLayout()
        model_row.addWidget(self.model_path)
        model_row.addWidget(self.browse)
        form = QFormLayout()
        form.addRow("Slide", self.slide_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", model_row)
        form.addRow("", self.model_info)
        form.addRow("Patch µm/px", self.mpp)
        form.addRow("Patch size", self.patch)
        form.addRow("Stride", self.stride)
        form.addRow("", self.tta)
        form.addRow("Device", self.device)
        form.addRow("Batch size", self.batch)
        form.addRow("Lesion threshold", self.lesion_threshold)
        form.addRow("Lesions by", self.lesion_method)
        form.addRow("Label top", self.label_top)
        form.addRow("Heatmap opacity", self.opacity)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.panel)
        lay.addWidget(self.save_button)
        lay.addWidget(self.tier_legend)
        lay.addWidget(self.summary)
        lay.addStretch(1)

        self.model_combo.currentTextChanged.connect(self._model_changed)
        self.model_path.editingFinished.connect(self.load_model_meta)
        self.browse.clicked.connect(self._browse)
        self.panel.run_button.clicked.connect(self.run)
        self.save_button.clicked.connect(self._save_dialog)
        self.opacity.valueChanged.connect(self._set_opacity)
        self.label_top.valueChanged.connect(self._relabel)
        self.listen(self.viewer.layers.events.inserted, self._refresh_slides)
        self.listen(self.viewer.layers.events.removed, self._refresh_slides)
        self.listen(self.viewer.layers.events.changed, self._refresh_slides)
        self._refresh_slides()
        self._model_changed(self.model_combo.currentText())

    # -- inputs ----------------------------------------------------------------------------
    def _refresh_slides(self, *_):
        from .._napari.layers import slide_layer_names

        current = self.slide_combo.currentText()
        names = slide_layer_names(self.viewer)
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)

    def _model_changed(self, text: str):
        from_file = text == FROM_FILE
        self.model_path.setEnabled(from_file)
        self.browse.setEnabled(from_file)
        self.load_model_meta()

    def _browse(self):
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "",
                                              "safetensors (*.safetensors);;All files (*)")
        if path:
            self.model_path.setText(path)
            self.load_model_meta()

    def model_file(self) -> str | None:
        """The chosen model file (``None`` for the bundled model)."""
        if self.model_combo.currentText() == BUNDLED:
            return None
        text = self.model_path.text().strip()
        if not text:
            raise InputError("choose a model file (or the bundled model)")
        return text

    def load_model_meta(self) -> ModelMeta | None:
        """Read the model's metadata (header only) and pre-fill µm/px and patch size."""
        from ..models.io import default_model_path, read_meta

        try:
            path = self.model_file() or str(default_model_path())
            meta = read_meta(path)
        except LnmetaError as e:
            self.session.meta = None
            self.model_info.setText(str(e))
            return None
        self.session.meta, self.session.meta_path = meta, path
        self.mpp.setValue(meta.mpp or 0.0)
        self.patch.setValue(meta.patch_size)
        self.model_info.setText(f"{meta.architecture}, classes {', '.join(meta.classes)}, "
                                f"{meta.patch_size} px at "
                                f"{meta.mpp if meta.mpp else '?'} µm/px")
        return meta

    def config(self) -> InferenceConfig:
        """The run parameters from the widget."""
        from ..core.inference import InferenceConfig

        meta = self.session.meta
        mpp = self.mpp.value() or None
        level = 0 if mpp is None else None
        # an unchanged, model-given µm/px is left to the engine (which copes with slides of
        # unknown µm/px); an edited one is passed on
        if meta is not None and mpp is not None and meta.mpp and abs(mpp - meta.mpp) < 1e-6:
            mpp, level = None, None
        return InferenceConfig(model=self.model_file(), patch_mpp=mpp, level=level,
                               patch_size=self.patch.value(), stride=self.stride.value() or None,
                               tta=self.tta.isChecked(), device=self.device.currentText(),
                               batch_size=self.batch.value(),
                               lesion_threshold=self.lesion_threshold.value(),
                               lesion_method=self.lesion_method.currentText())

    def selected_slide(self) -> Slide:
        from .._napari.layers import slide_from_layer

        name = self.slide_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("open a slide first (File > Open, or a sample)")
        if self.session.slide is None or self.session.layer_name != name:
            self.session.slide = slide_from_layer(self.viewer.layers[name])
            self.session.layer_name = name
        return self.session.slide

    # -- run -------------------------------------------------------------------------------
    def run(self):
        """Start a run (from the Run button or a test)."""
        from napari.utils.notifications import show_error

        from ..core.predict import predict_job

        try:
            slide = self.selected_slide()
            cfg = self.config()
            self.check(slide, cfg)
        except LnmetaError as e:
            show_error(str(e))
            self.panel.status.setText(f"error: {e}")
            return None
        from .._napari.prediction_layers import HEATMAP_LAYER

        for stale in (f"{HEATMAP_LAYER} {INCOMPLETE}", f"{HEATMAP_LAYER} {RUNNING}"):
            if stale in self.viewer.layers:
                self.viewer.layers.remove(stale)
        self.session.partial_updates = 0
        self.session.run_id += 1
        self._returned = False
        self.save_button.setEnabled(False)  # until this run returns, or fails / is cancelled
        self.summary.setText("running… (the layers of the last complete run stay until "
                             "this one returns)" if self.session.prediction is not None
                             else "")
        return self.panel.start(lambda: predict_job(slide, cfg), on_yielded=self._on_progress,
                                on_returned=self._on_result, on_finished=self._on_finished)

    def _on_finished(self):
        """A cancelled or failed run: its partial heatmap must not pass for a result, and
        the last complete result (layers, Save) stays as it was."""
        from .._napari.prediction_layers import HEATMAP_LAYER

        running = f"{HEATMAP_LAYER} {RUNNING}"
        if not self._returned:
            if running in self.viewer.layers:
                self.viewer.layers[running].name = f"{HEATMAP_LAYER} {INCOMPLETE}"
            if self.session.prediction is not None:
                self.save_button.setEnabled(True)
                self.summary.setText("run stopped; the layers and Save are the last complete "
                                     "run's")

    def check(self, slide: Slide, cfg: InferenceConfig) -> None:
        """Refuse a mismatched patch size / unknown tumour class before starting a run."""
        from ..core.inference import plan_read

        meta = self.load_model_meta() if self.session.meta is None else self.session.meta
        if meta is None:
            raise InputError(self.model_info.text() or "no usable model")
        plan_read(slide, meta, cfg, model_path=self.session.meta_path or "model")

    def _on_progress(self, p: Progress):
        if p.partial is None:
            return
        from .._napari.layers import add_or_update
        from .._napari.prediction_layers import HEATMAP_LAYER, heatmap_layer_data, show_colorbar

        data, kw, kind = heatmap_layer_data(p.partial.probability, p.partial.frame,
                                            opacity=self.opacity.value(),
                                            name=f"{HEATMAP_LAYER} {RUNNING}")
        show_colorbar(add_or_update(self.viewer, data, kw, kind))
        self.session.partial_updates += 1

    def _on_result(self, pred: Prediction):
        from .._napari.layers import META, add_or_update
        from .._napari.prediction_layers import HEATMAP_LAYER, prediction_layer_data, show_colorbar

        self._returned = True
        self.session.prediction = pred
        # the four layers of this run replace the previous run's together
        running = f"{HEATMAP_LAYER} {RUNNING}"
        if running in self.viewer.layers:
            self.viewer.layers.remove(running)
        for data, kw, kind in prediction_layer_data(pred, opacity=self.opacity.value(),
                                                    label_top=self.label_top.value()):
            kw.setdefault("metadata", {}).setdefault(META, {})["run"] = self.session.run_id
            layer = add_or_update(self.viewer, data, kw, kind)
            if kw.get("name") == HEATMAP_LAYER:
                show_colorbar(layer)
        self.save_button.setEnabled(True)
        s = pred.summary()
        t = s["timing"]
        rate = t.get("patches_per_s")
        self.summary.setText(
            f"slide score (max) {s['score']['max']:.3f}, top-{s['score']['top_k']} mean "
            f"{s['score']['top_k_mean']:.3f}; {s['counts']['patches']} patches, "
            f"{s['counts']['lesions']} lesion candidates; {t['total_s']:.1f} s"
            + (f" ({rate:.0f} patches/s)" if rate else "") + f" on {s['device']}"
            + ("".join(f"\nwarning: {w}" for w in s["warnings"])))
        self.session.history.append(s)

    def _relabel(self, top: int):
        from .._napari.prediction_layers import LESIONS_LAYER, relabel_lesions

        if LESIONS_LAYER in self.viewer.layers:
            relabel_lesions(self.viewer.layers[LESIONS_LAYER], int(top))

    def _set_opacity(self, value: float):
        from .._napari.prediction_layers import HEATMAP_LAYER

        if HEATMAP_LAYER in self.viewer.layers:
            self.viewer.layers[HEATMAP_LAYER].opacity = float(value)

    # -- save ------------------------------------------------------------------------------
    def _save_dialog(self):
        parent = QFileDialog.getExistingDirectory(self, "Save results in (a new sub-folder is made)")
        if parent and self.session.slide is not None:
            stem = self.session.slide.path.name.split(".")[0]
            self.save_results(Path(parent) / f"{stem}.lnmeta", overwrite=False)

    def save_results(self, out_dir: str | Path, *, overwrite: bool = False) -> Path | None:
        """Write the last prediction as a result folder (as ``lnmeta predict`` does)."""
        from napari.utils.notifications import show_error, show_info

        from ..core.predict import write_prediction

        if self.session.prediction is None:
            show_error("nothing to save: run the detection first")
            return None
        try:
            out = write_prediction(self.session.prediction, out_dir, overwrite=overwrite,
                                   slide=self.session.slide)
        except LnmetaError as e:
            show_error(str(e))
            return None
        show_info(f"saved {out}")
        return out

