"""The "Register IHC" widget (IHC → H&E, seed 000).

All computing is in :mod:`napari_lnmeta.core.registration`; the widget picks layers, runs
jobs through one :class:`~._qt.worker.JobPanel` (progress + Cancel) and pushes layers with
:func:`~._napari.layers.add_or_update`:

* ``IHC registered``: the IHC resampled onto the H&E, lazily (multiscale, chunks are
  warped when napari draws them); its metadata carries the transform, which is how the
  "Transfer mask" widget (:mod:`napari_lnmeta._qt.transfer_widget`) finds it;
* ``Registration check``: a checkerboard of H&E / registered IHC, or their difference;
* ``Nudge: H&E points`` / ``Nudge: IHC points``: corresponding points for a manual fix.

Layer names and helpers: :mod:`napari_lnmeta._napari.registration_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from .._napari.registration_layers import (
    CHECK_LAYER,
    META,
    NUDGE_FIXED,
    NUDGE_MOVING,
    REGISTERED_LAYER,
    VIEW_SIZE,
    layer_slide,
    place_on_layer,
    rgb_image_layers,
    world_to_level0,
)
from ..errors import InputError
from .base import DockWidget
from .worker import JobPanel, int_spin, notify_error

if TYPE_CHECKING:
    import napari

    from ..core.registration import Transform
    from ..io.slide import Slide

# --------------------------------------------------------------------------------------
# Register IHC
# --------------------------------------------------------------------------------------
@dataclass
class RegistrationSession:
    """One registration per widget: the two slides, their layers and the transform."""

    fixed_layer: str | None = None
    moving_layer: str | None = None
    fixed: Slide | None = None
    moving: Slide | None = None
    transform: Transform | None = None


def default_threads() -> int:
    """The widget's default CPU threads: 1 on a machine with at most 4 cores (the GUI's
    threads share them; see docs/performance.md), else torch's own setting (0)."""
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if (n or 1) <= 4 else 0


class RegisterWidget(DockWidget):
    """Dock widget: register an IHC layer onto an H&E layer and judge the fit."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from ..core.registration import MODES

        self.viewer = napari_viewer
        self.session = RegistrationSession()
        self._check = None  # (transform, RegistrationCheck) of the last check images

        self.fixed_combo = QComboBox()
        self.moving_combo = QComboBox()
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.mode.setCurrentText("nonrigid")
        self.allow_flip = QCheckBox("try mirrored IHC (slide upside down)")
        self.allow_flip.setChecked(True)
        self.threads = int_spin(0, 256, default_threads(), special="auto")
        self.threads.setToolTip(
            "CPU threads for the registration (lnmeta register --threads). On a machine "
            "with few cores, 1 is fastest: napari's own threads share the cores, and "
            "torch's threads then wait on each other. 'auto' keeps torch's setting.")

        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.valueChanged.connect(self._set_opacity)
        self.view_mode = QComboBox()
        self.view_mode.addItems(["overlay", "checkerboard", "difference"])
        self.view_mode.currentTextChanged.connect(self._view_mode_changed)

        self.nudge_start = QPushButton("Add point layers")
        self.nudge_start.clicked.connect(self.start_nudge)
        self.nudge_apply = QPushButton("Apply nudge")
        self.nudge_apply.clicked.connect(self._apply_nudge_clicked)
        self.save_button = QPushButton("Save transform…")
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button = QPushButton("Load transform…")
        self.load_button.clicked.connect(self._load_dialog)
        self.info = QLabel("")
        self.info.setWordWrap(True)

        self.panel = JobPanel("Register")
        self.panel.run_button.clicked.connect(self.run_registration)

        lay = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("H&E (fixed)", self.fixed_combo)
        form.addRow("IHC (moving)", self.moving_combo)
        form.addRow("mode", self.mode)
        form.addRow(self.allow_flip)
        form.addRow("CPU threads", self.threads)
        lay.addLayout(form)
        lay.addWidget(self.panel)

        vbox = QGroupBox("Judge the fit")
        vf = QFormLayout(vbox)
        vf.addRow("IHC opacity", self.opacity)
        vf.addRow("view", self.view_mode)
        lay.addWidget(vbox)

        nbox = QGroupBox("Manual nudge by landmarks")
        nf = QVBoxLayout(nbox)
        how = QLabel("Click a feature in the registered IHC (IHC points), then the "
                     "same feature in the H&E (H&E points), in the same order; "
                     "1 pair shifts, 2 rotate/scale, 3+ fit an affine.")
        how.setWordWrap(True)
        nf.addWidget(how)
        row = QHBoxLayout()
        row.addWidget(self.nudge_start)
        row.addWidget(self.nudge_apply)
        nf.addLayout(row)
        lay.addWidget(nbox)

        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.load_button)
        lay.addLayout(row)
        lay.addWidget(self.info)
        lay.addStretch(1)

        self.listen(self.viewer.layers.events.inserted, self._refresh_layers)
        self.listen(self.viewer.layers.events.removed, self._refresh_layers)
        self._refresh_layers()

    # -- layers ------------------------------------------------------------------------
    def _refresh_layers(self, *_):
        names = rgb_image_layers(self.viewer)
        for combo, guess in ((self.fixed_combo, 0), (self.moving_combo, 1)):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if cur in names:
                combo.setCurrentText(cur)
            elif len(names) > guess:
                combo.setCurrentIndex(guess)
            combo.blockSignals(False)

    def _slides(self) -> tuple[Slide, Slide]:
        f, m = self.fixed_combo.currentText(), self.moving_combo.currentText()
        if not f or not m or f not in self.viewer.layers or m not in self.viewer.layers:
            raise InputError("pick an H&E and an IHC image layer (open both slides first)")
        if f == m:
            raise InputError("the H&E and the IHC are the same layer; pick two layers")
        s = self.session
        if s.fixed_layer != f or s.fixed is None:
            s.fixed, s.fixed_layer = layer_slide(self.viewer.layers[f]), f
        if s.moving_layer != m or s.moving is None:
            s.moving, s.moving_layer = layer_slide(self.viewer.layers[m]), m
        return s.fixed, s.moving

    # -- registration ------------------------------------------------------------------
    def config(self):
        from ..core.registration import RegistrationConfig

        return RegistrationConfig(mode=self.mode.currentText(),
                                  allow_flip=self.allow_flip.isChecked(),
                                  threads=self.threads.value() or None)

    def run_registration(self) -> None:
        """Register the IHC layer onto the H&E layer (a job with progress and Cancel)."""
        from ..core.registration import register_job

        try:
            fixed, moving = self._slides()
        except InputError as e:
            notify_error(self.panel, e)
            return
        cfg = self.config()
        self.panel.start(lambda: register_job(fixed, moving, cfg), on_returned=self.set_transform)

    def set_transform(self, transform: Transform) -> None:
        """Adopt a transform (computed, loaded or nudged) and show the registered IHC."""
        s = self.session
        if s.fixed is None or s.moving is None:
            self._slides()
        self._check_fits(transform)
        s.transform = transform
        self.show_registered()
        m = transform.metrics
        pre = m.get("stages", {}).get("prealign", {})
        sim = m.get("similarity")
        self.info.setText(
            f"{transform.mode}: similarity {sim:.3f}" if sim is not None else transform.mode)
        if pre:
            self.info.setText(self.info.text() + f", rotation {pre.get('angle', 0):g}°"
                              + (" (mirrored)" if pre.get("flip") else ""))
        if self.view_mode.currentText() != "overlay":
            self.show_check(self.view_mode.currentText())

    def _check_fits(self, t: Transform) -> None:
        s = self.session
        for role, info, slide in (("H&E", t.fixed, s.fixed), ("IHC", t.moving, s.moving)):
            if tuple(info.shape) != tuple(slide.shape):
                raise InputError(f"the transform's {role} is {info.shape[1]}x{info.shape[0]} px "
                                 f"but the {role} layer is {slide.shape[1]}x{slide.shape[0]} px")

    def _fixed_layer(self):
        return self.viewer.layers[self.session.fixed_layer]

    def show_registered(self) -> None:
        """Push (or refresh) the lazily warped IHC as a multiscale layer over the H&E."""
        from .._napari.layers import add_or_update, frame_kwargs
        from ..core.registration import warped_pyramid
        from ..io.frame import SlideFrame

        s = self.session
        levels, _ = warped_pyramid(s.transform, s.moving)
        frame = SlideFrame(1.0, (0.0, 0.0), s.fixed.mpp, s.fixed.name, tuple(s.fixed.shape))
        kw = place_on_layer(frame_kwargs(frame), self._fixed_layer(), s.fixed.mpp)
        kw["metadata"][META]["registration"] = {
            "transform": s.transform, "fixed_layer": s.fixed_layer,
            "moving_layer": s.moving_layer}
        kw.update(name=REGISTERED_LAYER, rgb=True, multiscale=True, contrast_limits=(0, 255),
                  opacity=self.opacity.value() / 100, blending="translucent")
        if REGISTERED_LAYER in self.viewer.layers:  # pyramid depth may differ: rebuild
            self.viewer.layers.remove(REGISTERED_LAYER)
        add_or_update(self.viewer, levels, kw, "image")

    def _set_opacity(self, value: int) -> None:
        if REGISTERED_LAYER in self.viewer.layers:
            self.viewer.layers[REGISTERED_LAYER].opacity = value / 100

    def _view_mode_changed(self, mode: str) -> None:
        if self.session.transform is None or self.view_mode.currentText() != mode:
            return
        if mode == "overlay":
            if CHECK_LAYER in self.viewer.layers:
                self.viewer.layers.remove(CHECK_LAYER)
            if REGISTERED_LAYER in self.viewer.layers:
                self.viewer.layers[REGISTERED_LAYER].visible = True
        else:
            self.show_check(mode)

    def show_check(self, mode: str, squares: int = 8):
        """A checkerboard of H&E / registered IHC, or the absolute difference of their
        haematoxylin densities, as the ``Registration check`` layer. The images are made
        in the worker (:func:`~napari_lnmeta.core.registration.registration_check_job`);
        returns the worker."""
        from qtpy.QtCore import QTimer

        from ..core.registration import VIEWS, registration_check_job

        if mode not in VIEWS:
            raise ValueError(f"unknown view {mode!r}")
        s = self.session
        t, fixed, moving = s.transform, s.fixed, s.moving
        if self._check is not None and self._check[0] is t:  # same transform: images kept
            check = self._check[1]
            self._push_check(mode, check, check.view(mode, squares=squares))
            return None
        if self.panel.running:  # e.g. the registration job is still finishing: retry
            QTimer.singleShot(100, lambda: self._view_mode_changed(self.view_mode.currentText()))
            return None

        def make():
            check = yield from registration_check_job(t, fixed, moving, size=VIEW_SIZE)
            return check, check.view(mode, squares=squares)

        def done(value) -> None:
            self._check = (t, value[0])
            if s.transform is t and self.view_mode.currentText() == mode:
                self._push_check(mode, *value)

        return self.panel.start(make, on_returned=done)

    def _push_check(self, mode: str, check, data: np.ndarray) -> None:
        from .._napari.layers import add_or_update, frame_kwargs

        s = self.session
        if mode == "checkerboard":
            extra = {"rgb": True, "contrast_limits": (0, 255)}
        else:
            extra = {"colormap": "magma", "contrast_limits": (0.0, 1.0)}
        kw = place_on_layer(frame_kwargs(check.frame), self._fixed_layer(), s.fixed.mpp)
        kw.update(name=CHECK_LAYER, **extra)
        if CHECK_LAYER in self.viewer.layers:
            self.viewer.layers.remove(CHECK_LAYER)
        add_or_update(self.viewer, data, kw, "image")
        if REGISTERED_LAYER in self.viewer.layers:
            self.viewer.layers[REGISTERED_LAYER].visible = False

    # -- manual nudge ------------------------------------------------------------------
    def start_nudge(self) -> None:
        """Add the two (empty) Points layers for corresponding landmarks."""
        for name, color in ((NUDGE_MOVING, "cyan"), (NUDGE_FIXED, "red")):
            if name not in self.viewer.layers:
                size = 10 * float(self.viewer.layers[self.session.fixed_layer].scale[-1]) \
                    if self.session.fixed_layer in self.viewer.layers else 10
                self.viewer.add_points(np.zeros((0, 2)), name=name, face_color=color,
                                       size=size)
        self.viewer.layers.selection.active = self.viewer.layers[NUDGE_MOVING]
        self.viewer.layers[NUDGE_MOVING].mode = "add"

    def _apply_nudge_clicked(self) -> None:
        try:
            self.apply_nudge()
        except InputError as e:
            notify_error(self.panel, e)

    def apply_nudge(self) -> None:
        """Correct the transform so each IHC point lands on its H&E point."""
        from ..core.registration import affine_from_points

        s = self.session
        if s.transform is None:
            raise InputError("register first (or load a transform), then nudge")
        if NUDGE_FIXED not in self.viewer.layers or NUDGE_MOVING not in self.viewer.layers:
            raise InputError("add the point layers and click corresponding points first")
        layer = self._fixed_layer()
        b = world_to_level0(layer, self.viewer.layers[NUDGE_FIXED].data)
        a = world_to_level0(layer, self.viewer.layers[NUDGE_MOVING].data)
        if len(a) == 0 or len(a) != len(b):
            raise InputError(f"need the same number (≥1) of H&E and IHC points; got {len(b)} "
                             f"H&E and {len(a)} IHC points")
        # fixed point b must be evaluated where the IHC feature is now shown: p -> T(C p)
        c = affine_from_points(b, a)
        self.set_transform(s.transform.with_fixed_correction(c))
        for name in (NUDGE_FIXED, NUDGE_MOVING):
            self.viewer.layers[name].data = np.zeros((0, 2))
        self.panel.status.setText(f"nudged with {len(a)} point pair(s)")

    # -- files -------------------------------------------------------------------------
    def save_transform(self, path) -> None:
        if self.session.transform is None:
            raise InputError("nothing to save: register first")
        self.session.transform.save(path, overwrite=True)
        self.panel.status.setText(f"saved {path}")

    def load_transform(self, path) -> None:
        from ..core.registration import Transform

        self._slides()
        self.set_transform(Transform.load(path))

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save transform", "transform.json",
                                              "Transform (*.json)")
        if path:
            try:
                self.save_transform(path)
            except InputError as e:
                notify_error(self.panel, e)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load transform", "", "Transform (*.json)")
        if path:
            try:
                self.load_transform(path)
            except InputError as e:
                notify_error(self.panel, e)
