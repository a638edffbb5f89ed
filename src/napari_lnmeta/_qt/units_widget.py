"""The "Pixel size" widget: set the µm/px of any layer, or give a slide's to its masks.

The GUI's ``--mpp``: a slide whose file does not say its pixel size (the CAMELYON16
level-5 TIFF, a PNG or JPEG) opens in pixels, beside OME-TIFFs in µm. Choose the layer,
type its µm/px, *Set*; the other widgets then re-open that slide with it. *Apply to
masks & annotations* places every layer still in pixels over the chosen slide (see
:mod:`napari_lnmeta._napari.units`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..errors import LnmetaError
from .worker import float_spin

if TYPE_CHECKING:
    import napari


class PixelSizeWidget(QWidget):
    """Set µm/px of a layer; apply a slide's µm/px to its masks and annotations."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.layer_combo = QComboBox()
        self.mpp = float_spin(0.0, 10000.0, 0.0, decimals=4, step=0.01, special="unknown",
                              suffix=" µm/px")
        self.set_button = QPushButton("Set")
        self.apply_button = QPushButton("Apply to masks && annotations in pixels")
        self.info = QLabel("")
        self.info.setWordWrap(True)
        hint = QLabel("µm per pixel: level 0 for slides and results, the layer's own "
                      "pixels otherwise. Apply gives the chosen slide's µm/px to the "
                      "layers still in pixels (a mask covering the slide, polygons and "
                      "points in its level-0 pixels).")
        hint.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Layer", self.layer_combo)
        form.addRow("Pixel size", self.mpp)
        lay = QVBoxLayout(self)
        lay.addWidget(hint)
        lay.addLayout(form)
        lay.addWidget(self.set_button)
        lay.addWidget(self.apply_button)
        lay.addWidget(self.info)
        lay.addStretch(1)
        self.set_button.clicked.connect(self.set_pixel_size)
        self.apply_button.clicked.connect(self.apply_to_others)
        self.layer_combo.currentTextChanged.connect(self._layer_changed)
        self._events = (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                        self.viewer.layers.events.changed)
        for ev in self._events:
            ev.connect(self._refresh)
        self._refresh()

    def closeEvent(self, event):  # noqa: N802 - Qt
        for ev in self._events:
            ev.disconnect(self._refresh)
        super().closeEvent(event)

    def _refresh(self, *_):
        cur = self.layer_combo.currentText()
        names = [ly.name for ly in self.viewer.layers]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if cur in names:
            self.layer_combo.setCurrentText(cur)
        elif names:
            sel = self.viewer.layers.selection.active
            self.layer_combo.setCurrentText(sel.name if sel is not None else names[-1])
        self.layer_combo.blockSignals(False)
        self._layer_changed(self.layer_combo.currentText())

    def _layer(self):
        name = self.layer_combo.currentText()
        for ly in self.viewer.layers:
            if ly.name == name:
                return ly
        return None

    def _layer_changed(self, _name: str) -> None:
        from .._napari.units import layer_mpp

        ly = self._layer()
        if ly is None:
            self.info.setText("open a slide or a mask first")
            return
        mpp = layer_mpp(ly)
        self.mpp.setValue(mpp or 0.0)
        self.info.setText(f"{ly.name}: " + (f"{mpp:g} µm/px" if mpp else "in pixels"))

    def set_pixel_size(self) -> None:
        from napari.utils.notifications import show_error

        from .._napari.units import set_layer_mpp

        ly = self._layer()
        try:
            if ly is None:
                raise LnmetaError("open a slide or a mask first")
            set_layer_mpp(ly, self.mpp.value())
        except LnmetaError as e:
            show_error(str(e))
            self.info.setText(f"error: {e}")
            return
        self.info.setText(f"{ly.name}: {self.mpp.value():g} µm/px")

    def apply_to_others(self) -> None:
        from napari.utils.notifications import show_error

        from .._napari.units import apply_slide_mpp

        ly = self._layer()
        try:
            if ly is None:
                raise LnmetaError("choose the slide whose µm/px the others take")
            placed = apply_slide_mpp(self.viewer, ly)
        except LnmetaError as e:
            show_error(str(e))
            self.info.setText(f"error: {e}")
            return
        self.info.setText(f"placed in µm over {ly.name}: {', '.join(placed) or 'nothing'}")
