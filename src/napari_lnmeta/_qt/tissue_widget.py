"""The "Tissue & stain" widget: tissue mask, patch grid and a stain-normalisation preview.

All computing is in :mod:`napari_lnmeta.core` (tissue, tiling, stain); this widget only
collects parameters into :class:`TissueStainSession`, runs the long steps through one
:class:`~napari_lnmeta._qt.worker.JobPanel` (progress + Cancel) and pushes layers with
:func:`~napari_lnmeta._napari.layers.add_or_update` (re-used by name):

* ``Tissue``: Labels layer of the mask, on the slide;
* ``Patch grid``: Shapes (rectangles) for up to :data:`MAX_SHAPES` patches, Points above;
* ``Stain preview``: the visible part of the slide, normalised, over the slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._napari.layers import slide_layer_names, view_box
from ..errors import InputError
from ..progress import Progress
from .base import DockWidget
from .worker import JobPanel, float_spin, int_spin

if TYPE_CHECKING:
    import napari

    from ..core.tiling import PatchGrid
    from ..core.tissue import TissueMask
    from ..io.slide import Slide
    from ..io.stain_target import StainTarget

TISSUE_LAYER = "Tissue"
GRID_LAYER = "Patch grid"
PREVIEW_LAYER = "Stain preview"
#: above this many patches the grid is shown as Points (Shapes get slow)
MAX_SHAPES = 5000
#: longest side (pixels) of the normalisation preview
PREVIEW_SIZE = 1024


@dataclass
class TissueStainSession:
    """What the widget has computed for the current slide (one per widget/viewer)."""

    slide: Slide | None = None
    layer_name: str | None = None
    tissue: TissueMask | None = None
    grid: PatchGrid | None = None
    target: StainTarget | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def reset(self, slide: Slide | None, layer_name: str | None) -> None:
        self.slide, self.layer_name = slide, layer_name
        self.tissue = self.grid = None


def visible_box(viewer: napari.Viewer, slide: Slide, layer) -> tuple[int, int, int, int]:
    """Level-0 ``(y0, x0, h, w)`` of the slide area shown in the canvas (clipped)."""
    lo0, lo1, hi0, hi1 = view_box(viewer, layer)
    lo, hi = (lo0, lo1), (hi0, hi1)
    h0, w0 = slide.shape
    y0, x0 = int(max(0, np.floor(lo[0]))), int(max(0, np.floor(lo[1])))
    y1, x1 = int(min(h0, np.ceil(hi[0]))), int(min(w0, np.ceil(hi[1])))
    if y1 <= y0 or x1 <= x0:
        raise InputError("the slide is not in view: pan or zoom onto it first")
    return y0, x0, y1 - y0, x1 - x0


def read_box(slide: Slide, box: tuple[int, int, int, int], max_size: int = PREVIEW_SIZE):
    """Read a level-0 box with at most ``max_size`` px on its longest side.

    The coarsest level that keeps ``max_size`` px is read, then resampled if needed.
    Returns the RGB array and its downsample (level-0 px per output px).
    """
    y0, x0, h, w = box
    want = max(h, w) / max_size
    level = slide.best_level_for_downsample(max(want, 1.0))
    ds = slide.level_downsamples[level]
    out_h, out_w = max(1, round(h / ds)), max(1, round(w / ds))
    rgb = slide.read_region((y0, x0), (out_h, out_w), level=level)
    if max(out_h, out_w) > max_size:  # no level coarse enough: resample the read
        from PIL import Image

        f = max_size / max(out_h, out_w)
        size = (max(1, round(out_w * f)), max(1, round(out_h * f)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
        ds = ds * out_h / rgb.shape[0]
    return rgb, ds


class TissueStainWidget(DockWidget):
    """Dock widget: compute and show tissue, patch grid and a stain-normalisation preview."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        from ..core.tissue import METHODS
        from ..io.stain_target import NORMALISERS

        self.viewer = napari_viewer
        self.session = TissueStainSession()

        self.slide_combo = QComboBox()
        self.slide_combo.currentTextChanged.connect(self._slide_changed)

        # tissue
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.target_mpp = float_spin(0.5, 100.0, 10.0, suffix=" µm/px")
        self.min_object = float_spin(0.0, 1e8, 20_000.0, decimals=0, suffix=" µm²")
        self.pen = QCheckBox("remove pen marks")
        self.pen.setChecked(True)
        self.tissue_button = QPushButton("Detect tissue")
        self.tissue_button.clicked.connect(self.run_tissue)

        # grid
        self.patch_size = int_spin(8, 4096, 256)
        self.stride = int_spin(0, 4096, 0, special="= patch size")
        self.patch_mpp = float_spin(0.0, 100.0, 0.0, decimals=3, special="level 0")
        self.min_tissue = float_spin(0.0, 1.0, 0.5, step=0.05)
        self.entropy_min = float_spin(0.0, 8.0, 0.0, step=0.25, special="off")
        self.grid_button = QPushButton("Show patch grid")
        self.grid_button.clicked.connect(self.run_grid)
        self.save_grid_button = QPushButton("Save grid…")
        self.save_grid_button.clicked.connect(self._save_grid_dialog)

        # stain
        self.stain_method = QComboBox()
        self.stain_method.addItems(list(NORMALISERS))
        self.fit_button = QPushButton("Fit target on slide")
        self.fit_button.clicked.connect(self.run_fit)
        self.load_target_button = QPushButton("Load target…")
        self.load_target_button.clicked.connect(self._load_target_dialog)
        self.save_target_button = QPushButton("Save target…")
        self.save_target_button.clicked.connect(self._save_target_dialog)
        self.preview_button = QPushButton("Preview on view")
        self.preview_button.clicked.connect(self.run_preview)

        self.panel = JobPanel("Detect tissue")
        self.panel.run_button.clicked.connect(self.run_tissue)
        self.panel.run_button.hide()  # the section buttons start jobs

        lay = QVBoxLayout(self)
        top = QFormLayout()
        top.addRow("slide", self.slide_combo)
        lay.addLayout(top)

        tbox = QGroupBox("Tissue")
        tf = QFormLayout(tbox)
        tf.addRow("method", self.method)
        tf.addRow("analysed at", self.target_mpp)
        tf.addRow("min object", self.min_object)
        tf.addRow(self.pen)
        tf.addRow(self.tissue_button)
        lay.addWidget(tbox)

        gbox = QGroupBox("Patch grid")
        gf = QFormLayout(gbox)
        gf.addRow("patch size (px)", self.patch_size)
        gf.addRow("stride (px)", self.stride)
        gf.addRow("read at", self.patch_mpp)
        gf.addRow("min tissue", self.min_tissue)
        gf.addRow("min entropy (bits)", self.entropy_min)
        row = QHBoxLayout()
        row.addWidget(self.grid_button)
        row.addWidget(self.save_grid_button)
        gf.addRow(row)
        lay.addWidget(gbox)

        sbox = QGroupBox("Stain normalisation")
        sf = QFormLayout(sbox)
        sf.addRow("method", self.stain_method)
        row = QHBoxLayout()
        row.addWidget(self.fit_button)
        row.addWidget(self.load_target_button)
        row.addWidget(self.save_target_button)
        sf.addRow(row)
        sf.addRow(self.preview_button)
        lay.addWidget(sbox)

        lay.addWidget(self.panel)
        lay.addStretch(1)

        self._job_buttons = [self.tissue_button, self.grid_button, self.fit_button,
                             self.preview_button]
        self.listen(self.viewer.layers.events.inserted, self._refresh_slides)
        self.listen(self.viewer.layers.events.removed, self._refresh_slides)
        self._refresh_slides()

    # -- slide selection -----------------------------------------------------------------
    def _slide_layers(self) -> list[str]:
        return slide_layer_names(self.viewer)

    def _refresh_slides(self, *_):
        names = self._slide_layers()
        current = self.slide_combo.currentText()
        self.slide_combo.blockSignals(True)
        self.slide_combo.clear()
        self.slide_combo.addItems(names)
        if current in names:
            self.slide_combo.setCurrentText(current)
        self.slide_combo.blockSignals(False)
        if self.slide_combo.currentText() != (self.session.layer_name or ""):
            self._slide_changed(self.slide_combo.currentText())

    def _slide_changed(self, name: str) -> None:
        self.session.reset(None, name or None)

    def _slide(self) -> Slide:
        from .._napari.layers import slide_from_layer

        name = self.slide_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputError("no slide layer: open a slide with napari-lnmeta first")
        if self.session.slide is None or self.session.layer_name != name:
            self.session.reset(slide_from_layer(self.viewer.layers[name]), name)
        return self.session.slide

    # -- jobs ------------------------------------------------------------------------------
    def _start(self, make_job, on_returned) -> None:
        for b in self._job_buttons:
            b.setEnabled(False)

        def finished():
            for b in self._job_buttons:
                b.setEnabled(True)

        self.panel.start(make_job, on_returned=on_returned, on_finished=finished)

    def _guard(self, fn) -> bool:
        try:
            fn()
        except InputError as e:
            from napari.utils.notifications import show_error

            self.panel.status.setText(f"error: {e}")
            show_error(str(e))
            return False
        return True

    def tissue_params(self) -> dict[str, Any]:
        return {"method": self.method.currentText(), "target_mpp": self.target_mpp.value(),
                "min_object_um2": self.min_object.value(), "pen": self.pen.isChecked()}

    def grid_params(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size.value(),
                "stride": self.stride.value() or None,
                "mpp": self.patch_mpp.value() or None,
                "min_tissue": self.min_tissue.value(),
                "entropy_min": self.entropy_min.value() or None}

    def _tissue_job(self, slide: Slide, params: dict[str, Any]):
        from ..core.tissue import tissue_mask_job

        yield Progress(0, 1, "tissue")
        tm = yield from tissue_mask_job(slide, **params)  # Detect metastases re-uses it
        yield Progress(1, 1, "tissue")
        return tm

    def run_tissue(self) -> None:
        """Compute the tissue mask and show it as the ``Tissue`` Labels layer."""
        def go():
            slide = self._slide()
            params = self.tissue_params()
            self._start(lambda: self._tissue_job(slide, params), self._show_tissue)

        self._guard(go)

    def _show_tissue(self, tm: TissueMask) -> None:
        from .._napari.layers import add_or_update, frame_kwargs
        from ..core.tissue import TISSUE_COLOR, TISSUE_LABEL

        self.session.tissue = tm
        kw = frame_kwargs(tm.frame)
        kw["metadata"]["lnmeta"]["tissue"] = tm.attrs()["tissue"]
        kw.update(name=TISSUE_LAYER, opacity=0.4)
        layer = add_or_update(self.viewer, tm.labels(), kw, "labels")
        try:
            from napari.utils.colormaps import DirectLabelColormap

            layer.colormap = DirectLabelColormap(color_dict={
                None: (0, 0, 0, 0), 0: (0, 0, 0, 0),
                TISSUE_LABEL: tuple(c / 255 for c in TISSUE_COLOR)})
        except ImportError:  # older napari: keep the default label colours
            pass
        pct = 100 * tm.area_fraction
        self.panel.status.setText(f"tissue: {pct:.1f}% of the slide "
                                  f"(threshold {tm.threshold:.3g})")

    def _grid_job(self, slide: Slide, tissue_params: dict[str, Any], params: dict[str, Any],
                  tissue: TissueMask | None):
        from ..core.tiling import make_grid_job
        from ..core.tissue import tissue_mask_job

        if tissue is None:
            yield Progress(0, 1, "tissue")
            tissue = yield from tissue_mask_job(slide, **tissue_params)
        grid = yield from make_grid_job(slide, tissue=tissue, **params)
        return tissue, grid

    def run_grid(self) -> None:
        """Compute the patch grid over tissue and show it (Shapes or Points)."""
        def go():
            slide = self._slide()
            tparams, gparams = self.tissue_params(), self.grid_params()
            tissue = self.session.tissue
            self._start(lambda: self._grid_job(slide, tparams, gparams, tissue),
                        self._show_grid)

        self._guard(go)

    def _show_grid(self, result) -> None:
        from .._napari.layers import add_or_update

        tissue, grid = result
        if self.session.tissue is not tissue:
            self._show_tissue(tissue)
        self.session.grid = grid
        kw = grid.layer_kwargs()
        kw["name"] = GRID_LAYER
        if len(grid) <= MAX_SHAPES:
            if GRID_LAYER in self.viewer.layers:  # Shapes data replacement is slow: rebuild
                self.viewer.layers.remove(GRID_LAYER)
            kw.update(shape_type="rectangle", edge_color="yellow", face_color="transparent",
                      edge_width=max(grid.size0 / 40, 1.0))
            add_or_update(self.viewer, list(grid.shapes_data()), kw, "shapes")
        else:
            kw.update(size=grid.size0 * 0.9, symbol="square", face_color="transparent",
                      border_color="yellow")
            add_or_update(self.viewer, grid.points_data(), kw, "points")
        self.panel.status.setText(f"grid: {len(grid)} patches of {grid.patch_size} px")

    def _fit_job(self, slide: Slide, method: str, tissue: TissueMask | None):
        from ..core.stain import fit_slide_target

        yield Progress(0, 1, f"fitting {method}")
        target = fit_slide_target(slide, method, tissue=tissue)
        yield Progress(1, 1, f"fitting {method}")
        return target

    def run_fit(self) -> None:
        """Fit a normalisation target on random tissue patches of the slide."""
        def go():
            slide = self._slide()
            method = self.stain_method.currentText()
            tissue = self.session.tissue
            self._start(lambda: self._fit_job(slide, method, tissue), self._set_target)

        self._guard(go)

    def _set_target(self, target: StainTarget) -> None:
        self.session.target = target
        self.stain_method.setCurrentText(target.method)
        self.panel.status.setText(f"{target.method} target fitted on {target.n_pixels} "
                                  "tissue pixels")

    def _preview_job(self, slide: Slide, box, target: StainTarget | None, method: str):
        from ..core.stain import normalise
        from ..io.stain_target import StainTarget

        yield Progress(0, 2, "reading view")
        rgb, ds = read_box(slide, box)
        yield Progress(1, 2, "normalising")
        if target is None:
            target = StainTarget.default(method if method != "reinhard" else "macenko")
        out = normalise(rgb, target)
        yield Progress(2, 2, "normalising")
        return out, ds, box[:2], target

    def run_preview(self) -> None:
        """Normalise the visible part of the slide and show it over the slide."""
        def go():
            slide = self._slide()
            box = visible_box(self.viewer, slide,
                              self.viewer.layers[self.session.layer_name])
            target = self.session.target
            if target is not None and target.method != self.stain_method.currentText():
                target = None
            method = self.stain_method.currentText()
            if target is None and method == "reinhard":
                raise InputError("Reinhard needs a fitted target: click 'Fit target on slide' "
                                 "or load one")
            self._start(lambda: self._preview_job(slide, box, target, method),
                        self._show_preview)

        self._guard(go)

    def _show_preview(self, result) -> None:
        from .._napari.layers import add_or_update, frame_kwargs
        from ..io.frame import SlideFrame

        out, ds, origin, target = result
        slide = self.session.slide
        frame = SlideFrame(downsample=ds, origin=(float(origin[0]), float(origin[1])),
                           slide_mpp=slide.mpp if slide else None,
                           slide=slide.name if slide else None,
                           slide_shape=tuple(slide.shape) if slide else None)
        kw = frame_kwargs(frame)
        kw["metadata"]["lnmeta"]["stain"] = target.to_json()
        kw.update(name=PREVIEW_LAYER, rgb=True, contrast_limits=(0, 255))
        if PREVIEW_LAYER in self.viewer.layers:  # its shape changes with the view
            self.viewer.layers.remove(PREVIEW_LAYER)
        add_or_update(self.viewer, out, kw, "image")
        self.panel.status.setText(f"preview: {target.method}, {out.shape[1]}x{out.shape[0]} px")

    # -- files ---------------------------------------------------------------------------
    def _save_grid_dialog(self) -> None:
        if self.session.grid is None:
            self.panel.status.setText("compute a grid first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save patch grid", "grid.npz", "*.npz")
        if path:
            self._guard(lambda: self.session.grid.save(path, overwrite=True))

    def _load_target_dialog(self) -> None:
        from ..io.stain_target import StainTarget

        path, _ = QFileDialog.getOpenFileName(self, "Load stain target", "", "*.json")
        if path:
            self._guard(lambda: self._set_target(StainTarget.load(path)))

    def _save_target_dialog(self) -> None:
        if self.session.target is None:
            self.panel.status.setText("fit or load a target first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save stain target", "target.json", "*.json")
        if path:
            self._guard(lambda: self.session.target.save(path, overwrite=True))
