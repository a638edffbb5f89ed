"""``make demo`` end to end on the bundled sample (coarser stride to keep it quick)."""

from __future__ import annotations

import json

import numpy as np
import torch  # noqa: F401  (torch before the OpenGL canvas; see tests/qt)
from PIL import Image

from napari_lnmeta._napari.demo import main


def test_demo_writes_results_and_a_screenshot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--stride", "16"]) == 0
    printed = capsys.readouterr().out
    assert "lesion candidates" in printed and "screenshot.png" in printed
    summary = json.loads((out / "predict" / "summary.json").read_text())
    assert summary["complete"] and summary["counts"]["patches"] > 20
    assert summary["model"]["architecture"] == "lnmeta_cnn_small"
    for name in ("probability.ome.zarr", "lesions.geojson", "overview.png"):
        assert (out / "predict" / name).exists(), name
    shot = np.asarray(Image.open(out / "screenshot.png").convert("RGB"))
    assert shot.shape[0] > 400 and shot.shape[1] > 600
    assert shot.std() > 10  # the window with a slide in it, not a blank frame
    assert json.loads((out / "slide_info.json").read_text())["mpp"] == 0.499
