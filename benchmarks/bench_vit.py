"""ViT-B/16 feature extraction (MIL) vs the bare forward of the same model, same device.

A ViT-B/16 (timm ``vit_base_patch16_224``, **random weights**: nothing is downloaded) is
written into a temporary Hugging Face cache in the layout the Hub uses for
``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`` and loaded by its name
``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k`` with the Hub offline, as a user's
cached model would be. Then, on one device:

* **bare forward**: patches/s of the model on in-memory batches (already normalised
  float tensors on the device), no reading, no writing;
* **extraction**: patches/s of :func:`~napari_lnmeta.core.features.extract_features_job`
  on CMU-1-Small-Region (real Aperio H&E, 0.499 µm/px) at 224 px: slide reads in a
  thread, uint8 -> normalised input on the device, forward, zarr writes.

The ratio extraction / bare is printed (1.0: reading and writing are hidden behind the
forward; target >= 0.8). On CUDA both use float16 autocast and the batch chosen from free
memory by :func:`~napari_lnmeta.models.extractor.auto_batch_size` (token activations and
attention maps measured by a probe); on CPU a batch of 16.

Run: ``python benchmarks/bench_vit.py [--quick] [--device auto] [--patches N]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, SHARED

CMU1 = SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"
NAME = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--patches", type=int, default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-vit-"))
    os.environ["HF_HOME"] = str(tmp / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))
    try:
        import timm
        import torch
        from tests._backbone_helpers import hf_cache_repo

        from napari_lnmeta.core.features import extract_features_job
        from napari_lnmeta.core.tiling import make_grid
        from napari_lnmeta.io.slide import open_slide
        from napari_lnmeta.models.extractor import auto_batch_size, load_extractor
        from napari_lnmeta.models.io import resolve_device
        from napari_lnmeta.progress import run

        dev = resolve_device(args.device)
        torch.manual_seed(0)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
        hf_cache_repo(tmp / "hf", f"timm/{NAME}", vit, architecture="vit_base_patch16_224")
        del vit
        model, info = load_extractor(f"timm:{NAME}", device=dev)
        cuda = dev.type == "cuda"
        batch = auto_batch_size(model, info, dev, requested=512) if cuda else 16
        n = args.patches or ((4096 if not args.quick else 1024) if cuda
                             else (32 if not args.quick else 16))
        slide = open_slide(CMU1)
        grid = make_grid(slide, patch_size=224, stride=56, mpp=slide.mpp)
        grid = grid.subset(np.arange(min(n, len(grid))))
        n = len(grid)

        def sync():
            if cuda:
                torch.cuda.synchronize(dev)

        def fwd(x):
            if cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    return model(x)
            return model(x)

        x = torch.randn(batch, 3, 224, 224, device=dev)
        with torch.inference_mode():
            fwd(x)
            sync()
            reps = max(2, n // batch)
            t0 = time.perf_counter()
            for _ in range(reps):
                fwd(x)
            sync()
        bare = reps * batch / (time.perf_counter() - t0)
        run(extract_features_job(slide, grid.subset(np.arange(min(batch, n))),
                                 tmp / "warm.features.zarr", extractor=(model, info),
                                 batch_size=batch, device=dev, amp=cuda))
        t0 = time.perf_counter()
        run(extract_features_job(slide, grid, tmp / "cmu1.features.zarr",
                                 extractor=(model, info), batch_size=batch, device=dev,
                                 amp=cuda))
        sync()
        full = n / (time.perf_counter() - t0)
        print(f"device {dev}, torch threads {torch.get_num_threads()}"
              f"{', float16 autocast' if cuda else ''}; backbone {info.id} "
              f"({info.feature_dim}-d, loaded by name from the local Hub cache)", flush=True)
        print(f"ViT-B/16 feature extraction @ 224 px, batch {batch}, {n} patches: "
              f"{full:.1f} patches/s vs bare forward {bare:.1f} patches/s -> ratio "
              f"{full / bare:.2f} (target >= 0.8)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
