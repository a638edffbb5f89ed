"""Start-up and fixed costs of the ``lnmeta`` command (CPU, fresh processes).

Prints, in one run:

1. wall seconds of ``python -c pass``, ``lnmeta --help``, ``lnmeta info SLIDE`` and
   ``python -c "import torch"`` (median of several fresh processes; ``--help`` and
   ``info`` must not import torch);
2. cold ``lnmeta predict`` on CMU-1-Small-Region.svs with the bundled model in a fresh
   process: wall time, and where it goes (imports and CLI before the run, model load,
   tissue, batch probe, inference loop, post-processing and writing);
3. the same prediction run a second time in that process (what a cohort worker or the
   napari widget pays per slide once warm: the model cache and the probed batch size).

Run: ``python benchmarks/bench_startup.py [--quick] [--model FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED

SLIDE = SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from napari_lnmeta.cli import main
runs = []
for k, out in enumerate(sys.argv[2:]):
    t = time.perf_counter()
    args = ["predict", sys.argv[1], "-o", out, "--overwrite"] + json.loads({extra!r})
    code = main(args)
    wall = time.perf_counter() - t
    s = json.loads(open(out + '/summary.json').read())
    runs.append({{"code": code, "wall_s": wall, "timing": s["timing"] if s else None,
                  "torch_loaded_before": k > 0}})
print(json.dumps({{"import_s": time.perf_counter() - t0 - sum(r["wall_s"] for r in runs),
                   "runs": runs}}))
"""


def wall(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--model", default=None, help="model file (default: the bundled one)")
    args = ap.parse_args(argv)
    py = sys.executable
    n = 3 if args.quick else 5
    cli = [py, "-m", "napari_lnmeta.cli"]
    probe = ("import sys\nfrom napari_lnmeta.cli import main\n"
             "try:\n main(sys.argv[1:])\nexcept SystemExit: pass\n"
             "assert 'torch' not in sys.modules, 'torch was imported'")
    # 1. start-up of light commands
    base = wall([py, "-c", "pass"], n)
    helps = wall(cli + ["--help"], n)
    info = wall(cli + ["info", str(SLIDE)], n)
    torch_s = wall([py, "-c", "import torch"], max(1, n - 2))
    for a in (["--help"], ["info", str(SLIDE)]):
        subprocess.run([py, "-c", probe] + a, check=True, capture_output=True)
    print(f"python -c pass {base:.3f} s | lnmeta --help {helps:.3f} s | lnmeta info SLIDE "
          f"{info:.3f} s (median of {n}; neither imports torch: checked) | "
          f"python -c 'import torch' {torch_s:.3f} s")
    # 2-3. cold predict, then warm in the same process
    extra = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as td:
        outs = [str(Path(td) / f"run{k}") for k in range(2)]
        t = time.perf_counter()
        proc = subprocess.run([py, "-c", CHILD.format(extra=json.dumps(extra)), str(SLIDE)]
                              + outs, capture_output=True, text=True)
        total = time.perf_counter() - t
    if proc.returncode:
        print(proc.stderr.strip().splitlines()[-1])
        return 1
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for k, r in enumerate(res["runs"]):
        tm = r["timing"]
        run_s = tm["total_s"] + tm.get("postprocess_s", 0.0)
        rest = r["wall_s"] - tm["total_s"]
        label = "cold (fresh process)" if k == 0 else "warm (same process)"
        head = (f"lnmeta predict CMU-1-Small-Region.svs, {label}: "
                + (f"process {total:.2f} s = CLI import {res['import_s']:.2f} s + "
                   if k == 0 else "")
                + f"run {r['wall_s']:.2f} s")
        print(head)
        print(f"    model load {tm['model_s']:.2f} s (cached: {tm.get('model_cached')}), "
              f"tissue {tm['tissue_s']:.2f} s, batch probe {tm['batch_probe_s']:.2f} s "
              f"(probed: {tm.get('batch_probed')}), inference loop {tm['inference_s']:.2f} s "
              f"({tm['patches']} patches), torch import + writing + rest {rest:.2f} s "
              f"[run_inference_job {run_s:.2f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
