"""Cohort throughput with 1 and 2 Dask workers on this machine (ratio printed).

The cohort is every shared slide, copied twice under distinct names (real files, a
mix of SVS, pyramidal TIFF, OME-TIFF, PNG and JPEG). Step: ``tissue`` (``--step``
chooses another). Cluster start-up and the workers' first imports are excluded: the clock
starts when every worker is up and has imported the step.

Run: ``python benchmarks/bench_batch.py [--quick] [--step tissue]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import SHARED


def make_cohort(folder: Path, copies: int) -> Path:
    slides = [SHARED / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs",
              SHARED / "skimage_ihc_dab" / "ihc.png"]
    slides += sorted((SHARED / "camelyon16_tumor001_lowres").glob("tumor_001_level5*.tif"))
    slides += sorted((SHARED / "anhir_cima_lung_lesion3_he_ihc" / "images").glob("*.jpg"))
    for c in range(copies):
        for s in slides:
            # copies, not links: the cohort loader treats two links to one file as a duplicate
            shutil.copyfile(s, folder / f"c{c}_{s.name}")
    return folder


def _warm(step):
    from napari_lnmeta import batch

    batch.STEPS[step]  # noqa: B018
    import skimage.filters  # noqa: F401
    import skimage.morphology  # noqa: F401

    import napari_lnmeta.core.tissue  # noqa: F401


def timed_run(items, step, out, workers):
    from napari_lnmeta.cohort import run_cohort_job

    t = {}

    def started(client):
        client.wait_for_workers(workers)
        # steady state: every worker imports the step's modules before the clock starts
        client.run(_warm, step)
        t["start"] = time.perf_counter()

    job = run_cohort_job(items, step, out, n_workers=workers, threads_per_worker=1, on_start=started)
    from napari_lnmeta.progress import run

    report = run(job)
    return time.perf_counter() - t["start"], report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--step", default="tissue")
    args = ap.parse_args(argv)
    from napari_lnmeta.cohort import load_cohort

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "cohort").mkdir()
        items = load_cohort(make_cohort(d / "cohort", 1 if args.quick else 2))
        n = len(items)
        t1, r1 = timed_run(items, args.step, d / "w1", 1)
        t2, r2 = timed_run(items, args.step, d / "w2", 2)
    print(f"[batch] {n} slides, step {args.step}: 1 worker {n / t1:.2f} slides/s ({t1:.1f} s), "
          f"2 workers {n / t2:.2f} slides/s ({t2:.1f} s); ratio {t1 / t2:.2f} "
          f"(2 cores; ideal 2.0). Status 1w {r1.counts}, 2w {r2.counts}")
    return 0 if r1.counts == r2.counts == {"done": n} else 1


if __name__ == "__main__":
    raise SystemExit(main())
