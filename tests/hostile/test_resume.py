"""Killed runs: ``--overwrite`` keeps the old result until the new one is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from napari_lnmeta.cli import main

from ._framework import ROOT, checksum


def _files(folder):
    return {k: v for k, v in checksum(folder).items() if not k.startswith(".partial")}


def test_killed_overwrite_keeps_the_old_result_then_resumes(cmu1, tmp_path):
    slide = tmp_path / "CMU-1.svs"
    slide.write_bytes(cmu1.read_bytes())
    out = tmp_path / "res"
    argv = ["predict", str(slide), "-o", str(out), "--device", "cpu", "--workers", "1",
            "--batch-size", "16", "--patch-mpp", "4"]
    assert main(argv + ["--dtype", "uint8"]) == 0
    old = _files(out)
    assert json.loads((out / "summary.json").read_text())["parameters"]["heatmap_dtype"] == "uint8"

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "napari_lnmeta.cli", *argv, "--overwrite"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not (out / ".partial" / "state.zarr").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() - t0 < 120, "the re-run never started its checkpoint"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    # killed mid-run: the old, complete result is untouched
    assert _files(out) == old
    # the same command again resumes and only then replaces it; nothing is left over
    assert main(argv + ["--overwrite"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["parameters"]["heatmap_dtype"] == "float16"
    assert not (out / ".partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CMU-1.svs", "res"]
