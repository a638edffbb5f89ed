"""Numbers a careful user checks: cohort units and the CAMELYON16 FROC read-out."""

from __future__ import annotations

import csv
import json

import numpy as np

from ._framework import Spec, Workspace, case


@case("batch --mpp 0", expect="error")
def _mpp_zero(ws: Workspace) -> Spec:
    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
    return Spec(["batch", str(slide.parent), "--step", "tissue", "-o", str(ws.path("out")),
                 "--mpp", "0", "--scheduler", "sync"], inputs=[slide])


@case("batch --mpp on a slide that has its own µm/px keeps the file's", expect="success")
def _mpp_kept(ws: Workspace) -> Spec:
    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs", "in/cmu1.svs")
    out = ws.path("out")

    def check(ws: Workspace) -> str | None:
        with open(out / "cohort_summary.csv", newline="") as f:
            (row,) = list(csv.DictReader(f))
        if abs(float(row["mpp"]) - 0.499) > 1e-3:
            return f"CMU-1 ran at {row['mpp']} µm/px, not its own 0.499"
        if float(row["tissue_area_mm2"]) > 1.7:
            return f"tissue area {row['tissue_area_mm2']} mm² on a 1.1 x 1.5 mm slide"
        return None

    return Spec(["batch", str(slide.parent), "--step", "tissue", "-o", str(out),
                 "--mpp", "7.776", "--scheduler", "sync"], inputs=[slide], outputs=[out],
                check=check)


@case("evaluate-slides with every lesion hit reads FROC as the challenge's code", expect="success")
def _froc_all_hit(ws: Workspace) -> Spec:
    from PIL import Image

    pred, truth, out = ws.path("pred", "x").parent, ws.path("truth", "x").parent, ws.path("rep")
    m = np.zeros((96, 96), np.uint8)
    m[10:40, 10:40] = 255
    m[55:85, 55:85] = 255
    Image.fromarray(m).save(truth / "tumor_a_mask.png")
    (pred / "tumor_a.csv").write_text(f"0.9,{20 * 32},{20 * 32}\n0.3,{60 * 32},{60 * 32}\n")
    (pred / "normal_a.csv").write_text(f"0.5,{5 * 32},{90 * 32}\n0.2,{90 * 32},{5 * 32}\n")

    def check(ws: Workspace) -> str | None:
        # thresholds {0.2, 0.3, 0.5, 0.9} without the lowest: (0, .5) (.5, .5) (.5, 1)
        froc = json.loads((out / "report.json").read_text())["froc"]
        want = [0.5, 1, 1, 1, 1, 1]
        if not np.allclose(froc["sensitivity"], want, atol=1e-9):
            return f"sensitivities {froc['sensitivity']}, the challenge's code gives {want}"
        return None

    return Spec(["evaluate-slides", str(pred), str(truth), "-o", str(out), "--mpp", "0.243",
                 "--mask-downsample", "32", "--negatives", "normal_a", "--n-boot", "20"],
                inputs=[pred, truth], outputs=[out], check=check)
