"""How far the ANHIR lung-lesion-3 landmarks let a registration go (issue #4's target).

Run from the repository root (about a minute on two idle cores)::

    python benchmarks/registration_floor.py

Prints, with the default non-rigid configuration and the landmarks used only to score:

1. the leave-one-out thin-plate spline through the landmarks themselves (79 pairs
   predict the 80th; best of smoothing 0-1000): the smooth field the annotation
   implies, scored like a method;
2. our median rTRE per H&E <- IHC pair with a bootstrap 90 % interval of that median;
3. the correlation of the residual vectors between the four pairs (the same H&E
   landmarks, so a shared residual points at the H&E side) and what subtracting their
   mean would leave (a diagnosis, not a method);
4. the same registration between the IHC sections (numbers in the names: 3, 4, 5, 7).

docs/registration.md quotes these numbers.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from bench_registration import ANHIR, PREFIX, STAINS, landmarks, read_rgb
from scipy.interpolate import RBFInterpolator


def load(stain: str) -> tuple[np.ndarray, np.ndarray]:
    return (read_rgb(ANHIR / "images" / f"{PREFIX}{stain}-les3.jpg"),
            landmarks(ANHIR / "landmarks" / f"{PREFIX}{stain}-les3.csv"))


SMOOTHING = (0, 10, 100, 1000)  # the spline's smoothing; the best is printed


def loo_spline(moving_lm: np.ndarray, fixed_lm: np.ndarray, smoothing: float) -> float:
    """Median error (px) of a thin-plate spline through all landmarks but one, at the
    one left out."""
    err = []
    for i in range(len(moving_lm)):
        keep = np.arange(len(moving_lm)) != i
        f = RBFInterpolator(moving_lm[keep], fixed_lm[keep], kernel="thin_plate_spline",
                            smoothing=smoothing)
        err.append(np.linalg.norm(f(moving_lm[i:i + 1])[0] - fixed_lm[i]))
    return float(np.median(err))


def register_pair(fixed: np.ndarray, moving: np.ndarray):
    from napari_lnmeta.core.registration import RegistrationConfig, register_job
    from napari_lnmeta.progress import run

    return run(register_job(fixed, moving, RegistrationConfig(threads=1)))


def main() -> int:
    he, he_lm = load("He")
    diag = math.hypot(*he.shape[:2])
    rng = np.random.default_rng(0)
    residual = {}
    print("pair            LOO spline on landmarks   ours    bootstrap 90 % of our median")
    for stain in STAINS:
        img, lm = load(stain)
        loo = min(loo_spline(lm, he_lm, sm) for sm in SMOOTHING)
        r = register_pair(he, img).moving_to_fixed(lm) - he_lm
        residual[stain] = r
        err = np.linalg.norm(r, axis=1) / diag
        boot = np.median(err[rng.integers(0, len(err), (5000, len(err)))], axis=1)
        print(f"H&E <- {stain:9s} {loo / diag:.4f}                    "
              f"{np.median(err):.4f}  {np.percentile(boot, 5):.4f}-{np.percentile(boot, 95):.4f}")

    print("\nresidual-vector correlation between pairs (sum r_a.r_b / |r_a||r_b|)")
    for a in STAINS:
        cells = [np.sum(residual[a] * residual[b])
                 / math.sqrt(np.sum(residual[a] ** 2) * np.sum(residual[b] ** 2))
                 for b in STAINS]
        print(f"  {a:9s} " + "  ".join(f"{c:5.2f}" for c in cells))
    shared = np.mean([residual[s] for s in STAINS], axis=0)
    print("  median rTRE after subtracting the four pairs' mean residual (diagnosis only): "
          + ", ".join(f"{s} {np.median(np.linalg.norm(residual[s] - shared, axis=1)) / diag:.4f}"
                      for s in STAINS))

    print("\nIHC <- IHC with the same registration")
    imgs = {s: load(s) for s in STAINS}
    for a, b in itertools.combinations(STAINS, 2):
        (fa, la), (mb, lb) = imgs[a], imgs[b]
        t = register_pair(fa, mb)
        d = math.hypot(*fa.shape[:2])
        print(f"  {a:9s} <- {b:9s} "
              f"{np.median(np.linalg.norm(t.moving_to_fixed(lb) - la, axis=1)) / d:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
