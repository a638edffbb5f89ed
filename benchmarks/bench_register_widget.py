"""Register IHC in the napari widget vs ``lnmeta register`` on the same pair and machine.

The ANHIR pair (CIMA lung lesion 3, H&E + CC10 IHC) is registered non-rigidly

1. as the CLI does: ``progress.run(register_job(...))`` in the main thread, ``--threads 1``;
2. in the widget, in a shown napari viewer with both slides opened by our reader: the
   job runs in napari's worker thread while the GUI thread keeps drawing, with the
   widget's default threads (1 on a machine with <= 4 cores);
3. (without ``--quick``) in the widget with threads on "auto" (torch's default, what the
   widget did before it had the control).

Each time runs from the click to the registered IHC layer being in the viewer. Target:
widget / CLI <= 1.5.
"""

from __future__ import annotations

import sys
import time
import warnings

from _common import SHARED

PAIR = SHARED / "anhir_cima_lung_lesion3_he_ihc" / "images"
FIXED = PAIR / "29-041-Izd2-w35-He-les3.jpg"
MOVING = PAIR / "29-041-Izd2-w35-Cc10-5-les3.jpg"


def cli_time(threads: int) -> float:
    from napari_lnmeta.core.registration import RegistrationConfig, register_job
    from napari_lnmeta.io.slide import MppWarning, open_slide
    from napari_lnmeta.progress import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        fixed, moving = open_slide(FIXED), open_slide(MOVING)
    t = time.perf_counter()
    run(register_job(fixed, moving, RegistrationConfig(threads=threads)))
    return time.perf_counter() - t


def widget_time(viewer, threads: int) -> float:
    from qtpy.QtWidgets import QApplication

    from napari_lnmeta._napari.registration_layers import REGISTERED_LAYER
    from napari_lnmeta._qt.register_widget import RegisterWidget

    if REGISTERED_LAYER in viewer.layers:
        viewer.layers.remove(REGISTERED_LAYER)
    w = RegisterWidget(viewer)
    dock = viewer.window.add_dock_widget(w)
    w.fixed_combo.setCurrentIndex(0)
    w.moving_combo.setCurrentIndex(1)
    w.threads.setValue(threads)
    t = time.perf_counter()
    w.panel.run_button.click()
    app = QApplication.instance()
    while w.panel.running:
        app.processEvents()
        time.sleep(0.01)
    if w.panel.last_error is not None:
        raise RuntimeError(w.panel.last_error)
    app.processEvents()
    dt = time.perf_counter() - t
    assert REGISTERED_LAYER in viewer.layers
    viewer.window.remove_dock_widget(dock)
    return dt


def main(argv: list[str]) -> int:
    import os

    import napari
    from napari_lnmeta._qt.register_widget import default_threads

    viewer = napari.Viewer(show=os.environ.get("LNMETA_BENCH_HIDDEN") is None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        viewer.open(FIXED, plugin="napari-lnmeta")
        viewer.open(MOVING, plugin="napari-lnmeta")
    cli = cli_time(1)
    print(f"CLI (--threads 1): {cli:.1f} s")
    wd = widget_time(viewer, default_threads())
    print(f"widget (threads {default_threads() or 'auto'}, the default): {wd:.1f} s, "
          f"ratio to CLI {wd / cli:.2f} (target <= 1.5)")
    if "--quick" not in argv:
        wa = widget_time(viewer, 0)
        print(f"widget (threads auto, as before the control): {wa:.1f} s, ratio to CLI "
              f"{wa / cli:.2f}")
    viewer.close()
    return 0 if wd / cli <= 1.5 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
