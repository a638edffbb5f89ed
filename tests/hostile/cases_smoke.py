"""Baseline hostile cases: a missing slide and a valid info call."""

from __future__ import annotations

from ._framework import Spec, Workspace, case


@case("info on a missing file", expect="error")
def _missing(ws: Workspace) -> Spec:
    return Spec(["info", str(ws.path("nope.svs"))])


@case("info on a real SVS", expect="success")
def _info(ws: Workspace) -> Spec:
    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
    return Spec(["info", str(slide)], inputs=[slide])
