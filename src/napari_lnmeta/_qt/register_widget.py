"""The "Register IHC" and "Transfer mask" widgets (IHC → H&E, seed 000).

All computing is in :mod:`napari_lnmeta.core.registration` and :mod:`napari_lnmeta.core.dab`;
these widgets pick layers, run jobs through one :class:`~._qt.worker.JobPanel` each
(progress + Cancel) and push layers with :func:`~._napari.layers.add_or_update`:

* ``IHC registered``: the IHC resampled onto the H&E, lazily (multiscale, chunks are
  warped when napari draws them); its metadata carries the transform, which is how the
  "Transfer mask" widget finds it;
* ``Registration check``: a checkerboard of H&E / registered IHC, or their difference;
* ``Nudge: H&E points`` / ``Nudge: IHC points``: corresponding points for a manual fix;
* ``Tumour mask (preview)``: the DAB mask of the current view, live with the threshold;
* ``Tumour mask``: the whole-slide mask on the H&E grid, a Labels layer the user edits
  (paint class 2 for fibrosis by hand), then saves as OME-Zarr or QuPath GeoJSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
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

from .._napari.layers import canvas_size, layer_kind, viewer_camera
from ..errors import InputError
from .base import DockWidget
from .worker import JobPanel, float_spin, int_spin

if TYPE_CHECKING:
    import napari

    from ..core.dab import DabParams
    from ..core.registration import Transform
    from ..io.omezarr import SlideFrame
    from ..io.slide import Slide

REGISTERED_LAYER = "IHC registered"
CHECK_LAYER = "Registration check"
NUDGE_FIXED = "Nudge: H&E points"
NUDGE_MOVING = "Nudge: IHC points"
PREVIEW_LAYER = "Tumour mask (preview)"
MASK_LAYER = "Tumour mask"
META = "lnmeta"
#: longest side (px) of checkerboard / difference views and of the live mask preview
VIEW_SIZE = 1024
#: longest side (px) of the in-memory whole-slide mask (a Labels layer the user edits)
MASK_MAX_SIZE = 8192
THRESHOLD_SCALE = 1000  # slider steps per DAB OD unit


# --------------------------------------------------------------------------------------
# Layer helpers (no widget state)
# --------------------------------------------------------------------------------------
def rgb_image_layers(viewer: napari.Viewer) -> list[str]:
    """Names of RGB image layers that can be registered (slides, photos, samples)."""
    return [lyr.name for lyr in viewer.layers
            if layer_kind(lyr) == "image" and getattr(lyr, "rgb", False)
            and lyr.name != CHECK_LAYER and "registration" not in lyr.metadata.get(META, {})]


def layer_slide(layer: napari.layers.Image) -> Slide:
    """The slide behind a layer: re-opened from its file, or the layer's own pixels."""
    from .._napari.layers import slide_from_layer
    from ..core.registration import array_slide

    meta = layer.metadata.get(META, {})
    if meta.get("path"):
        return slide_from_layer(layer)
    if "registration" in meta:
        raise InputError(f"layer {layer.name!r} is a registration result, not a slide")
    data = layer.data[0] if layer.multiscale else layer.data
    if not getattr(layer, "rgb", False):
        raise InputError(f"layer {layer.name!r} is not an RGB image")
    if max(data.shape[:2]) > 20000:
        raise InputError(f"layer {layer.name!r} is a large in-memory image; open the slide "
                         "file with napari-lnmeta so it is read lazily")
    return array_slide(np.asarray(data), mpp=meta.get("mpp"), name=layer.name)


def place_on_layer(kw: dict[str, Any], layer, mpp: float | None) -> dict[str, Any]:
    """Frame kwargs (slide pixels or µm) moved into the world frame of ``layer``.

    A slide opened by napari-lnmeta has ``scale = µm/px`` and no translate, which is what
    :func:`~._napari.layers.frame_kwargs` assumes; a plain image layer may have its own
    scale and translate, so pixel-unit frames are mapped through them.
    """
    if mpp is None:
        s = np.asarray(layer.scale[-2:], dtype=float)
        t = np.asarray(layer.translate[-2:], dtype=float)
        kw["scale"] = tuple(np.asarray(kw["scale"], dtype=float) * s)
        kw["translate"] = tuple(np.asarray(kw["translate"], dtype=float) * s + t)
    return kw


def world_to_level0(layer, world: np.ndarray) -> np.ndarray:
    """World ``(N, 2)`` (µm or layer units) → level-0 ``(row, col)`` of the layer's slide."""
    s = np.asarray(layer.scale[-2:], dtype=float)
    t = np.asarray(layer.translate[-2:], dtype=float)
    return (np.asarray(world, dtype=float).reshape(-1, 2)[:, -2:] - t) / s


def visible_region(viewer: napari.Viewer, layer, shape: tuple[int, int],
                   max_size: int = VIEW_SIZE) -> tuple[tuple[float, float], tuple[int, int], float]:
    """``(origin, shape, downsample)`` of a grid covering what the canvas shows of ``layer``."""
    center = np.asarray(viewer_camera(viewer).center[-2:], dtype=float)
    size = canvas_size(viewer)
    zoom = max(float(viewer_camera(viewer).zoom), 1e-9)
    half = np.asarray(size[-2:], dtype=float) / zoom / 2
    lo = world_to_level0(layer, center - half)[0]
    hi = world_to_level0(layer, center + half)[0]
    y0, x0 = max(0.0, np.floor(lo[0])), max(0.0, np.floor(lo[1]))
    y1, x1 = min(float(shape[0]), np.ceil(hi[0])), min(float(shape[1]), np.ceil(hi[1]))
    if y1 <= y0 or x1 <= x0:
        raise InputError("the H&E is not in view: pan or zoom onto it first")
    ds = max(1.0, max(y1 - y0, x1 - x0) / max_size)
    out = (max(1, int(np.ceil((y1 - y0) / ds))), max(1, int(np.ceil((x1 - x0) / ds))))
    return (y0, x0), out, ds


def _label_colormap(layer) -> None:
    from ..core.dab import LABEL_COLORS

    try:
        from napari.utils.colormaps import DirectLabelColormap
    except ImportError:  # older napari: default label colours
        return
    colors: dict[Any, tuple] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colors.update({k: tuple(c / 255 for c in v) for k, v in LABEL_COLORS.items()})
    layer.colormap = DirectLabelColormap(color_dict=colors)


def _notify_error(panel: JobPanel, e: Exception) -> None:
    from napari.utils.notifications import show_error

    panel.status.setText(f"error: {e}")
    show_error(str(e))


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
        from ..core.registration import register

        try:
            fixed, moving = self._slides()
        except InputError as e:
            _notify_error(self.panel, e)
            return
        cfg = self.config()
        self.panel.start(lambda: register(fixed, moving, cfg), on_returned=self.set_transform)

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
        from ..io.omezarr import SlideFrame

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
        if self.session.transform is None:
            return
        if mode == "overlay":
            if CHECK_LAYER in self.viewer.layers:
                self.viewer.layers.remove(CHECK_LAYER)
            if REGISTERED_LAYER in self.viewer.layers:
                self.viewer.layers[REGISTERED_LAYER].visible = True
        else:
            self.show_check(mode)

    def check_images(self, size: int = VIEW_SIZE) -> tuple[np.ndarray, np.ndarray, float]:
        """Whole H&E and registered IHC at ``size`` px (longest side), and their downsample."""
        from ..core.registration import read_mapped

        s = self.session
        h0, w0 = s.fixed.shape
        ds = max(1.0, max(h0, w0) / size)
        shape = (max(1, int(np.ceil(h0 / ds))), max(1, int(np.ceil(w0 / ds))))
        coords = np.stack(np.meshgrid(np.arange(shape[0]) * ds + (ds - 1) / 2,
                                      np.arange(shape[1]) * ds + (ds - 1) / 2, indexing="ij"))
        fixed = read_mapped(s.fixed, coords, ds)
        moving = s.transform.warp_slide_region(s.moving, (0.0, 0.0), shape, ds)
        return fixed, moving, ds

    def show_check(self, mode: str, squares: int = 8) -> None:
        """A checkerboard of H&E / registered IHC, or the absolute difference of their
        haematoxylin densities, as the ``Registration check`` layer."""
        from .._napari.layers import add_or_update, frame_kwargs
        from ..core.registration import representation
        from ..io.omezarr import SlideFrame

        s = self.session
        fixed, moving, ds = self.check_images()
        if mode == "checkerboard":
            side = max(1, max(fixed.shape[:2]) // squares)
            yy, xx = np.indices(fixed.shape[:2])
            board = ((yy // side + xx // side) % 2).astype(bool)
            data = np.where(board[..., None], moving, fixed)
            extra = {"rgb": True, "contrast_limits": (0, 255)}
        elif mode == "difference":
            data = np.abs(representation(fixed) - representation(moving))
            extra = {"colormap": "magma", "contrast_limits": (0.0, 1.0)}
        else:
            raise ValueError(f"unknown view {mode!r}")
        frame = SlideFrame(ds, (0.0, 0.0), s.fixed.mpp, s.fixed.name, tuple(s.fixed.shape))
        kw = place_on_layer(frame_kwargs(frame), self._fixed_layer(), s.fixed.mpp)
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
            _notify_error(self.panel, e)

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
                _notify_error(self.panel, e)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load transform", "", "Transform (*.json)")
        if path:
            try:
                self.load_transform(path)
            except InputError as e:
                _notify_error(self.panel, e)


# --------------------------------------------------------------------------------------
# Transfer mask
# --------------------------------------------------------------------------------------
@dataclass
class TransferSession:
    """The registered pair the mask is made from, and the last whole-slide mask."""

    transform: Transform | None = None
    fixed: Slide | None = None
    moving: Slide | None = None
    fixed_layer: str | None = None
    source: str = ""
    threshold: float | None = None
    frame: SlideFrame | None = None


class TransferMaskWidget(DockWidget):
    """Dock widget: DAB threshold with a live preview, whole-slide mask, save and export."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = TransferSession()

        self.source_combo = QComboBox()
        self.source_combo.currentTextChanged.connect(self._source_changed)
        self.load_button = QPushButton("Load transform…")
        self.load_button.clicked.connect(self._load_dialog)
        self.source_info = QLabel("")
        self.source_info.setWordWrap(True)

        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(1, 250)
        self.threshold_spin = float_spin(0.001, 0.25, 0.05, decimals=3, step=0.002)
        self.threshold_slider.setValue(50)
        self.threshold_slider.valueChanged.connect(
            lambda v: self.threshold_spin.setValue(v / THRESHOLD_SCALE))
        self.threshold_spin.valueChanged.connect(self._threshold_changed)
        self.auto_button = QPushButton("Auto (Otsu)")
        self.auto_button.clicked.connect(self._auto_clicked)
        self.min_area = float_spin(0.0, 1e7, 200.0, decimals=0, suffix=" µm²")
        self.min_area.valueChanged.connect(self._schedule_preview)
        self.fibrosis = QCheckBox("add fibrosis ring (class 2)")
        self.fibrosis.toggled.connect(self._schedule_preview)
        self.fibrosis_um = float_spin(1.0, 2000.0, 50.0, suffix=" µm")
        self.fibrosis_um.valueChanged.connect(self._schedule_preview)
        self.live = QCheckBox("live preview on the current view")
        self.live.setChecked(True)
        self.preview_button = QPushButton("Preview view")
        self.preview_button.clicked.connect(self._preview_clicked)

        self.save_button = QPushButton("Save OME-Zarr…")
        self.save_button.clicked.connect(self._save_dialog)
        self.geojson_button = QPushButton("Export GeoJSON…")
        self.geojson_button.clicked.connect(self._geojson_dialog)

        self.panel = JobPanel("Make whole-slide mask")
        self.panel.run_button.clicked.connect(self.run_mask)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._live_preview)

        lay = QVBoxLayout(self)
        sbox = QGroupBox("Registered pair")
        sf = QFormLayout(sbox)
        sf.addRow("from", self.source_combo)
        sf.addRow(self.load_button)
        sf.addRow(self.source_info)
        lay.addWidget(sbox)

        mbox = QGroupBox("DAB mask")
        mf = QFormLayout(mbox)
        row = QHBoxLayout()
        row.addWidget(self.threshold_slider)
        row.addWidget(self.threshold_spin)
        mf.addRow("threshold (DAB OD)", row)
        mf.addRow(self.auto_button)
        mf.addRow("min object", self.min_area)
        row = QHBoxLayout()
        row.addWidget(self.fibrosis)
        row.addWidget(self.fibrosis_um)
        mf.addRow(row)
        row = QHBoxLayout()
        row.addWidget(self.live)
        row.addWidget(self.preview_button)
        mf.addRow(row)
        lay.addWidget(mbox)
        lay.addWidget(self.panel)
        row = QHBoxLayout()
        row.addWidget(self.save_button)
        row.addWidget(self.geojson_button)
        lay.addLayout(row)
        lay.addStretch(1)

        self.listen(self.viewer.layers.events.inserted, self._refresh_sources)
        self.listen(self.viewer.layers.events.removed, self._refresh_sources)
        self._refresh_sources()

    # -- the registered pair -------------------------------------------------------------
    def _registered_layers(self) -> list[str]:
        return [lyr.name for lyr in self.viewer.layers
                if "registration" in lyr.metadata.get(META, {})]

    def _refresh_sources(self, *_):
        names = self._registered_layers()
        cur = self.source_combo.currentText()
        self.source_combo.blockSignals(True)
        self.source_combo.clear()
        self.source_combo.addItems(names)
        if cur in names:
            self.source_combo.setCurrentText(cur)
        self.source_combo.blockSignals(False)
        if self.source_combo.currentText() and self.session.source != self.source_combo.currentText():
            self._source_changed(self.source_combo.currentText())

    def _source_changed(self, name: str) -> None:
        if not name or name not in self.viewer.layers:
            return
        reg = self.viewer.layers[name].metadata[META]["registration"]
        try:
            self.use_pair(reg["transform"], reg["fixed_layer"], reg["moving_layer"], name)
        except (InputError, KeyError) as e:
            self.source_info.setText(f"cannot use {name!r}: {e}")

    def use_pair(self, transform: Transform, fixed_layer: str, moving_layer: str,
                 source: str) -> None:
        """Make masks with ``transform`` from the IHC layer onto the H&E layer."""
        for n in (fixed_layer, moving_layer):
            if n not in self.viewer.layers:
                raise InputError(f"layer {n!r} is not open")
        s = self.session
        s.fixed = layer_slide(self.viewer.layers[fixed_layer])
        s.moving = layer_slide(self.viewer.layers[moving_layer])
        s.fixed_layer, s.transform, s.source = fixed_layer, transform, source
        s.threshold = None
        self.source_info.setText(f"{moving_layer} → {fixed_layer} ({transform.mode}, {source})")

    def load_transform(self, path, fixed_layer: str, moving_layer: str) -> None:
        from ..core.registration import Transform

        self.use_pair(Transform.load(path), fixed_layer, moving_layer, str(path))

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load transform", "", "Transform (*.json)")
        if not path:
            return
        names = rgb_image_layers(self.viewer)
        if len(names) < 2:
            _notify_error(self.panel, InputError("open the H&E and the IHC slides first"))
            return
        try:  # the transform names its slides; match them to open layers
            from ..core.registration import Transform

            t = Transform.load(path)
            by_name = {self.viewer.layers[n].metadata.get(META, {}).get("path", n): n for n in names}
            fixed = next((v for k, v in by_name.items() if str(k).endswith(t.fixed.name or "?")),
                         names[0])
            moving = next((v for k, v in by_name.items()
                           if str(k).endswith(t.moving.name or "?")), names[1])
            self.use_pair(t, fixed, moving, path)
        except InputError as e:
            _notify_error(self.panel, e)

    def _require(self) -> TransferSession:
        if self.session.transform is None:
            raise InputError("no registered pair: run 'Register IHC' or load a transform")
        return self.session

    # -- parameters --------------------------------------------------------------------
    def params(self) -> DabParams:
        from ..core.dab import DabParams

        return DabParams(threshold=self.threshold_spin.value(),
                         min_area_um2=self.min_area.value(),
                         fibrosis_um=self.fibrosis_um.value() if self.fibrosis.isChecked() else None)

    def set_threshold(self, value: float) -> None:
        self.threshold_spin.setValue(float(value))

    def _threshold_changed(self, value: float) -> None:
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(int(round(value * THRESHOLD_SCALE)))
        self.threshold_slider.blockSignals(False)
        self._schedule_preview()

    def auto_threshold(self) -> float:
        """Otsu's DAB threshold over the IHC's tissue (see :mod:`napari_lnmeta.core.dab`)."""
        from ..core.dab import DabParams, slide_threshold

        s = self._require()
        if s.threshold is None:
            s.threshold = slide_threshold(s.moving, DabParams())
        self.set_threshold(s.threshold)
        return s.threshold

    def _auto_clicked(self) -> None:
        try:
            self.auto_threshold()
        except InputError as e:
            _notify_error(self.panel, e)

    # -- preview -----------------------------------------------------------------------
    def _schedule_preview(self, *_):
        if self.live.isChecked() and self.session.transform is not None:
            self._timer.start()

    def _live_preview(self) -> None:
        try:
            self.preview()
        except InputError as e:
            self.panel.status.setText(f"preview: {e}")

    def _preview_clicked(self) -> None:
        try:
            self.preview()
        except InputError as e:
            _notify_error(self.panel, e)

    def preview(self) -> None:
        """The DAB mask of the part of the H&E on screen, as the preview Labels layer.

        Bounded work (at most ``VIEW_SIZE`` px a side) run in the GUI thread so it follows
        the slider.
        """
        from .._napari.layers import add_or_update, frame_kwargs
        from ..core.dab import mask_region
        from ..io.omezarr import SlideFrame

        s = self._require()
        if s.fixed_layer not in self.viewer.layers:
            raise InputError(f"the H&E layer {s.fixed_layer!r} was closed")
        layer = self.viewer.layers[s.fixed_layer]
        origin, shape, ds = visible_region(self.viewer, layer, s.fixed.shape)
        p = self.params()
        labels = mask_region(s.transform, s.moving, origin, shape, ds, p,
                             threshold=p.threshold, fixed_mpp=s.fixed.mpp)
        frame = SlideFrame(ds, origin, s.fixed.mpp, s.fixed.name, tuple(s.fixed.shape))
        kw = place_on_layer(frame_kwargs(frame), layer, s.fixed.mpp)
        kw.update(name=PREVIEW_LAYER, opacity=0.5)
        out = add_or_update(self.viewer, labels, kw, "labels")
        _label_colormap(out)
        self.panel.status.setText(f"preview: {100 * float((labels == 1).mean()):.1f}% tumour in "
                                  f"view at threshold {p.threshold:.3f}")

    # -- whole-slide mask ----------------------------------------------------------------
    def run_mask(self) -> None:
        """The whole-slide mask on the H&E grid (a job), pushed as an editable Labels layer."""
        from ..core.dab import mask_downsample, transfer_mask

        try:
            s = self._require()
        except InputError as e:
            _notify_error(self.panel, e)
            return
        p = self.params()
        ds = mask_downsample(s.fixed.shape, s.fixed.mpp, max_size=MASK_MAX_SIZE)
        t, fixed, moving = s.transform, s.fixed, s.moving

        def job():
            res = yield from transfer_mask(fixed, moving, t, None, p, downsample=ds, tile=512)
            return res

        self.panel.start(job, on_returned=self.show_mask)

    def show_mask(self, result) -> None:
        from .._napari.layers import add_or_update, frame_kwargs

        s = self.session
        s.frame = result.frame
        layer = self.viewer.layers[s.fixed_layer]
        kw = place_on_layer(frame_kwargs(result.frame), layer, s.fixed.mpp)
        kw["metadata"][META]["dab"] = {"threshold": result.threshold,
                                       "params": result.params.to_json()}
        kw.update(name=MASK_LAYER, opacity=0.5)
        out = add_or_update(self.viewer, result.labels, kw, "labels")
        _label_colormap(out)
        if PREVIEW_LAYER in self.viewer.layers:
            self.viewer.layers[PREVIEW_LAYER].visible = False
        self.panel.status.setText(f"mask: {100 * result.tumour_fraction:.2f}% tumour; edit it "
                                  "with the label tools (2 = fibrosis), then save")

    def _mask_layer(self):
        from .._napari.layers import frame_from_layer

        if MASK_LAYER not in self.viewer.layers:
            raise InputError(f"no {MASK_LAYER!r} layer: make the whole-slide mask first")
        layer = self.viewer.layers[MASK_LAYER]
        return layer, frame_from_layer(layer)

    def save_mask(self, path, *, overwrite: bool = True):
        """Write the (edited) mask layer as a multiscale OME-Zarr label image."""
        from ..core.dab import LABEL_COLORS, LABEL_NAMES
        from ..io.omezarr import write_ome_zarr

        layer, frame = self._mask_layer()
        data = np.asarray(layer.data).astype(np.uint8)
        meta = layer.metadata.get(META, {})
        attrs = {"labels": {str(k): v for k, v in LABEL_NAMES.items()},
                 "dab": meta.get("dab", {}), "edited_in": "napari"}
        inputs = tuple(x.path for x in (self.session.fixed, self.session.moving)
                       if x is not None and x.format != "array")
        out = write_ome_zarr(path, data, frame=frame, kind="labels", name=MASK_LAYER,
                             overwrite=overwrite, attrs=attrs, colors=LABEL_COLORS,
                             inputs=inputs)
        self.panel.status.setText(f"saved {out}")
        return out

    def export_geojson(self, path, *, overwrite: bool = True):
        """Export the mask layer's outlines (tumour, fibrosis) as QuPath GeoJSON."""
        from ..core.dab import mask_outlines
        from ..io.annotations import write_geojson

        layer, frame = self._mask_layer()
        polys = mask_outlines(np.asarray(layer.data), frame)
        out = write_geojson(path, polys, overwrite=overwrite)
        self.panel.status.setText(f"{len(polys)} outlines; saved {out}")
        return out

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save mask", "tumour_mask.ome.zarr",
                                              "OME-Zarr (*.ome.zarr *.zarr)")
        if path:
            try:
                self.save_mask(path)
            except InputError as e:
                _notify_error(self.panel, e)

    def _geojson_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export outlines", "tumour_mask.geojson",
                                              "GeoJSON (*.geojson *.json)")
        if path:
            try:
                self.export_geojson(path)
            except InputError as e:
                _notify_error(self.panel, e)
