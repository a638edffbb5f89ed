"""Drive napari as a user does, in a fresh process: ``python drive.py SCENARIO OUT [ARGS_JSON]``.

Nothing of ours, torch or torchvision is imported before the viewer exists. The script opens
real files with ``viewer.open(..., plugin="napari-lnmeta")``, docks widgets by their manifest
names, clicks their main buttons, processes Qt events until the worker is done, checks the
layers it made (type, µm scale, extent equal to the slide's), saves a screenshot per widget
under OUT and writes ``OUT/report.json``. Any failed check exits non-zero with the reason;
a crash shows as a negative return code in the calling test.

Scenarios: ``slide`` (Tissue & stain, Detect metastases), ``camelyon`` (Train, Detect,
Evaluate, Grad-CAM), ``register`` (Register IHC, Transfer mask), ``mil``, ``batch`` and
``geometry`` (every manifest widget: width, wrapping, clean close).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

PLUGIN = "napari-lnmeta"
PRE_IMPORTED = sorted(m for m in ("torch", "torchvision", "triton", "napari_lnmeta", "napari")
                      if m in sys.modules)
MAX_WIDTH = 420
#: manifest display names of every dock widget
WIDGETS = ("Tissue & stain", "Batch", "Detect metastases", "Slide-level MIL",
           "Train patch classifier", "Register IHC", "Transfer mask", "Evaluate")


class Check(AssertionError):
    pass


def need(cond, message):
    if not cond:
        raise Check(message)


def clipped_labels(widget) -> list[str]:
    """Visible word-wrapped labels shown shorter or narrower than their text needs."""
    from qtpy.QtWidgets import QLabel

    return [lb.text()[:40] for lb in widget.findChildren(QLabel)
            if lb.isVisible() and lb.wordWrap() and lb.text()
            and (lb.height() < lb.heightForWidth(lb.width())
                 or lb.minimumSizeHint().width() > lb.width() + 1)]


def pump(cond, timeout: float, what: str) -> None:
    """Process Qt events until ``cond()`` (a safety limit, not a timing assertion)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    t0 = time.monotonic()
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        need(time.monotonic() - t0 < timeout, f"{what}: still running after {timeout:.0f} s")
    app.processEvents()


class Session:
    def __init__(self, out: Path):
        import napari

        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.report: dict = {"pre_imported": PRE_IMPORTED, "widgets": {}, "warnings": []}
        self.viewer = napari.Viewer()
        self.viewer.window.resize(1400, 900)
        self._hook_warnings()
        pump(lambda: True, 5, "start")

    def _hook_warnings(self):
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            self.report["warnings"].append(f"{category.__name__}: {message} ({filename}:{lineno})")
            return original(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def open(self, path, **kw):
        layers = self.viewer.open(str(path), plugin=PLUGIN, **kw)
        pump(lambda: True, 5, "open")
        return layers[0]

    def dock(self, name):
        dock, widget = self.viewer.window.add_plugin_dock_widget(PLUGIN, name)
        pump(lambda: True, 5, "dock")
        self.docks = getattr(self, "docks", {})
        self.docks[name] = dock
        return widget

    def click(self, panel, what, timeout=300):
        panel.run_button.click()
        pump(lambda: not panel.running, timeout, what)
        need(panel.last_error is None, f"{what}: {panel.last_error!r}")
        need(not panel.status.text().startswith(("error", "cancel")),
             f"{what}: status {panel.status.text()!r}")

    def check_layer(self, name, kind, slide_layer, *, tolerance_um=0.0):
        """The layer exists, has the kind, is in µm with the slide's scale, covers the slide."""
        import numpy as np

        def layer_kind(layer):
            return type(layer).__name__.lower()

        need(name in self.viewer.layers, f"no layer {name!r}; have {[ly.name for ly in self.viewer.layers]}")
        ly = self.viewer.layers[name]
        need(layer_kind(ly) == kind, f"{name!r} is {layer_kind(ly)}, not {kind}")
        units = [str(u) for u in ly.units]
        need(units == ["micrometer", "micrometer"], f"{name!r} units {units}")
        mpp = float(slide_layer.scale[-1])
        sc = np.asarray(ly.scale[-2:], dtype=float)
        need(np.all(sc >= mpp * (1 - 1e-6)), f"{name!r} scale {sc} finer than the slide's {mpp} µm/px")
        info = {"type": kind, "scale_um": sc.tolist(), "units": units}
        if kind != "points":
            ext = np.asarray(ly.extent.world)[:, -2:]
            ref = np.asarray(slide_layer.extent.world)[:, -2:]
            tol = max(tolerance_um, float(sc.max())) + 1e-6
            need(np.all(np.abs(ext - ref) <= tol),
                 f"{name!r} extent {ext.tolist()} differs from the slide's {ref.tolist()} "
                 f"by more than {tol} µm")
            info["extent_um"] = ext.tolist()
        else:
            ref = np.asarray(slide_layer.extent.world)[:, -2:]
            pts = np.asarray(ly.data, dtype=float) * sc
            need(len(pts) == 0 or (np.all(pts >= ref[0] - mpp) and np.all(pts <= ref[1] + mpp)),
                 f"{name!r} points outside the slide")
            info["n"] = len(pts)
        return info

    def shot(self, name):
        """Window screenshot (dock included), stored small: 720 px wide, 64-colour PNG."""
        from PIL import Image

        pump(lambda: True, 5, "draw")
        arr = self.viewer.screenshot(canvas_only=False, flash=False)
        img = Image.fromarray(arr[..., :3])
        w = 720
        img = img.resize((w, round(img.height * w / img.width)), Image.LANCZOS)
        img = img.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        path = self.out / f"{name}.png"
        img.save(path, optimize=True)
        return path.name

    def finish(self):
        private = [w for w in self.report["warnings"] if "Private attribute access" in w]
        need(not private, f"private attribute access: {private}")
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1))


# -- scenarios ---------------------------------------------------------------------------
def slide_scenario(s: Session, args: dict):
    from napari_lnmeta._napari.prediction_layers import (
        BINARY_LAYER,
        HEATMAP_LAYER,
        LESIONS_LAYER,
        TIERS_LAYER,
    )
    from napari_lnmeta._qt.tissue_widget import TISSUE_LAYER

    slide = s.open(args["slide"])
    tw = s.dock("Tissue & stain")
    s.click(tw.panel, "Tissue & stain")
    s.report["widgets"]["Tissue & stain"] = {
        "layers": {TISSUE_LAYER: s.check_layer(TISSUE_LAYER, "labels", slide)},
        "screenshot": s.shot("tissue")}
    dw = s.dock("Detect metastases")
    dw.device.setCurrentText("cpu")
    s.click(dw.panel, "Detect metastases")
    layers = {n: s.check_layer(n, k, slide) for n, k in (
        (HEATMAP_LAYER, "image"), (BINARY_LAYER, "labels"), (TIERS_LAYER, "labels"),
        (LESIONS_LAYER, "points"))}
    # two docks stacked in a 900 px window: labels must still show all their text
    need(not clipped_labels(tw) and not clipped_labels(dw),
         f"clipped labels: {clipped_labels(tw) + clipped_labels(dw)}")
    need(s.viewer.layers[HEATMAP_LAYER].colorbar.visible, "the heatmap has no colour bar")
    need("&#9632;" in dw.tier_legend.text() and dw.tier_legend.isVisible(), "no tier legend")
    labels = [t for t in s.viewer.layers[LESIONS_LAYER].text.values if t]
    need(len(labels) == min(10, layers[LESIONS_LAYER]["n"]),
         f"{len(labels)} lesion labels for {layers[LESIONS_LAYER]['n']} lesions (top 10 wanted)")
    s.report["widgets"]["Detect metastases"] = {"layers": layers, "screenshot": s.shot("detect"),
                                                "summary": dw.summary.text(),
                                                "lesion_labels": len(labels)}


def camelyon_scenario(s: Session, args: dict):
    import numpy as np
    from PIL import Image

    from napari_lnmeta._napari.prediction_layers import LESIONS_LAYER
    from napari_lnmeta._qt.evaluate_widget import DETECTIONS_LAYER, GRADCAM_LAYER

    slide = s.open(args["slide"])
    # the expert annotation, painted as a Labels layer on the slide
    mask = (np.asarray(Image.open(args["mask"])) > 0).astype(np.uint8)
    s.viewer.add_labels(mask, name="expert tumour", scale=slide.scale, units=("µm", "µm"))
    trw = s.dock("Train patch classifier")
    need(trw.labels_combo.currentText() == "expert tumour", "Train does not offer the labels")
    trw.add_pair()
    trw.patch_size.setValue(16)
    trw.stride.setValue(64)
    trw.arch.setCurrentText("lnmeta_cnn_small")
    trw.epochs.setValue(1)
    trw.batch_size.setValue(64)
    trw.out_dir.setText(args["train_out"])
    s.click(trw.panel, "Train patch classifier")
    need(trw.session.result is not None and trw.session.result.last.is_file(), "no model saved")
    s.report["widgets"]["Train patch classifier"] = {"model": str(trw.session.result.last),
                                                     "screenshot": s.shot("train")}
    dw = s.dock("Detect metastases")
    dw.device.setCurrentText("cpu")
    s.click(dw.panel, "Detect metastases")
    s.report["widgets"]["Detect metastases (CAMELYON16)"] = {
        "layers": {LESIONS_LAYER: s.check_layer(LESIONS_LAYER, "points", slide)}}
    ew = s.dock("Evaluate")
    ew.pred_combo.setCurrentText(LESIONS_LAYER)
    ew.truth_combo.setCurrentText("expert tumour")
    s.click(ew.panel, "Evaluate")
    need(DETECTIONS_LAYER in s.viewer.layers, "no detections layer")
    layers = {DETECTIONS_LAYER: s.check_layer(DETECTIONS_LAYER, "points", slide)}
    s.viewer.reset_view()
    ew.max_patches.setValue(32)
    s.click(ew.cam_panel, "Grad-CAM of the view")
    layers[GRADCAM_LAYER] = s.check_layer(GRADCAM_LAYER, "image", slide,
                                          tolerance_um=1e9)  # the view only: inside the slide
    s.report["widgets"]["Evaluate"] = {"layers": layers, "screenshot": s.shot("evaluate")}


def register_scenario(s: Session, args: dict):
    from napari_lnmeta._napari.registration_layers import MASK_LAYER, REGISTERED_LAYER

    he = s.open(args["fixed"])
    ihc = s.open(args["moving"])
    rw = s.dock("Register IHC")
    rw.fixed_combo.setCurrentText(he.name)
    rw.moving_combo.setCurrentText(ihc.name)
    rw.mode.setCurrentText("affine")
    s.click(rw.panel, "Register IHC")
    s.report["widgets"]["Register IHC"] = {
        "layers": {REGISTERED_LAYER: s.check_layer(REGISTERED_LAYER, "image", he)},
        "screenshot": s.shot("register")}
    tw = s.dock("Transfer mask")
    need(tw.source_combo.currentText() == REGISTERED_LAYER, "Transfer mask has no source")
    s.click(tw.panel, "Transfer mask")
    s.report["widgets"]["Transfer mask"] = {
        "layers": {MASK_LAYER: s.check_layer(MASK_LAYER, "labels", he)},
        "screenshot": s.shot("transfer")}


def mil_scenario(s: Session, args: dict):
    from napari_lnmeta._qt.mil_widget import ATTENTION_SUFFIX

    slide = s.open(args["slide"])
    mw = s.dock("Slide-level MIL")
    mw.model_path.setText(args["model"])
    mw.load_model_info()
    mw.device.setCurrentText("cpu")
    mw.bags.setValue(4)
    mw.slide_list.selectAll()
    need(mw.selected_slide_names() == [slide.name], "MIL does not offer the slide")
    s.click(mw.panel, "Slide-level MIL")
    name = slide.name + ATTENTION_SUFFIX
    s.report["widgets"]["Slide-level MIL"] = {
        "layers": {name: s.check_layer(name, "image", slide)}, "screenshot": s.shot("mil")}


def batch_scenario(s: Session, args: dict):
    bw = s.dock("Batch")
    bw.cohort.value = Path(args["cohort"])
    bw.out.value = Path(args["results"])
    bw.scheduler.value = "sync"
    bw.step.value = "tissue"
    s.click(bw.panel, "Batch")
    status = {r["id"]: r["status"] for r in bw.report.records}
    need(set(status.values()) == {"done"}, f"batch: {status}")
    s.report["widgets"]["Batch"] = {"status": status, "screenshot": s.shot("batch")}


def geometry_scenario(s: Session, args: dict):
    """Every manifest widget: ≤ 420 px wide at its size hint, labels wrap, closes cleanly."""
    from qtpy.QtWidgets import QLabel

    s.open(args["slide"])
    events = s.viewer.layers.events
    baseline = {n: len(getattr(events, n).callbacks) for n in ("inserted", "removed", "changed")}
    out = {}
    for name in WIDGETS:
        w = s.dock(name)
        if hasattr(w, "model_path"):  # a long model message must wrap, not be clipped
            if hasattr(w, "model_combo"):
                w.model_combo.setCurrentIndex(w.model_combo.count() - 1)
            w.model_path.setText("/no/such/folder/with/a/rather/long/name/for/a/model/file/"
                                 "trained/last/week/on/the/cohort/model.safetensors")
            w.model_path.editingFinished.emit()
            pump(lambda: True, 5, "layout")
        hint = max(w.sizeHint().width(), w.minimumSizeHint().width(), w.width())
        long_labels = [lb.text()[:40] for lb in w.findChildren(QLabel)
                       if len(lb.text()) > 40 and not lb.wordWrap()]
        clipped = clipped_labels(w)
        s.docks[name].title.close_button.click()  # the dock's ✕, as a user closes it
        pump(lambda: True, 5, "close")
        left = {n: len(getattr(events, n).callbacks) - baseline[n] for n in baseline}
        out[name] = {"size_hint_width": hint, "unwrapped_labels": long_labels,
                     "clipped_labels": clipped,
                     "model_info": w.model_info.text() if hasattr(w, "model_info") else None,
                     "connections_left": left}
    s.report["geometry"] = out
    bad = {n: g for n, g in out.items() if g["size_hint_width"] > MAX_WIDTH
           or g["unwrapped_labels"] or g["clipped_labels"] or any(g["connections_left"].values())}
    need(not bad, f"widgets too wide, unwrapped or leaking connections: {bad}")


SCENARIOS = {"slide": slide_scenario, "camelyon": camelyon_scenario,
             "register": register_scenario, "mil": mil_scenario, "batch": batch_scenario,
             "geometry": geometry_scenario}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    scenario, out = argv[0], Path(argv[1])
    args = json.loads(argv[2]) if len(argv) > 2 else {}
    s = Session(out)
    try:
        SCENARIOS[scenario](s, args)
        s.finish()
    except Check as e:
        (out / "report.json").write_text(json.dumps(s.report, indent=1))
        print(f"CHECK FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        s.viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
