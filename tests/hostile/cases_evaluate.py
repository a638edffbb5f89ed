"""Hostile cases for ``lnmeta evaluate-slides``: ground truth that cannot be a mask, and
truth or detections in another frame than the slide. Each must end in a clear error, not
a FROC number."""

from __future__ import annotations

import json

import numpy as np

from ._framework import Spec, Workspace, case

LOW_RES = (7168, 3072)  # tumor_001 at level 5 (1/32 of the scan)
MPP5 = 7.776


def _prediction(ws: Workspace, shape=LOW_RES, mpp=MPP5, points=((3927.0, 2226.0),)):
    """A prediction folder for tumor_001 on the level-5 slide: one detection on the tumour."""
    folder = ws.path("pred", "tumor_001")
    folder.mkdir(parents=True, exist_ok=True)
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [c, r]},
              "properties": {"measurements": {"probability": 0.9}}} for r, c in points]
    (folder / "lesions.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                        "features": feats}))
    (folder / "summary.json").write_text(json.dumps({
        "format": "lnmeta-prediction", "version": 1, "complete": True,
        "slide": {"path": "tumor_001.tif", "name": "tumor_001.tif",
                  "shape": list(shape), "mpp": mpp},
        "score": {"max": 0.9, "top_k_mean": 0.9, "top_k": 10}}))
    return ws.path("pred")




@case("evaluate-slides: level-0 CAMELYON16 polygons against a level-5 slide", expect="error")
def _wrong_frame(ws: Workspace) -> Spec:
    pred = _prediction(ws)
    truth = ws.path("truth", "Tumor_001.json")
    truth.write_bytes((ws.shared / "camelyon16_tumor001_lowres" / "Tumor_001.json").read_bytes())
    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "-o", str(ws.path("report"))], inputs=[pred, truth.parent])


@case("evaluate-slides: the same polygons with --truth-scale 1/32", expect="success")
def _right_frame(ws: Workspace) -> Spec:
    pred = _prediction(ws)
    truth = ws.path("truth", "Tumor_001.json")
    truth.write_bytes((ws.shared / "camelyon16_tumor001_lowres" / "Tumor_001.json").read_bytes())
    out = ws.path("report")

    def check(ws: Workspace) -> str | None:
        rep = json.loads((out / "report.json").read_text())
        hits = rep["froc"]["score"] if rep.get("froc") else None
        return None if hits and hits >= 0.5 else f"expected the detection to hit, got {hits}"

    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "--truth-scale", "0.03125", "-o", str(out)],
                inputs=[pred, truth.parent], outputs=[out], check=check)


@case("evaluate-slides: an RGB thumbnail named *_mask.png as ground truth", expect="error")
def _rgb_mask(ws: Workspace) -> Spec:
    from PIL import Image

    pred = _prediction(ws)
    truth = ws.path("truth", "tumor_001_mask.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (224, 96, 3), dtype=np.uint8)).save(truth)
    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "-o", str(ws.path("report"))], inputs=[pred, truth.parent])


@case("evaluate-slides: a grey-level picture named *_mask.png as ground truth", expect="error")
def _grey_mask(ws: Workspace) -> Spec:
    from PIL import Image

    pred = _prediction(ws)
    truth = ws.path("truth", "tumor_001_mask.png")
    grad = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (224, 1))
    Image.fromarray(grad).save(truth)
    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "-o", str(ws.path("report"))], inputs=[pred, truth.parent])


@case("evaluate-slides: a mask of another aspect ratio than the slide", expect="error")
def _other_mask(ws: Workspace) -> Spec:
    from PIL import Image

    pred = _prediction(ws)
    truth = ws.path("truth", "tumor_001_mask.png")
    m = np.zeros((300, 300), np.uint8)
    m[100:120, 100:120] = 255
    Image.fromarray(m).save(truth)
    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "-o", str(ws.path("report"))], inputs=[pred, truth.parent])


@case("evaluate-slides: detections in level-0 pixels of the scan on a level-5 slide",
      expect="error")
def _points_elsewhere(ws: Workspace) -> Spec:
    pred = _prediction(ws, points=((125000.0, 71000.0), (130000.0, 72000.0)))
    truth = ws.path("truth", "tumor_001_mask.png")
    truth.write_bytes((ws.shared / "camelyon16_tumor001_lowres" /
                       "tumor_001_level5_tumor_mask.png").read_bytes())
    return Spec(["evaluate-slides", str(pred), str(truth.parent), "--n-boot", "10",
                 "-o", str(ws.path("report"))], inputs=[pred, truth.parent])
