"""Start-up and fixed costs of the ``lnmeta`` command (CPU, fresh processes).

Prints, in one run:

1. wall seconds of ``python -c pass``, ``lnmeta --help``, ``lnmeta info SLIDE`` and
   ``python -c "import torch"`` (median of several fresh processes; ``--help`` and
   ``info`` must not import torch);
2. cold ``lnmeta predict`` on CMU-1-Small-Region.svs with the bundled model in a fresh
   process: wall time, and where it goes (imports and CLI before the run, model load,
   tissue, batch probe, inference loop, post-processing and writing);
3. the same prediction run a second time in that process (what a cohort worker or the
   napari widget pays per slide once warm: the model cache and the probed batch size);
4. loading a resnet18 model file (torch imported): ``load_model`` (built on the meta
   device, the file's tensors assigned) against building the network with random weights
   and copying the file's into it, best of 5 each, in one process; the CPU forward of
   that network as loaded and with its batch norms folded; the folded forward run in
   one kept thread and in a new thread each time.

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
    # 4. a model file's load, as load_model does it and the ordinary way
    proc = subprocess.run([py, "-c", MODEL_LOAD, str(Path(__file__).resolve().parent)],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr.strip().splitlines()[-1])
        return 1
    print("\n".join(proc.stdout.strip().splitlines()[-3:]))
    return 0


MODEL_LOAD = r"""
import sys, tempfile, time
from pathlib import Path
import torch, torchvision.models
sys.path.insert(0, sys.argv[1])
from bench_inference import make_model
from napari_lnmeta.models.io import load_model, read_safetensors
from napari_lnmeta.models.registry import build_model

def best(fn, n=5):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return min(out)

with tempfile.TemporaryDirectory() as td:
    path = make_model("resnet18", 224, 0.5, Path(td) / "r18.safetensors")
    def ordinary():
        net = build_model("resnet18", 2)
        net.load_state_dict(read_safetensors(path)[0])
    new, old = best(lambda: load_model(path)), best(ordinary)
    print(f"resnet18 model file: load_model {new * 1e3:.0f} ms, built with random weights "
          f"and copied {old * 1e3:.0f} ms ({old / new:.1f}x)")
    # the CPU forward: batch norms folded or not; one kept thread or a new one per batch
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from napari_lnmeta.models.patch import fold_batchnorm
    net, _ = load_model(path)
    x = torch.rand(32, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    plain = net.to(memory_format=torch.channels_last)
    folded = fold_batchnorm(net, channels_last=True)
    with torch.inference_mode():
        for m in (plain, folded):
            m(x)
        a, b = best(lambda: plain(x)), best(lambda: folded(x))
    print(f"resnet18 forward, 32 x 96 px on the CPU: {a * 1e3:.0f} ms as loaded, "
          f"{b * 1e3:.0f} ms with batch norms folded ({a / b:.2f}x)")
    def in_new_thread():
        t = threading.Thread(target=lambda: folded(x)); t.start(); t.join()
    def median(fn, n=15):
        out = []
        for _ in range(n):
            t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
        return sorted(out)[n // 2]

    ex = ThreadPoolExecutor(1)
    with torch.inference_mode():
        ex.submit(folded, x).result()
        kept, fresh = median(lambda: ex.submit(folded, x).result()), median(in_new_thread)
    print(f"  the same forward in one kept thread {kept * 1e3:.1f} ms, in a new thread "
          f"each time {fresh * 1e3:.1f} ms (medians of 15; +{(fresh - kept) * 1e3:.1f} ms a "
          "batch)")
"""


if __name__ == "__main__":
    raise SystemExit(main())
