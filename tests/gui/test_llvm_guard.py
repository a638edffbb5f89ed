"""torch/torchvision/triton imported after napari's OpenGL canvas exists, in a fresh process."""

from __future__ import annotations

import subprocess
import sys

from napari_lnmeta import _llvm_guard

AFTER_CANVAS = """
import sys
import napari
viewer = napari.Viewer()
from qtpy.QtWidgets import QApplication
QApplication.processEvents()
assert "torch" not in sys.modules
import napari_lnmeta._qt  # what napari imports first when a widget is docked
import threading
out = {}
def job():  # a worker thread, as in the widgets
    import torch, torchvision.models
    net = torchvision.models.resnet18(weights=None).eval()
    out["y"] = tuple(net(torch.zeros(1, 3, 64, 64)).shape)
t = threading.Thread(target=job); t.start(); t.join()
print("OK", out["y"], "triton" in sys.modules)
viewer.close()
"""


def test_torchvision_after_the_canvas_in_a_worker_thread():
    proc = subprocess.run([sys.executable, "-c", AFTER_CANVAS], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "OK (1, 1000)" in proc.stdout


def test_guard_only_wraps_triton_and_installs_once():
    before = sum(isinstance(f, _llvm_guard._Finder) for f in sys.meta_path)
    _llvm_guard.install()
    _llvm_guard.install()
    after = sum(isinstance(f, _llvm_guard._Finder) for f in sys.meta_path)
    if sys.platform.startswith("linux") and _llvm_guard.TARGET not in sys.modules:
        assert after == 1
    else:
        assert after == before
    finder = _llvm_guard._Finder()
    assert finder.find_spec("numpy", None) is None
    assert finder.find_spec("triton", None) is None
    assert isinstance(_llvm_guard.llvm_mapped(), bool)
