"""Plain CNN vs the seed-004 spatial-context model, trained the same way on the same patches.

Data: CAMELYON16 ``tumor_001`` at 7.776 µm/px (the OME-TIFF of ``../shared/data``) with its
expert polygons; 16 px patches, the ``make-patches`` rule (tumour share > 20 % → tumour,
0 % → normal). Split: the region hold-out of the bundled default model (level-0 rows
4050–7168 held out, which hold the smaller metastasis), applied to whole 3 x 3
neighbourhood windows with a 16 px gap, so no pixel a training window reads lies in a
test window. Both models are trained on the *same* centre patches (training stride
``--stride``, default 4) and tested on the *same* held-out centre patches (stride 16, not
overlapping).

* CNN: :func:`napari_lnmeta.train.loop.train_job` on the centre patches, class-balanced
  sampling (``sampler="balanced"``: half normal, half tumour per epoch).
* Spatial: :func:`napari_lnmeta.train.spatial.train_spatial_job` on the 3 x 3 neighbourhoods
  of the same patches, seed-004 sampler (class, then slide, then patch; with one slide
  this is the same class balance), ``CE + β·L_spatial``.
* Same backbone (``lnmeta_cnn_small``), epochs, samples per epoch, batch size, optimiser,
  learning rate, schedule, dihedral augmentation and seed.

Printed: patch-level AUC with a stratified-bootstrap 95 % CI, ACC/SEN/SPE at 0.5, DeLong's
test of the two AUCs on the same patches and, when :mod:`napari_lnmeta.core.froc` is
present, the FROC score on the held-out region: each model runs through the whole-slide
engine (``run_inference_job``, stride 16) on the held-out region's tissue, lesions come from
the engine's non-maximum suppression (threshold 0.5, radius 200 µm, the ``lnmeta predict``
defaults) and are matched against the held-out polygon by the CAMELYON16 rules. The
region holds ONE metastasis, so that FROC is a coarse number (sensitivity is 0 or 1 at
each FP level before interpolation).

Run::

    python benchmarks/compare_spatial.py [--epochs 12] [--stride 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED  # noqa: E402

HOLDOUT = (4050, 0, 7168, 3072)
MARGIN = 16


def _fmt_ci(m: dict) -> str:
    lo, hi = m["AUC_CI"]
    return f"{m['AUC']:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> int:
    import torch

    from napari_lnmeta.core.inference import InferenceConfig, run_inference_job
    from napari_lnmeta.core.metrics import delong_test, evaluate_binary
    from napari_lnmeta.core.tissue import tissue_mask
    from napari_lnmeta.io.annotations import read_camelyon_json
    from napari_lnmeta.io.slide import open_slide
    from napari_lnmeta.models.spatial import SpatialConfig
    from napari_lnmeta.progress import run
    from napari_lnmeta.train.datasets import PatchConfig
    from napari_lnmeta.train.loop import TrainConfig, predict_patches_job, train_job
    from napari_lnmeta.train.spatial import (
        SpatialTrainConfig,
        neighbourhoods_from_slide_job,
        predict_neighbourhoods_job,
        split_neighbourhoods,
        train_spatial_job,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--epoch-size", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--stride", type=int, default=4, help="training grid step (px)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-froc", action="store_true", help="skip the whole-slide FROC part")
    ap.add_argument("--out", default=None, help="keep the run folders here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    d = SHARED / "camelyon16_tumor001_lowres"
    slide = open_slide(d / "tumor_001_level5.ome.tif")
    tissue = tissue_mask(slide, target_mpp=31.0)
    polys = read_camelyon_json(d / "Tumor_001.json", scale=1 / 32)
    base = dict(patch_size=16, balance=False, seed=args.seed)
    ns_train = run(neighbourhoods_from_slide_job(slide, polys, PatchConfig(stride=args.stride, **base),
                                                 k=args.k, tissue=tissue))
    ns_test = run(neighbourhoods_from_slide_job(slide, polys, PatchConfig(stride=16, **base),
                                                k=args.k, tissue=tissue))
    train, _ = split_neighbourhoods(ns_train, region=HOLDOUT, margin=MARGIN)
    _, test = split_neighbourhoods(ns_test, region=HOLDOUT, margin=MARGIN)
    train.load_pixels()
    test.load_pixels()
    train_c, test_c = train.centres(), test.centres()
    train_c.load_pixels()
    test_c.load_pixels()
    t_data = time.perf_counter() - t0
    print(f"train: {train}\ntest:  {test}", file=sys.stderr)

    common = dict(epochs=args.epochs, epoch_size=args.epoch_size, batch_size=args.batch_size,
                  optimizer="adam", lr=args.lr, weight_decay=1e-4, scheduler="cosine",
                  augment="flips", seed=args.seed, device="cpu", workers=1)
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="lnmeta-spatial-"))
    torch.manual_seed(args.seed)
    t1 = time.perf_counter()
    cnn = run(train_job(TrainConfig(architecture="lnmeta_cnn_small", sampler="balanced",
                                    val_every=args.epochs, **common),
                        train_c, None, out_dir=tmp / "cnn", overwrite=True))
    t_cnn = time.perf_counter() - t1
    t2 = time.perf_counter()
    scfg = SpatialConfig(backbone="lnmeta_cnn_small", k=args.k, hidden=args.hidden,
                         bidirectional=args.bidirectional)
    sp = run(train_spatial_job(SpatialTrainConfig(spatial=scfg, beta=args.beta, **common),
                           train, None, out_dir=tmp / "spatial", overwrite=True))
    t_sp = time.perf_counter() - t2

    p_cnn = run(predict_patches_job(cnn.model, test_c, cnn.meta, device="cpu"))[:, 1]
    p_sp = run(predict_neighbourhoods_job(sp.model, test, sp.meta, device="cpu"))[:, 1]
    y = test.labels
    m_cnn, m_sp = evaluate_binary(y, p_cnn), evaluate_binary(y, p_sp)
    dl = delong_test(y, p_sp, p_cnn).to_dict()
    out = {"date_run": time.strftime("%Y-%m-%d"),
           "data": {"train_patches": len(train), "train_tumour": int(train.labels.sum()),
                    "test_patches": len(test), "test_tumour": int(y.sum()),
                    "train_stride": args.stride, "test_stride": 16, "holdout": HOLDOUT,
                    "margin": MARGIN, "k": args.k},
           "settings": {**common, "beta": args.beta, "hidden": args.hidden,
                        "bidirectional": args.bidirectional},
           "cnn": {k: m_cnn[k] for k in ("AUC", "AUC_CI", "ACC", "SEN", "SPE")},
           "spatial": {k: m_sp[k] for k in ("AUC", "AUC_CI", "ACC", "SEN", "SPE")},
           "delong_spatial_vs_cnn": dl,
           "train_loss_last": {"cnn": cnn.history[-1]["train_loss"],
                               "spatial": sp.history[-1]["train_loss"]},
           "seconds": {"data": round(t_data, 1), "train_cnn": round(t_cnn, 1),
                       "train_spatial": round(t_sp, 1)}}

    froc_mod = None
    if not args.no_froc:
        try:
            from napari_lnmeta.core import froc as froc_mod
        except ImportError:
            froc_mod = None
    if froc_mod is not None:
        import dataclasses

        from napari_lnmeta.core.predict import postprocess

        held = [p for p in polys if p.bbox[0] >= HOLDOUT[0]]
        regions = froc_mod.load_truth(held, slide_mpp=slide.mpp)
        m = np.zeros_like(tissue.mask)
        m[int(np.ceil(HOLDOUT[0] / tissue.downsample)):] = True
        region_tissue = dataclasses.replace(tissue, mask=m & tissue.mask)
        out["froc"] = {"regions": regions.n_tumours, "itc": regions.n_itc,
                       "lesion_threshold": 0.5, "lesion_radius_um": 200.0, "stride": 16}
        t3 = time.perf_counter()
        for name, res in (("cnn", cnn), ("spatial", sp)):
            inf = run(run_inference_job(slide, InferenceConfig(model=str(res.last), device="cpu",
                                                           workers=1), tissue=region_tissue))
            pred = postprocess(inf)
            r = froc_mod.match_detections(pred.lesions.coords, pred.lesions.probability,
                                          regions, slide="tumor_001-holdout")
            f = froc_mod.froc_score([r])
            out["froc"][name] = {"score": f["score"], "sensitivity": f["sensitivity"],
                                 "detections": int(len(pred.lesions)),
                                 "hits": r.counts()["hits"], "fp": r.counts()["fp"],
                                 "heatmap_max": float(pred.score["max"]),
                                 "patches": int(len(inf.grid))}
        out["seconds"]["froc"] = round(time.perf_counter() - t3, 1)
    out["seconds"]["total"] = round(time.perf_counter() - t0, 1)

    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    dd = out["data"]
    print(f"held-out patches: {dd['test_patches']} ({dd['test_tumour']} tumour), "
          f"training: {dd['train_patches']} ({dd['train_tumour']} tumour)")
    for name, mm in (("CNN", m_cnn), ("spatial", m_sp)):
        print(f"{name:8s} AUC {_fmt_ci(mm)}  ACC {mm['ACC']:.3f}  SEN {mm['SEN']:.3f}  "
              f"SPE {mm['SPE']:.3f}")
    print(f"DeLong spatial vs CNN: AUC {dl['auc1']:.3f} vs {dl['auc2']:.3f}, z={dl['z']:.2f}, "
          f"p={dl['p']:.3g}")
    if "froc" in out:
        for name in ("cnn", "spatial"):
            f = out["froc"][name]
            print(f"FROC {name:8s} {f['score']:.3f} (sensitivity at 1/4..8 FP: "
                  f"{', '.join(f'{v:.2f}' for v in f['sensitivity'])}; {f['detections']} "
                  f"detections, {f['fp']} FP)")
    print(f"seconds: {out['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
