"""The "Transfer mask" widget: the IHC tumour mask onto the H&E (seed 000).

All computing is in :mod:`napari_lnmeta.core.dab`; the widget finds the ``IHC registered``
layer of the "Register IHC" widget (its metadata carries the transform), runs jobs through
one :class:`~._qt.worker.JobPanel` (progress + Cancel) and pushes layers with
:func:`~._napari.layers.add_or_update`:

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

from .._napari.registration_layers import (
    MASK_LAYER,
    META,
    PREVIEW_LAYER,
    layer_slide,
    place_on_layer,
    rgb_image_layers,
    visible_region,
)
from ..errors import InputError
from .base import DockWidget
from .worker import JobPanel, float_spin, notify_error

if TYPE_CHECKING:
    import napari

    from ..core.dab import DabParams
    from ..core.registration import Transform
    from ..io.frame import SlideFrame
    from ..io.slide import Slide

#: longest side (px) of the in-memory whole-slide mask (a Labels layer the user edits)
MASK_MAX_SIZE = 8192
THRESHOLD_SCALE = 1000  # slider steps per DAB OD unit


def _label_colormap(layer) -> None:
    from ..core.dab import LABEL_COLORS

    try:
        from napari.utils.colormaps import DirectLabelColormap
    except ImportError:  # older napari: default label colours
        return
    colors: dict[Any, tuple] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colors.update({k: tuple(c / 255 for c in v) for k, v in LABEL_COLORS.items()})
    layer.colormap = DirectLabelColormap(color_dict=colors)


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
            notify_error(self.panel, InputError("open the H&E and the IHC slides first"))
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
            notify_error(self.panel, e)

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

    def auto_threshold(self):
        """Otsu's DAB threshold over the IHC's tissue (see :mod:`napari_lnmeta.core.dab`),
        computed once per pair in the worker (:func:`~napari_lnmeta.core.dab.slide_threshold_job`,
        the IHC read at most 4096 px a side) and then set on the spin box. Returns the
        worker, or ``None`` when the threshold was already known (set at once)."""
        from ..core.dab import DabParams, slide_threshold_job

        s = self._require()
        if s.threshold is not None:
            self.set_threshold(s.threshold)
            return None
        moving = s.moving

        def done(thr: float) -> None:
            if s.moving is moving:  # the pair was not changed meanwhile
                s.threshold = thr
                self.set_threshold(thr)

        return self.panel.start(lambda: slide_threshold_job(moving, DabParams()),
                                on_returned=done)

    def _auto_clicked(self) -> None:
        try:
            self.auto_threshold()
        except InputError as e:
            notify_error(self.panel, e)

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
            notify_error(self.panel, e)

    def preview(self) -> None:
        """The DAB mask of the part of the H&E on screen, as the preview Labels layer.

        Bounded work (at most ``VIEW_SIZE`` px a side) run in the GUI thread so it follows
        the slider.
        """
        from .._napari.layers import add_or_update, frame_kwargs
        from ..core.dab import mask_region
        from ..io.frame import SlideFrame

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
        from ..core.dab import mask_downsample, transfer_mask_job

        try:
            s = self._require()
        except InputError as e:
            notify_error(self.panel, e)
            return
        p = self.params()
        ds = mask_downsample(s.fixed.shape, s.fixed.mpp, max_size=MASK_MAX_SIZE)
        t, fixed, moving = s.transform, s.fixed, s.moving

        def job():
            res = yield from transfer_mask_job(fixed, moving, t, None, p, downsample=ds, tile=512)
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
                notify_error(self.panel, e)

    def _geojson_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export outlines", "tumour_mask.geojson",
                                              "GeoJSON (*.geojson *.json)")
        if path:
            try:
                self.export_geojson(path)
            except InputError as e:
                notify_error(self.panel, e)
