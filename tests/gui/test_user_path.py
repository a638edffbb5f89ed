"""The scientist's path: napari in a fresh process, real files, every widget's main button.

Each test starts ``tests/gui/drive.py`` in a new Python process (nothing imported before
napari creates its OpenGL canvas: not torch, not torchvision, not this package), which
opens real slides with ``viewer.open(..., plugin="napari-lnmeta")``, docks widgets by their
manifest names, clicks their main buttons, waits for the workers and checks the layers.
A segmentation fault shows here as a negative return code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DRIVE = Path(__file__).with_name("drive.py")
pytestmark = pytest.mark.slow


def drive(scenario: str, out: Path, **args) -> dict:
    env = dict(os.environ)
    env.pop("NAPARI_ASYNC", None)
    proc = subprocess.run([sys.executable, str(DRIVE), scenario, str(out), json.dumps(args)],
                          capture_output=True, text=True, timeout=560, env=env)
    tail = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode < 0:
        pytest.fail(f"napari died with {signal.Signals(-proc.returncode).name}:\n{tail}")
    assert proc.returncode == 0, tail
    report = json.loads((out / "report.json").read_text())
    assert report["pre_imported"] == []
    assert not [w for w in report["warnings"] if "Private attribute access" in w]
    keep = os.environ.get("LNMETA_GUI_SHOTS")  # e.g. docs/images, to refresh the tutorial
    for name, w in report["widgets"].items():
        if "screenshot" in w:
            assert (out / w["screenshot"]).stat().st_size > 1000, name
            if keep:
                shutil.copyfile(out / w["screenshot"], Path(keep) / f"napari_{w['screenshot']}")
    return report


def test_tissue_and_detect_on_cmu1(cmu1, tmp_path):
    """Open CMU-1 → Tissue & stain → Detect metastases (the bundled model, CPU)."""
    r = drive("slide", tmp_path, slide=str(cmu1))
    assert set(r["widgets"]) == {"Tissue & stain", "Detect metastases"}
    heat = r["widgets"]["Detect metastases"]["layers"]["Tumour probability"]
    assert heat["units"] == ["micrometer", "micrometer"]
    # the bundled model reads 16 px patches at 7.776 µm/px: one heatmap cell per patch
    assert heat["scale_um"][0] == pytest.approx(16 * 7.776, rel=0.01)


def test_train_detect_evaluate_gradcam_on_camelyon(camelyon, tmp_path):
    r = drive("camelyon", tmp_path / "shots", slide=str(camelyon / "tumor_001_level5.ome.tif"),
              mask=str(camelyon / "tumor_001_level5_tumor_mask.png"),
              train_out=str(tmp_path / "train"))
    assert Path(r["widgets"]["Train patch classifier"]["model"]).is_file()
    assert r["widgets"]["Detect metastases (CAMELYON16)"]["layers"]["Lesion candidates"]["n"] > 0
    assert "Grad-CAM" in r["widgets"]["Evaluate"]["layers"]


@pytest.fixture
def he_ihc(ihc_png, tmp_path):
    """The IHC sample as the fixed slide and a rotated copy as the moving one, OME-TIFF in µm."""
    from PIL import Image
    from tests.conftest import write_pyramid_tiff

    rgb = np.asarray(Image.open(ihc_png).convert("RGB"))
    fixed = write_pyramid_tiff(tmp_path / "section_he.ome.tif", rgb, levels=2, mpp=0.5, tile=128)
    moving = write_pyramid_tiff(tmp_path / "section_ihc.ome.tif",
                                np.ascontiguousarray(np.rot90(rgb, -1)), levels=2, mpp=0.5,
                                tile=128)
    return fixed, moving


def test_register_and_transfer_mask(he_ihc, tmp_path):
    fixed, moving = he_ihc
    r = drive("register", tmp_path / "shots", fixed=str(fixed), moving=str(moving))
    assert set(r["widgets"]) == {"Register IHC", "Transfer mask"}


def test_mil(tmp_path):
    from tests._mil_helpers import crop_features, random_mil_file

    path, _cache_dir, cache = crop_features()
    model = random_mil_file(tmp_path / "mil.safetensors", cache.backbone)
    r = drive("mil", tmp_path / "shots", slide=str(path), model=str(model))
    assert len(r["widgets"]["Slide-level MIL"]["layers"]) == 1


def test_batch(shared_data, tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    os.symlink(shared_data / "cmu1_small_region_svs/CMU-1-Small-Region.svs",
               folder / "CMU-1-Small-Region.svs")
    r = drive("batch", tmp_path / "shots", cohort=str(folder), results=str(tmp_path / "out"))
    assert r["widgets"]["Batch"]["status"] == {"CMU-1-Small-Region": "done"}


def test_every_widget_is_narrow_wraps_and_closes_cleanly(cmu1, tmp_path):
    """≤ 420 px wide docked, no long unwrapped label, no viewer connection left after close."""
    r = drive("geometry", tmp_path, slide=str(cmu1))
    assert len(r["geometry"]) == 8
    assert all(g["size_hint_width"] <= 420 for g in r["geometry"].values())
