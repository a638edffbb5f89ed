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


_STARTUP_PROBE = """
import contextlib, io, json, sys
from napari_lnmeta.cli import main
seen = {}
for label, argv in (("--help", ["--help"]), ("info", ["info", sys.argv[1]]),
                    ("train --help", ["train", "--help"]),
                    ("train-spatial --help", ["train-spatial", "--help"])):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    seen[label] = {
        "code": code, "chars": len(out.getvalue()),
        "heavy": sorted(m for m in ("torch", "torchvision", "dask.array", "distributed")
                        if m in sys.modules)}
print(json.dumps(seen))
"""


def test_help_and_info_import_no_torch(cmu1):
    """Building the parser never imports torch: each subcommand is set up only when chosen,
    and the training verbs take their choices from torch-free modules."""
    proc = subprocess.run([sys.executable, "-c", _STARTUP_PROBE, str(cmu1)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(seen) == {"--help", "info", "train --help", "train-spatial --help"}
    for name, r in seen.items():
        assert r["code"] == 0 and r["chars"] > 100, (name, r)
        assert r["heavy"] == [], (name, r)


def test_parser_without_argv_sets_up_every_command():
    from napari_lnmeta.cli import _COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(_COMMANDS)
    assert all(p.get_default("_run") is not None for p in sub.choices.values())
    # with an argument list, only the chosen command is set up
    sub = next(a for a in build_parser(["info", "x"])._actions if a.dest == "command")
    assert sub.choices["info"].get_default("_run") is not None
    assert sub.choices["train"].get_default("_run") is None
