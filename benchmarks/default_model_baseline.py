"""The bundled default model vs a colour-statistics baseline on the held-out region.

A logistic regression on per-patch colour statistics (RGB mean, std, 10/50/90th
percentiles) is trained on the same training patches as the default model and both are
scored on the held-out region; DeLong's test compares the two AUCs. At 7.8 µm/px most of
what separates metastasis from node tissue is colour, so a model that does not beat this
baseline has learnt little more than colour (see docs/training.md).

Run (after the two ``lnmeta make-patches`` commands of docs/training.md)::

    python benchmarks/default_model_baseline.py TRAIN.npz HELDOUT.npz [--model FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

HOLDOUT = (4050, 0, 7168, 3072)


def colour_features(ps) -> np.ndarray:
    x = ps.read(np.arange(len(ps))).reshape(len(ps), -1, 3).astype(np.float64) / 255
    q = np.percentile(x, [10, 50, 90], axis=1).transpose(1, 0, 2).reshape(len(ps), -1)
    return np.c_[x.mean(1), x.std(1), q]


def main(argv=None) -> int:
    from sklearn.linear_model import LogisticRegression

    from napari_lnmeta.core.metrics import auc_bootstrap_ci, delong_test
    from napari_lnmeta.models.io import default_model_path
    from napari_lnmeta.progress import run
    from napari_lnmeta.train.datasets import PatchSet, split_by_region
    from napari_lnmeta.train.evaluate import evaluate_job

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train", help="patch set the model was trained from (all patches)")
    ap.add_argument("heldout", help="patch set to score (only the held-out region is used)")
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--margin", type=float, default=16)
    args = ap.parse_args(argv)

    train, _ = split_by_region(PatchSet.load(args.train), HOLDOUT, margin=args.margin)
    _, test = split_by_region(PatchSet.load(args.heldout), HOLDOUT)
    train.load_pixels()
    test.load_pixels()
    clf = LogisticRegression(max_iter=2000, class_weight="balanced")
    clf.fit(colour_features(train), train.labels)
    base = clf.predict_proba(colour_features(test))[:, 1]
    ev = run(evaluate_job(args.model, test, device="cpu"))
    out = {"n": len(test), "counts": test.counts().tolist(),
           "model_auc_ci": auc_bootstrap_ci(test.labels, ev.score),
           "colour_auc_ci": auc_bootstrap_ci(test.labels, base),
           "delong_model_vs_colour": delong_test(test.labels, ev.score, base).to_dict()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
