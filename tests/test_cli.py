"""The ``lnmeta`` command: info, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from napari_lnmeta.cli import main


def test_info_text_and_json(cmu1, capsys):
    assert main(["info", str(cmu1)]) == 0
    out = capsys.readouterr().out
    assert "openslide:aperio" in out and "0.4990 µm/px" in out and "2220 x 2967" in out
    assert main(["info", str(cmu1), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["level_dimensions"] == [[2220, 2967]]
    assert d["objective_power"] == 20.0 and d["vendor"] == "aperio"


def test_info_mpp_override_and_warning(ihc_png, capsys):
    assert main(["info", str(ihc_png)]) == 0
    cap = capsys.readouterr()
    assert "unknown (use --mpp)" in cap.out and "pixel size unknown" in cap.err
    assert main(["info", str(ihc_png), "--mpp", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mpp"] == 0.5 and d["mpp_source"] == "user"


@pytest.mark.parametrize("content, name", [(None, "missing.svs"), (b"", "empty.tif"),
                                           (b"hello\n", "text.tif")])
def test_bad_input_exit_code_one_line_no_traceback(tmp_path, content, name):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "napari_lnmeta.cli", "info", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and lines[0].startswith("lnmeta: error:")


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("lnmeta") or str(__import__("pathlib").Path(sys.executable).parent / "lnmeta")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "info" in proc.stdout
