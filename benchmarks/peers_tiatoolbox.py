"""``make bench-peers``: ``lnmeta predict`` vs TIAToolbox's PatchPredictor, side by side (CPU).

Same slide (CMU-1-Small-Region.svs), same model architecture (resnet18, two classes,
random weights: speed does not depend on them), same grid (96 px patches at 0.5 µm/px,
stride = patch), same device (CPU), same batch size (32). Each tool runs in a fresh
process of its own environment (TIAToolbox pins zarr 2 and numpy 1.x: ``.venv-peers``),
end to end: model construction or loading, tissue detection, reading, inference (and for
``lnmeta``, writing the result folder). Two clocks:

* **after imports**: each library is imported before the clock starts, as importing
  TIAToolbox's models imports its whole stack (torch, torchvision, scipy, zarr, ...): on
  our side torch, torchvision, the ``lnmeta`` command and the libraries its predict path
  imports on first use (zarr, scipy.ndimage, PIL, tifffile, imagecodecs, simplejpeg,
  openslide);
* **from process start**: the whole child process, interpreter start and every import
  included (what a user waits for from the shell).

In the same process each tool's bare model forward is timed on in-memory batches of the
same size, so each pipeline is reported against its own bare model, and the two
machines' loads are compared fairly. Interleaved rounds (lnmeta, TIAToolbox, lnmeta,
TIAToolbox, ...).

Prints patches/s end to end, the bare forward, their ratio for each tool, and the
ratio lnmeta / TIAToolbox on both clocks (target >= 1.5).

Run: ``python benchmarks/peers_tiatoolbox.py --peer-python .venv-peers/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SHARED

SLIDE = SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
PATCH, MPP, BATCH = 96, 0.5, 32

BARE = r"""
def bare_rate(model, n_batches=6):
    global BARE_S
    t0 = time.perf_counter()
    x = torch.rand({batch}, 3, {patch}, {patch})
    model.eval()
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        t = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        rate = n_batches * {batch} / (time.perf_counter() - t)
    BARE_S = time.perf_counter() - t0
    return rate
"""

OURS = r"""
import json, sys, time
import torch
import torchvision.models  # imported before the clock, as TIAToolbox's import does
from napari_lnmeta.cli import main
from napari_lnmeta.models.io import load_model
import napari_lnmeta.core.predict, napari_lnmeta.cli.predict  # the library, as above
import napari_lnmeta.core.tissue, napari_lnmeta.core.tiling, napari_lnmeta.io.slide
import napari_lnmeta.io.omezarr, napari_lnmeta.models.spatial, safetensors.torch
import zarr, scipy.ndimage, PIL.Image, tifffile, imagecodecs, simplejpeg, openslide
PIL.Image.init()
""" + BARE + r"""
model, out = sys.argv[2], sys.argv[3]
t = time.perf_counter()
code = main(["predict", sys.argv[1], "--model", model, "--device", "cpu", "--batch-size",
             "{batch}", "-o", out, "--overwrite"])
wall = time.perf_counter() - t
assert code == 0, code
s = json.loads(open(out + '/summary.json').read())
net, _ = load_model(model)
bare = bare_rate(net)
print(json.dumps({{"patches": s["counts"]["patches"], "wall_s": wall,
                  "bare": bare, "bare_s": BARE_S, "timing": s["timing"]}}))
"""

PEER = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from tiatoolbox.models import IOPatchPredictorConfig, PatchPredictor
import tiatoolbox.models.architecture.vanilla as vanilla
from tiatoolbox.models.architecture.vanilla import CNNModel
_arch = vanilla._get_architecture  # random weights: never download ImageNet ones
vanilla._get_architecture = lambda name, pretrained=True, **kw: _arch(name, pretrained=False,
                                                                      **kw)
""" + BARE + r"""
torch.manual_seed(0)
t = time.perf_counter()
model = CNNModel("resnet18", num_classes=2)
predictor = PatchPredictor(model=model, batch_size={batch}, verbose=False)
cfg = IOPatchPredictorConfig(input_resolutions=[{{"units": "mpp", "resolution": {mpp}}}],
                             patch_input_shape=[{patch}, {patch}],
                             stride_shape=[{patch}, {patch}])
out = predictor.predict([sys.argv[1]], mode="wsi", ioconfig=cfg, on_gpu=False,
                        return_probabilities=True)
wall = time.perf_counter() - t
n = len(out[0]["predictions"])
bare = bare_rate(model)
print(json.dumps({{"patches": n, "wall_s": wall, "bare": bare, "bare_s": BARE_S}}))
"""


def child(python: str, code: str, *args: str) -> dict:
    import time

    t = time.perf_counter()
    proc = subprocess.run([python, "-c", code, *args], capture_output=True, text=True)
    process_s = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"exit {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the bare-forward timing after the run is not part of the process's job
    out["process_s"] = process_s - out.get("bare_s", 0.0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default=str(Path(__file__).resolve().parents[1]
                                                 / ".venv-peers" / "bin" / "python"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not Path(args.peer_python).exists():
        print(f"no TIAToolbox environment at {args.peer_python}: run `make bench-peers`")
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inference import make_model

    fmt = {"batch": BATCH, "patch": PATCH, "mpp": MPP}
    rows = []
    with tempfile.TemporaryDirectory() as td:
        model = make_model("resnet18", PATCH, MPP, Path(td) / "resnet18.safetensors")
        for k in range(args.rounds):
            ours = child(sys.executable, OURS.format(**fmt), str(SLIDE), str(model),
                         str(Path(td) / f"out{k}"))
            peer = child(args.peer_python, PEER.format(**fmt), str(SLIDE))
            for name, r in (("lnmeta predict", ours), ("TIAToolbox PatchPredictor", peer)):
                r["rate"] = r["patches"] / r["wall_s"]
                r["cold_rate"] = r["patches"] / r["process_s"]
                extra = ""
                if "timing" in r:
                    t = r["timing"]
                    extra = (f" [model {t['model_s']:.2f} s, tissue {t['tissue_s']:.2f} s, "
                             f"loop {t['inference_s']:.2f} s]")
                print(f"round {k + 1}: {name:<26} {r['patches']:>5} patches in "
                      f"{r['wall_s']:.2f} s = {r['rate']:.1f} patches/s end to end | bare "
                      f"forward {r['bare']:.1f} patches/s | end to end / bare "
                      f"{r['rate'] / r['bare']:.2f}{extra} | from process start "
                      f"{r['process_s']:.2f} s = {r['cold_rate']:.1f} patches/s", flush=True)
            rows.append((ours, peer))
    for k, (o, p) in enumerate(rows):
        print(f"round {k + 1}: lnmeta / TIAToolbox = {o['rate'] / p['rate']:.2f}x end to end "
              f"after imports, {o['cold_rate'] / p['cold_rate']:.2f}x from process start "
              f"(patches/s; their own bare forwards: {o['bare']:.1f} vs {p['bare']:.1f}; "
              f"after imports relative to their own bare model: "
              f"{(o['rate'] / o['bare']) / (p['rate'] / p['bare']):.2f}x) (target >= 1.5x)")
    if len(rows) > 1:
        import statistics

        med = statistics.median(o["rate"] / p["rate"] for o, p in rows)
        cold = statistics.median(o["cold_rate"] / p["cold_rate"] for o, p in rows)
        print(f"median of {len(rows)} rounds: {med:.2f}x after imports, {cold:.2f}x from "
              "process start (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
