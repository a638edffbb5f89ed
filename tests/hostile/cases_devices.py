"""A device this machine lacks (``--device cuda:3``) is one clean error in every verb."""

from __future__ import annotations

from ._framework import Spec, Workspace, case

SVS = "cmu1_small_region_svs/CMU-1-Small-Region.svs"


@case("train-mil --device cuda:3", expect="error")
def _train_mil(ws: Workspace) -> Spec:
    slide = ws.copy_shared(SVS)
    table = ws.path("cohort.csv")
    table.write_text(f"slide,label\n{slide.name},N0\n{slide.name},N+\n")
    return Spec(["train-mil", str(table), "-o", str(ws.path("out")), "--device", "cuda:3"],
                inputs=[slide, table], outputs=[ws.path("out")])


@case("mil --device cuda:3", expect="error")
def _mil(ws: Workspace) -> Spec:
    slide = ws.copy_shared(SVS)
    model = ws.path("m.safetensors")
    model.write_bytes(b"not read before the device is checked")
    return Spec(["mil", str(slide), "-o", str(ws.path("out")), "--model", str(model),
                 "--device", "cuda:3"], inputs=[slide, model], outputs=[ws.path("out")])


@case("predict --device cuda:3", expect="error")
def _predict(ws: Workspace) -> Spec:
    slide = ws.copy_shared(SVS)
    return Spec(["predict", str(slide), "-o", str(ws.path("out")), "--device", "cuda:3"],
                inputs=[slide], outputs=[ws.path("out")])


@case("register --device cuda:3", expect="error")
def _register(ws: Workspace) -> Spec:
    slide = ws.copy_shared(SVS)
    return Spec(["register", str(slide), str(slide), "-o", str(ws.path("out", "t.json")),
                 "--device", "cuda:3"], inputs=[slide], outputs=[ws.path("out")])
