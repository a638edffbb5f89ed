"""The "Train patch classifier" widget: slides + Labels layers -> a patch classifier.

The user picks slide layers (opened by napari-lnmeta) and the Labels layers that mark
their tumour (drawn with napari's label editor, or transferred from IHC), chooses the
patch size, resolution and labelling rule, the backbone, the augmentation preset and the
epochs, and presses Train. The work is :func:`napari_lnmeta.train.pipeline.train_from_labels_job`
(Qt-free) in a thread worker through :class:`~napari_lnmeta._qt.worker.JobPanel`
(progress and Cancel); the loss curve is redrawn as a small PNG while it trains.
"Evaluate" scores a model on a held-out slide / labels pair.

Labels layer values are named by the "label names" field (``1=tumour, 2=fibrosis,
3=normal`` by default) unless the layer's metadata carries names.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import InputError
from ..progress import Progress
from .base import DockWidget
from .worker import JobPanel, float_spin, int_spin

if TYPE_CHECKING:
    import napari

    from ..io.annotations import LabelMask

NONE = "(none)"
DEFAULT_NAMES = "1=tumour, 2=fibrosis, 3=normal"


def parse_names(text: str) -> dict[int, str]:
    """``"1=tumour, 2=normal"`` -> ``{1: "tumour", 2: "normal"}``."""
    out: dict[int, str] = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise InputError(f"label names: expected VALUE=NAME, got {part.strip()!r}")
        k, v = part.split("=", 1)
        try:
            out[int(k)] = v.strip()
        except ValueError as e:
            raise InputError(f"label names: {k.strip()!r} is not an integer label") from e
    return out


def labels_from_layer(layer: napari.layers.Labels, slide_layer: napari.layers.Image,
                      names: dict[int, str]) -> LabelMask:
    """A napari Labels layer as a :class:`LabelMask` on the slide of ``slide_layer``.

    The frame comes from the layer's lnmeta metadata when it has one (transferred
    masks, saved results), else from its scale / translate relative to the slide layer
    (a layer drawn over the slide in napari).
    """
    from .._napari.layers import META
    from ..io.annotations import LabelMask
    from ..io.frame import SlideFrame

    data = layer.data
    if getattr(layer, "multiscale", False):
        levels = list(data)
        k = next((i for i, lv in enumerate(levels) if max(lv.shape[-2:]) <= 8192), len(levels) - 1)
        data = levels[k]
        level_ds = levels[0].shape[-1] / data.shape[-1]
    else:
        level_ds = 1.0
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise InputError(f"labels layer {layer.name!r}: expected a 2-D label image, got "
                         f"shape {arr.shape}")
    smeta = slide_layer.metadata.get(META, {})
    slide_shape = tuple(smeta.get("shape") or slide_layer.data[0].shape[:2])
    lmeta = layer.metadata.get(META, {})
    if "frame" in lmeta:
        fr = SlideFrame.from_json(lmeta["frame"])
        frame = SlideFrame(downsample=fr.downsample * level_ds, origin=fr.origin,
                           slide_mpp=fr.slide_mpp, slide=fr.slide,
                           slide_shape=fr.slide_shape or slide_shape)
    else:
        unit = float(slide_layer.scale[-1])
        d = float(layer.scale[-1]) / unit * level_ds
        origin = tuple(float(t) / unit - (d - 1) / 2 for t in layer.translate[-2:])
        frame = SlideFrame(downsample=d, origin=origin, slide_mpp=smeta.get("mpp"),
                           slide=smeta.get("path"), slide_shape=slide_shape)
    stored = lmeta.get("classes") or lmeta.get("names")
    if isinstance(stored, dict):
        names = {int(k): str(v) for k, v in stored.items()}
    elif isinstance(stored, list):
        names = {i + 1: str(v) for i, v in enumerate(stored)}
    present = [int(v) for v in np.unique(arr) if v != 0]
    names = {v: names.get(v, f"class_{v}") for v in sorted(set(present) | set(names))}
    lm = LabelMask(arr, frame, names, source=f"labels layer {layer.name!r}")
    lm.check_fits(slide_shape, slide_layer.name)
    if not present:
        raise InputError(f"labels layer {layer.name!r} is empty: paint the tumour (label 1) "
                         "with napari's label editor or transfer a mask from IHC first")
    return lm


@dataclass
class TrainSession:
    """What the widget has produced (one per widget/viewer)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)   # (slide layer, labels layer)
    result: Any = None           # TrainResult
    evaluation: Any = None       # EvalResult
    steps: list[tuple[float, float]] = field(default_factory=list)   # (epoch, loss)
    epochs: list[dict[str, Any]] = field(default_factory=list)


class TrainWidget(DockWidget):
    """Dock widget "Train patch classifier"."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from ..models.registry import list_architectures
        from ..train.augment import PRESETS

        self.viewer = napari_viewer
        self.session = TrainSession()

        # data
        self.slide_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.add_pair_button = QPushButton("Add pair")
        self.add_pair_button.clicked.connect(self.add_pair)
        self.remove_pair_button = QPushButton("Remove")
        self.remove_pair_button.clicked.connect(self._remove_pair)
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(70)
        self.val_slide_combo = QComboBox()
        self.val_labels_combo = QComboBox()
        self.names = QLineEdit(DEFAULT_NAMES)

        # patches
        self.patch_size = int_spin(8, 1024, 90)
        self.stride = int_spin(0, 1024, 0, special="= patch size")
        self.patch_mpp = float_spin(0.0, 100.0, 0.0, decimals=3, special="level 0")
        self.positive_min = float_spin(0.01, 0.99, 0.2, step=0.05)
        self.fibrosis = QCheckBox("fibrosis counts as tumour")

        # training
        self.arch = QComboBox()
        self.arch.addItems(list_architectures())
        self.arch.setCurrentText("resnet18")
        self.augment = QComboBox()
        self.augment.addItems(list(PRESETS))
        self.augment.setCurrentText("flips")
        self.epochs = int_spin(1, 1000, 10)
        self.batch_size = int_spin(1, 4096, 64)
        self.lr = float_spin(1e-6, 1.0, 1e-3, decimals=6, step=1e-4)
        self.init_path = QLineEdit()
        self.init_path.setPlaceholderText("optional: imagenet, uni, hf-hub:ORG/NAME, a folder "
                                          "or .safetensors")
        self.freeze = int_spin(0, 20)
        self.out_dir = QLineEdit(str(Path(tempfile.gettempdir()) / "lnmeta-train"))
        self.browse_button = QPushButton("…")
        self.browse_button.clicked.connect(self._browse_out)

        self.plot = QLabel("loss curve appears here while training")
        self.plot.setAlignment(Qt.AlignCenter)
        self.plot.setMinimumHeight(160)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.panel = JobPanel("Train")
        self.panel.run_button.clicked.connect(self.run_train)
        self.eval_button = QPushButton("Evaluate on held-out")
        self.eval_button.clicked.connect(self.run_evaluate)

        lay = QVBoxLayout(self)
        dbox = QGroupBox("Training data")
        df = QFormLayout(dbox)
        df.addRow("slide", self.slide_combo)
        df.addRow("labels", self.labels_combo)
        row = QHBoxLayout()
        row.addWidget(self.add_pair_button)
        row.addWidget(self.remove_pair_button)
        df.addRow(row)
        df.addRow(self.pair_list)
        df.addRow("label names", self.names)
        df.addRow("held-out slide", self.val_slide_combo)
        df.addRow("held-out labels", self.val_labels_combo)
        lay.addWidget(dbox)
        pbox = QGroupBox("Patches (seed 000 rule)")
        pf = QFormLayout(pbox)
        pf.addRow("patch size (px)", self.patch_size)
        pf.addRow("stride (px)", self.stride)
        pf.addRow("read at", self.patch_mpp)
        pf.addRow("tumour share >", self.positive_min)
        pf.addRow(self.fibrosis)
        lay.addWidget(pbox)
        tbox = QGroupBox("Model")
        tf = QFormLayout(tbox)
        tf.addRow("backbone", self.arch)
        tf.addRow("init weights", self.init_path)
        tf.addRow("freeze stages", self.freeze)
        tf.addRow("augmentation", self.augment)
        tf.addRow("epochs", self.epochs)
        tf.addRow("batch size", self.batch_size)
        tf.addRow("learning rate", self.lr)
        orow = QHBoxLayout()
        orow.addWidget(self.out_dir)
        orow.addWidget(self.browse_button)
        tf.addRow("save to", orow)
        lay.addWidget(tbox)
        lay.addWidget(self.panel)
        lay.addWidget(self.eval_button)
        lay.addWidget(self.plot)
        lay.addWidget(self.summary)
        lay.addStretch(1)

        self.listen(self.viewer.layers.events.inserted, self._refresh_layers)
        self.listen(self.viewer.layers.events.removed, self._refresh_layers)
        self._refresh_layers()

    # -- layers -------------------------------------------------------------------------
    def _refresh_layers(self, *_):
        from napari.layers import Image, Labels

        images = [ly.name for ly in self.viewer.layers if isinstance(ly, Image) and ly.rgb]
        labels = [ly.name for ly in self.viewer.layers if isinstance(ly, Labels)]
        for combo, names, optional in ((self.slide_combo, images, False),
                                       (self.labels_combo, labels, False),
                                       (self.val_slide_combo, images, True),
                                       (self.val_labels_combo, labels, True)):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(([NONE] if optional else []) + names)
            if cur in names or (optional and cur == NONE):
                combo.setCurrentText(cur)
            combo.blockSignals(False)

    def add_pair(self) -> None:
        s, lab = self.slide_combo.currentText(), self.labels_combo.currentText()
        if not s or not lab:
            raise InputError("choose a slide layer and a labels layer first")
        if (s, lab) not in self.session.pairs:
            self.session.pairs.append((s, lab))
            self.pair_list.addItem(f"{s}  ←  {lab}")

    def _remove_pair(self) -> None:
        row = self.pair_list.currentRow()
        if row >= 0:
            self.pair_list.takeItem(row)
            del self.session.pairs[row]

    def _browse_out(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Run folder", self.out_dir.text())
        if d:
            self.out_dir.setText(d)

    def _items(self, pairs: list[tuple[str, str]]) -> list[tuple[str, Any]]:
        from .._napari.layers import slide_from_layer

        names = parse_names(self.names.text())
        items = []
        for s, lab in pairs:
            if s not in self.viewer.layers or lab not in self.viewer.layers:
                raise InputError(f"layer {s!r} or {lab!r} is no longer in the viewer")
            slide_layer = self.viewer.layers[s]
            slide = slide_from_layer(slide_layer)
            items.append((slide, labels_from_layer(self.viewer.layers[lab], slide_layer, names)))
        return items

    # -- configs ------------------------------------------------------------------------
    def patch_config(self):
        from ..train.datasets import PatchConfig

        mpp = self.patch_mpp.value() or None
        return PatchConfig(patch_size=self.patch_size.value(), patch_mpp=mpp,
                           stride=self.stride.value() or None,
                           positive_min=self.positive_min.value(),
                           fibrosis_as_tumour=self.fibrosis.isChecked())

    def train_config(self):
        from ..models.backbones import architecture_for, is_named
        from ..train.loop import TrainConfig

        init = self.init_path.text().strip() or None
        return TrainConfig(architecture=architecture_for(init, self.arch.currentText()),
                           epochs=self.epochs.value(),
                           batch_size=self.batch_size.value(), lr=self.lr.value(),
                           augment=self.augment.currentText(), freeze=self.freeze.value(),
                           init=init,
                           normalise=("pretrained" if is_named(init) else
                                      "imagenet" if init else "dataset"),
                           sampler="balanced")

    # -- jobs ---------------------------------------------------------------------------
    def run_train(self) -> None:
        from ..errors import LnmetaError
        from ..train.pipeline import TrainingRequest, train_from_labels_job

        try:
            pairs = list(self.session.pairs) or [(self.slide_combo.currentText(),
                                                  self.labels_combo.currentText())]
            if not all(pairs[0]):
                raise InputError("open a slide and add a Labels layer with its tumour first")
            vs, vl = self.val_slide_combo.currentText(), self.val_labels_combo.currentText()
            val = [(vs, vl)] if vs not in ("", NONE) and vl not in ("", NONE) else []
            req = TrainingRequest(items=self._items(pairs), patches=self.patch_config(),
                                  train=self.train_config(), out_dir=Path(self.out_dir.text()),
                                  val_items=self._items(val))
        except LnmetaError as e:  # bad input, or a pretrained init missing from the cache
            self._error(e)
            return
        self.session.steps, self.session.epochs = [], []
        self.summary.setText("")
        self.panel.start(lambda: train_from_labels_job(req), on_yielded=self._on_progress,
                         on_returned=self._on_trained)

    def run_evaluate(self) -> None:
        from ..train.pipeline import evaluate_on_labels_job

        try:
            vs, vl = self.val_slide_combo.currentText(), self.val_labels_combo.currentText()
            if vs in ("", NONE) or vl in ("", NONE):
                raise InputError("choose a held-out slide and labels layer to evaluate on")
            model = self.session.result.last if self.session.result is not None else None
            if model is None:
                path, _ = QFileDialog.getOpenFileName(self, "Model", "", "Model (*.safetensors)")
                if not path:
                    return
                model = Path(path)
            items = self._items([(vs, vl)])
            cfg = self.patch_config()
        except InputError as e:
            self._error(e)
            return
        self.panel.start(lambda: evaluate_on_labels_job(model, items, cfg),
                         on_returned=self._on_evaluated)

    def _error(self, e: Exception) -> None:
        from napari.utils.notifications import show_error

        self.panel.status.setText(f"error: {e}")
        show_error(str(e))

    # -- callbacks (GUI thread) -----------------------------------------------------------
    def _on_progress(self, p: Progress) -> None:
        part = p.partial if isinstance(p.partial, dict) else None
        if not part:
            return
        if part.get("kind") == "step":
            self.session.steps.append((part["epoch_float"], part["loss"]))
            if len(self.session.steps) % 10 == 1:
                self.redraw()
        elif part.get("kind") == "epoch":
            self.session.epochs = list(part["history"])
            self.redraw()

    def redraw(self) -> None:
        """Render the loss curves (train steps, epoch means, validation) into the plot label."""
        from ..core.metrics import plot_curves

        hist = [{"epoch_float": e, "train_loss (step)": v} for e, v in self.session.steps]
        hist += [{"epoch": h["epoch"], **{k: h[k] for k in ("train_loss", "val_loss", "val_auc")
                                          if k in h and not _nan(h[k])}}
                 for h in self.session.epochs]
        png = plot_curves(hist, keys=("train_loss (step)", "train_loss", "val_loss", "val_auc"))
        pix = QPixmap()
        pix.loadFromData(png, "PNG")
        self.plot.setPixmap(pix)

    def _on_trained(self, result) -> None:
        self.session.result = result
        self.redraw()
        last = result.history[-1] if result.history else {}
        parts = [f"saved {result.last}", f"{result.steps} steps, "
                 f"{result.patches_per_second:.1f} patches/s"]
        parts += [f"{k} {v:.3f}" for k, v in last.items()
                  if isinstance(v, float) and k.startswith(("train_loss", "val_"))]
        self.summary.setText("\n".join(parts))

    def _on_evaluated(self, ev) -> None:
        self.session.evaluation = ev
        m = ev.metrics
        lines = [f"{k}: {m[k]:.3f}" for k in ("ACC", "SEN", "SPE", "F1_weighted", "AUC")
                 if k in m and isinstance(m[k], float)]
        if "AUC_CI" in m:
            lines.append(f"AUC 95% CI: [{m['AUC_CI'][0]:.3f}, {m['AUC_CI'][1]:.3f}]")
        self.summary.setText("\n".join(lines))


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


__all__ = ["TrainWidget", "labels_from_layer", "parse_names"]
