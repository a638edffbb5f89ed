"""Command lines written for the earlier option spellings, and slides without µm/px."""

from __future__ import annotations

import json

from ._framework import Spec, Workspace, case

CMU1 = "cmu1_small_region_svs/CMU-1-Small-Region.svs"


@case("tissue --output (the earlier spelling of -o/--out) onto an existing mask",
      expect="error")
def _old_output_exists(ws: Workspace) -> Spec:
    slide = ws.copy_shared(CMU1)
    out = ws.path("mask.ome.zarr")
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    return Spec(["tissue", str(slide), "--output", str(out)], inputs=[slide, out])


@case("register --output (earlier spelling) writes the transform", expect="success")
def _old_output_register(ws: Workspace) -> Spec:
    slide = ws.copy_shared(CMU1)
    out = ws.path("t.json")

    def check(ws: Workspace) -> str | None:
        return None if out.is_file() else "no transform written"

    return Spec(["register", str(slide), str(slide), "--output", str(out), "--mode", "rigid",
                 "--device", "cpu", "--quiet"], inputs=[slide], outputs=[out], check=check)


@case("predict on a PNG without µm/px runs, its summary says so", expect="success")
def _png_without_mpp(ws: Workspace) -> Spec:
    img = ws.copy_shared("skimage_ihc_dab/ihc.png")
    out = ws.path("pred")

    def check(ws: Workspace) -> str | None:
        s = json.loads((out / "summary.json").read_text())
        return None if s.get("warnings") else "summary.json does not say µm/px was unknown"

    return Spec(["predict", str(img), "-o", str(out), "--device", "cpu"], inputs=[img],
                outputs=[out], check=check)
