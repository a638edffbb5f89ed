"""Hostile inputs that must be refused where they enter (or repaired, visibly).

Pixel sizes on the command line and stored in NGFF / OME / Aperio metadata, malformed
OME-Zarr metadata, model files with broken metadata, annotations with NaN vertices or
wrong types, transform files, points CSVs, patch sets, a bad ``predict --truth``, and
damaged JPEG tiles (flipped bytes, zeroed tiles) in copies of the real CAMELYON16 files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ._framework import Spec, Workspace, case

CAM = "camelyon16_tumor001_lowres"
OME = f"{CAM}/tumor_001_level5.ome.tif"
PYRAMID = f"{CAM}/tumor_001_level5_pyramid.tif"
POLYGONS = f"{CAM}/Tumor_001.json"
SVS = "cmu1_small_region_svs/CMU-1-Small-Region.svs"
IHC = "skimage_ihc_dab/ihc.png"


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------
def _ngff(ws: Workspace, name: str = "slide.ome.zarr", *, scale=(0.5, 0.5, 1.0),
          multiscales=None, unit: str = "micrometer") -> Path:
    """A small real RGB OME-Zarr (the scikit-image IHC image) with chosen metadata."""
    import zarr
    from PIL import Image

    arr = np.asarray(Image.open(ws.shared / IHC).convert("RGB"))
    path = ws.path(name)
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    g.create_array("0", data=arr, chunks=(256, 256, 3))
    if multiscales is None:
        multiscales = [{"version": "0.4", "axes": [
            {"name": "y", "type": "space", "unit": unit},
            {"name": "x", "type": "space", "unit": unit},
            {"name": "c", "type": "channel"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": list(scale)}]}]}]
    g.attrs["multiscales"] = multiscales
    return path


def _ome_with_size(ws: Workspace, value: str) -> Path:
    """The CAMELYON16 OME-TIFF with its OME PhysicalSizeX/Y replaced by ``value``."""
    import re

    import tifffile

    slide = ws.copy_shared(OME)
    with tifffile.TiffFile(slide) as tf:
        xml = tf.ome_metadata
    xml = re.sub(r'PhysicalSize([XY])="[^"]*"', rf'PhysicalSize\1="{value}"', xml)
    tifffile.tiffcomment(slide, xml.encode())
    return slide


def _svs_with_mpp(ws: Workspace, value: str) -> Path:
    """CMU-1-Small-Region.svs with the Aperio ``MPP = 0.4990`` replaced in place."""
    slide = ws.copy_shared(SVS)
    data = bytearray(slide.read_bytes())
    old = b"MPP = 0.4990"
    new = b"MPP = " + value.encode().ljust(6)
    assert len(new) == len(old) and data.count(old) >= 1
    slide.write_bytes(bytes(data.replace(old, new)))
    return slide


def _model(ws: Workspace, name: str = "bad.safetensors", **changes) -> Path:
    """The bundled model's weights with its metadata fields replaced by ``changes``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_lnmeta.models.io import default_model_path

    src = default_model_path()
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    meta = json.loads(md["lnmeta"])
    for k, v in changes.items():
        if v is _DROP:
            meta.pop(k, None)
        else:
            meta[k] = v
    md["lnmeta"] = json.dumps(meta)  # json writes NaN as the user's file would
    path = ws.path(name)
    save_file(tensors, str(path), metadata=md)
    return path


_DROP = object()


def _flip_tile(path: Path, *, level: int, index: int, zero: bool = False) -> None:
    """Damage one stored JPEG tile in place: 20 flipped bytes, or all bytes zeroed."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[level].keyframe
        off, count = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    if zero:
        data[off:off + count] = bytes(count)
    else:
        for k in range(20):
            data[off + count // 2 + 37 * k] ^= 0xFF
    path.write_bytes(bytes(data))


def _transform(ws: Workspace, **changes) -> Path:
    d = {"format": "lnmeta-transform", "version": 1, "mode": "affine",
         "fixed": {"name": "he", "shape": [1000, 800], "mpp": 0.5, "path": None},
         "moving": {"name": "ihc", "shape": [1000, 800], "mpp": 0.5, "path": None},
         "matrix": [[1.0, 0.0, 5.0], [0.0, 1.0, -3.0], [0.0, 0.0, 1.0]],
         "metrics": {}, "field": None, "pre": None}
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    p = ws.path("transform.json")
    p.write_text(json.dumps(d))
    return p


def _points(ws: Workspace, text: str | bytes) -> Path:
    p = ws.path("points.csv")
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _warp(ws: Workspace, transform: Path, points: Path) -> Spec:
    out = ws.path("out", "warped.csv")
    return Spec(["warp-points", str(transform), str(points), "-o", str(out)],
                inputs=[transform, points], outputs=[out.parent])


def _predict_l2(ws: Workspace, slide: Path, *extra: str, model: Path | None = None) -> Spec:
    """``predict`` at pyramid level 2 (a few hundred patches) of a CAMELYON16 copy."""
    out = ws.path("result")
    argv = ["predict", str(slide), "-o", str(out), "--level", "2", "--device", "cpu",
            "--batch-size", "64", "--workers", "2", *extra]
    if model is not None:
        argv += ["--model", str(model)]
    inputs = [slide] + ([model] if model is not None else [])
    return Spec(argv, inputs=inputs, outputs=[out])


# --------------------------------------------------------------------------------------
# pixel sizes: one rule, on the command line and in files
# --------------------------------------------------------------------------------------
for _v in ("inf", "1e-300", "1e300", "nan", "0", "-0.5"):
    @case(f"tissue --mpp {_v}", expect="error")
    def _(ws: Workspace, v=_v) -> Spec:
        slide = ws.copy_shared(SVS)
        return Spec(["tissue", str(slide), "-o", str(ws.path("mask.ome.zarr")), "--mpp", v],
                    inputs=[slide], outputs=[ws.root])

for _v in ("inf", "1e-9", "abc"):
    @case(f"predict --patch-mpp {_v}", expect="error")
    def _(ws: Workspace, v=_v) -> Spec:
        slide = ws.copy_shared(SVS)
        return Spec(["predict", str(slide), "-o", str(ws.path("r")), "--patch-mpp", v],
                    inputs=[slide], outputs=[ws.root])


@case("make-patches --labels-mpp 0", expect="error")
def _(ws: Workspace) -> Spec:
    slide, labels = ws.copy_shared(OME), ws.copy_shared(POLYGONS)
    return Spec(["make-patches", "--slide", str(slide), "--labels", str(labels),
                 "--labels-mpp", "0", "--out", str(ws.path("p.npz"))], inputs=[slide, labels])


@case("predict --truth-scale -1", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    return _predict_l2(ws, slide, "--truth-scale", "-1")


for _s in (0, -0.5, 1e9, "abc", 1e-9):
    @case(f"NGFF scale {_s!r} (info)", expect="error")
    def _(ws: Workspace, s=_s) -> Spec:
        z = _ngff(ws, scale=(s, s, 1.0))
        return Spec(["info", str(z)], inputs=[z])


@case("NGFF scale 0 overridden by --mpp (tissue)", expect="success")
def _(ws: Workspace) -> Spec:
    z = _ngff(ws, scale=(0, 0, 1.0))
    out = ws.path("mask.ome.zarr")

    def check(ws):
        return None if out.is_dir() else "no mask written"

    return Spec(["tissue", str(z), "-o", str(out), "--mpp", "0.5"], inputs=[z],
                outputs=[out], check=check)


for _v in ("0", "-7.776", "NaN", "1e9", "INF"):
    @case(f"OME PhysicalSize {_v} (tissue)", expect="error")
    def _(ws: Workspace, v=_v) -> Spec:
        slide = _ome_with_size(ws, v)
        return Spec(["tissue", str(slide), "-o", str(ws.path("m.ome.zarr"))], inputs=[slide],
                    outputs=[ws.root])


for _v in ("0", "-1", "1e+009", "nan"):
    @case(f"Aperio MPP = {_v} (tissue)", expect="error")
    def _(ws: Workspace, v=_v) -> Spec:
        slide = _svs_with_mpp(ws, v)
        return Spec(["tissue", str(slide), "-o", str(ws.path("m.ome.zarr"))], inputs=[slide],
                    outputs=[ws.root])


@case("Aperio MPP = 0 overridden by --mpp (info)", expect="success")
def _(ws: Workspace) -> Spec:
    slide = _svs_with_mpp(ws, "0")
    return Spec(["info", str(slide), "--mpp", "0.499"], inputs=[slide])


# --------------------------------------------------------------------------------------
# malformed OME-Zarr metadata
# --------------------------------------------------------------------------------------
_BAD_MULTISCALES = {
    "multiscales is a string": "abc",
    "datasets missing": [{"axes": ["y", "x", "c"]}],
    "dataset path to nowhere": [{"axes": ["y", "x", "c"], "datasets": [{"path": "9"}]}],
    "dataset path ../..": [{"axes": ["y", "x", "c"], "datasets": [{"path": "../../etc"}]}],
    "axes are numbers": [{"axes": [1, 2, 3], "datasets": [{"path": "0"}]}],
    "two axes for a 3-D array": [{"axes": ["y", "x"], "datasets": [{"path": "0"}]}],
    "scale of the wrong length": [{"axes": [{"name": "y", "unit": "micrometer"},
                                            {"name": "x", "unit": "micrometer"},
                                            {"name": "c"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [0.5]}]}]}],
    "datasets is an object": [{"axes": ["y", "x", "c"], "datasets": {"path": "0"}}],
}
for _k, _ms in _BAD_MULTISCALES.items():
    @case(f"OME-Zarr {_k} (info)", expect="error")
    def _(ws: Workspace, ms=_ms) -> Spec:
        z = _ngff(ws, multiscales=ms)
        return Spec(["info", str(z)], inputs=[z])


# --------------------------------------------------------------------------------------
# model metadata, validated on load
# --------------------------------------------------------------------------------------
_BAD_META = {
    "std 0": {"std": [0.0, 0.224, 0.225]},
    "mean NaN": {"mean": [math.nan, 0.456, 0.406]},
    "std negative": {"std": [-0.2, 0.2, 0.2]},
    "patch 'sixteen'": {"patch_size": "sixteen"},
    "patch 16.5": {"patch_size": 16.5},
    "mpp 'abc'": {"mpp": "abc"},
    "mpp 0": {"mpp": 0},
    "mpp Infinity": {"mpp": math.inf},
    "string stain normalisation": {"normalisation": "macenko"},
    "normalisation target garbage": {"normalisation": {"method": "macenko",
                                                       "target": {"stains": "x"}}},
    "unknown normalisation method": {"normalisation": {"method": "voodoo"}},
    "classes a string": {"classes": "normal,tumour"},
    "head 7": {"head": 7},
    "no architecture": {"architecture": _DROP},
    "extra a list": {"extra": [1, 2]},
}
for _k, _ch in _BAD_META.items():
    @case(f"predict with model metadata {_k}", expect="error")
    def _(ws: Workspace, ch=_ch) -> Spec:
        slide = ws.copy_shared(OME)
        return _predict_l2(ws, slide, model=_model(ws, **ch))


# --------------------------------------------------------------------------------------
# annotations
# --------------------------------------------------------------------------------------
def _make_patches(ws: Workspace, labels: Path, out: Path, slide: Path) -> list[str]:
    return ["make-patches", "--slide", str(slide), "--labels", str(labels), "--labels-mpp",
            "0.243", "--patch-size", "32", "--stride", "16", "--no-balance", "--out", str(out)]


@case("CAMELYON16 polygons with one NaN vertex: repaired, tumour kept", expect="success")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    clean = ws.copy_shared(POLYGONS, "clean.json")
    d = json.loads(clean.read_text())
    biggest = max(d["positive"], key=lambda p: len(p["vertices"]))
    biggest["vertices"][len(biggest["vertices"]) // 2][0] = math.nan
    labels = ws.path("nan_vertex.json")
    labels.write_text(json.dumps(d))  # a real file with a NaN vertex, as json writes it
    out = ws.path("out", "patches.npz")

    def check(ws):
        import contextlib
        import io

        from napari_lnmeta.cli import main
        from napari_lnmeta.train.datasets import PatchSet

        ref = ws.path("ref", "patches.npz")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(_make_patches(ws, clean, ref, slide))
        if rc != 0:
            return "the clean reference run failed"
        got, want = PatchSet.load(out).counts()[1], PatchSet.load(ref).counts()[1]
        if got < 0.95 * want:
            return f"{got} tumour patches with the NaN vertex, {want} without"
        return None

    return Spec(_make_patches(ws, labels, out, slide), inputs=[slide, labels],
                outputs=[out.parent], check=check)


@case("CAMELYON16 polygon whose vertices are all NaN", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    d = json.loads((ws.shared / POLYGONS).read_text())
    d["positive"][0]["vertices"] = [[math.nan, math.nan]] * 5
    labels = ws.path("all_nan.json")
    labels.write_text(json.dumps(d))
    return Spec(_make_patches(ws, labels, ws.path("out", "p.npz"), slide),
                inputs=[slide, labels], outputs=[ws.path("out")])


_BAD_GEOJSON = {
    "features a string": {"type": "FeatureCollection", "features": "abc"},
    "feature a number": {"type": "FeatureCollection", "features": [5]},
    "geometry a list": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": [1, 2], "properties": {}}]},
    "properties a list": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": [1],
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9]]]}}]},
    "coordinates a string": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": "0,0 9,0 9,9"}}]},
    "ring of numbers": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "MultiPolygon", "coordinates": [5, 6]}}]},
    "vertex strings": {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [[["a", "b"], [9, 0], [9, 9]]]}}]},
}
for _k, _g in _BAD_GEOJSON.items():
    @case(f"make-patches with GeoJSON {_k}", expect="error")
    def _(ws: Workspace, g=_g) -> Spec:
        slide = ws.copy_shared(OME)
        labels = ws.path("labels.geojson")
        labels.write_text(json.dumps(g))
        return Spec(_make_patches(ws, labels, ws.path("out", "p.npz"), slide),
                    inputs=[slide, labels], outputs=[ws.path("out")])


# --------------------------------------------------------------------------------------
# predict --truth: refused before inference starts
# --------------------------------------------------------------------------------------
@case("predict --truth with wrong GeoJSON types", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    truth = ws.path("truth.geojson")
    truth.write_text(json.dumps(_BAD_GEOJSON["coordinates a string"]))
    spec = _predict_l2(ws, slide, "--truth", str(truth))
    spec.inputs = [slide, truth]
    return spec


@case("predict --truth that is not an image", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    truth = ws.path("truth.png")
    truth.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    spec = _predict_l2(ws, slide, "--truth", str(truth))
    spec.inputs = [slide, truth]
    return spec


# --------------------------------------------------------------------------------------
# transforms and points
# --------------------------------------------------------------------------------------
_BAD_TRANSFORMS = {
    "without matrix": {"matrix": _DROP},
    "without fixed": {"fixed": _DROP},
    "matrix a string": {"matrix": "identity"},
    "matrix 2x2": {"matrix": [[1, 0], [0, 1]]},
    "singular matrix": {"matrix": [[0, 0, 0], [0, 0, 0], [0, 0, 1]]},
    "NaN in the matrix": {"matrix": [[math.nan, 0, 0], [0, 1, 0], [0, 0, 1]]},
    "shape strings": {"fixed": {"shape": ["a", "b"]}},
    "fixed a list": {"fixed": [1000, 800]},
    "mpp 0": {"moving": {"shape": [10, 10], "mpp": 0}},
    "field a string": {"field": "field.npz"},
    "field file escaping": {"field": {"file": "../../x.npz"}},
    "mode a number": {"mode": 3},
}
for _k, _ch in _BAD_TRANSFORMS.items():
    @case(f"warp-points with a transform {_k}", expect="error")
    def _(ws: Workspace, ch=_ch) -> Spec:
        return _warp(ws, _transform(ws, **ch), _points(ws, "X,Y\n10,20\n30,40\n"))


@case("warp-points with a damaged displacement field", expect="error")
def _(ws: Workspace) -> Spec:
    t = _transform(ws, field={"file": "field.npz"}, mode="nonrigid")
    np.savez(ws.path("field.npz"), origin=np.zeros(2), spacing=np.array([0.0, 8.0]),
             forward=np.zeros((2, 4, 4)), inverse=np.zeros((2, 4, 4)))
    spec = _warp(ws, t, _points(ws, "X,Y\n10,20\n"))
    spec.inputs = [t, ws.path("field.npz"), ws.path("points.csv")]
    return spec


@case("warp-points with NaN in the points CSV", expect="error")
def _(ws: Workspace) -> Spec:
    return _warp(ws, _transform(ws), _points(ws, "X,Y,id\n10,20,a\nnan,40,b\n"))


@case("warp-points with inf in the points CSV", expect="error")
def _(ws: Workspace) -> Spec:
    return _warp(ws, _transform(ws), _points(ws, "X,Y\n10,inf\n"))


@case("warp-points with a binary points file", expect="error")
def _(ws: Workspace) -> Spec:
    return _warp(ws, _transform(ws), _points(ws, bytes(range(256)) * 4))


@case("warp-points with NUL bytes in the CSV", expect="error")
def _(ws: Workspace) -> Spec:
    return _warp(ws, _transform(ws), _points(ws, b"X,Y\n1\x00,2\n"))


@case("warp-points on a valid transform", expect="success")
def _(ws: Workspace) -> Spec:
    spec = _warp(ws, _transform(ws), _points(ws, "X,Y,id\n10,20,a\n30.5,40,b\n"))
    out = Path(spec.argv[4])

    def check(ws):
        rows = out.read_text().splitlines()
        # fixed -> moving adds (5, -3) to (row, col): moving -> fixed subtracts it
        if rows[1:] != ["13.0000,15.0000,a", "33.5000,35.0000,b"]:
            return f"unexpected output {rows}"
        return None

    spec.check = check
    return spec


# --------------------------------------------------------------------------------------
# patch sets
# --------------------------------------------------------------------------------------
def _patchset(ws: Workspace, **changes) -> Path:
    meta = {"format": "lnmeta-patchset", "version": 1, "classes": ["normal", "tumour"],
            "slides": [{"path": str(ws.shared / OME), "name": "t001", "patch_size": 16,
                        "level": None, "mpp": 7.776, "downsample": 1.0, "slide_mpp": 7.776,
                        "mpp_override": None, "source": "default"}], "meta": {}}
    arrays = {"slide_index": np.zeros(4, np.int32),
              "coords": np.array([[1000, 1000], [1200, 1000], [2000, 1500], [3000, 1500]]),
              "labels": np.array([0, 0, 1, 1]), "fractions": np.array([0, 0, 1, 1], np.float32)}
    for k, v in changes.items():
        if k in arrays:
            arrays[k] = v
        elif k == "slide":
            meta["slides"][0].update(v)
        else:
            meta[k] = v
    from napari_lnmeta.train.datasets import PATCHSET_FORMAT

    meta["format"] = PATCHSET_FORMAT if meta["format"] == "lnmeta-patchset" else meta["format"]
    p = ws.path("set.npz")
    np.savez(p, meta=np.array(json.dumps(meta)), **arrays)
    return p


_BAD_SETS = {
    "slides a string": {"slides": "abc"},
    "classes a number": {"classes": 2},
    "patch size 'sixteen'": {"slide": {"patch_size": "sixteen"}},
    "mpp 'abc'": {"slide": {"mpp": "abc"}},
    "downsample 0": {"slide": {"downsample": 0}},
    "unknown slide key": {"slide": {"colour": "red"}},
    "labels beyond the classes": {"labels": np.array([0, 0, 1, 7])},
    "slide index beyond the slides": {"slide_index": np.array([0, 0, 0, 3], np.int32)},
    "coords of the wrong shape": {"coords": np.zeros((4, 3))},
    "NaN fractions": {"fractions": np.array([0, 0, np.nan, 1], np.float32)},
}
for _k, _ch in _BAD_SETS.items():
    @case(f"evaluate a patch set with {_k}", expect="error")
    def _(ws: Workspace, ch=_ch) -> Spec:
        from napari_lnmeta.models.io import default_model_path

        ps = _patchset(ws, **ch)
        return Spec(["evaluate", str(default_model_path()), str(ps), "--device", "cpu",
                     "--n-boot", "10"], inputs=[ps])


# --------------------------------------------------------------------------------------
# corrupt tiles
# --------------------------------------------------------------------------------------
@case("predict on an OME-TIFF with a flipped-byte JPEG tile", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    _flip_tile(slide, level=2, index=10)
    return _predict_l2(ws, slide)


@case("predict on an OME-TIFF with a zeroed tile", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    _flip_tile(slide, level=2, index=10, zero=True)
    return _predict_l2(ws, slide)


@case("tissue on an OME-TIFF with a zeroed tile", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    _flip_tile(slide, level=0, index=170, zero=True)
    return Spec(["tissue", str(slide), "-o", str(ws.path("m.ome.zarr"))], inputs=[slide],
                outputs=[ws.root])


@case("predict on an OpenSlide pyramid TIFF with a flipped-byte tile", expect="error")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(PYRAMID)
    _flip_tile(slide, level=0, index=171)
    return Spec(["predict", str(slide), "-o", str(ws.path("r")), "--mpp", "7.776",
                 "--device", "cpu", "--batch-size", "64", "--workers", "2"],
                inputs=[slide], outputs=[ws.path("r")])


@case("predict --on-corrupt-tile skip marks the cells unknown", expect="success")
def _(ws: Workspace) -> Spec:
    slide = ws.copy_shared(OME)
    _flip_tile(slide, level=2, index=10)
    spec = _predict_l2(ws, slide, "--on-corrupt-tile", "skip")
    out = Path(spec.outputs[0])

    def check(ws):
        import zarr

        s = json.loads((out / "summary.json").read_text())
        n = s["counts"]["unknown_cells"]
        tiles = s["corrupt_tiles"]
        if not n or [(t["level"], tuple(t["tile"])) for t in tiles] != [(2, (3, 1))]:
            return f"unknown cells {n}, corrupt tiles {tiles}"
        if tiles[0]["region"] != [3072, 1024, 4096, 2048]:
            return f"tile region {tiles[0]['region']}"
        heat = np.asarray(zarr.open_group(str(out / "probability.ome.zarr"), mode="r")["0"])
        if int(np.isnan(heat.astype(np.float32)).sum()) != n:
            return "NaN cells in the heatmap differ from unknown_cells"
        analysed = np.asarray(zarr.open_group(str(out / "analysed.ome.zarr"), mode="r")["0"])
        if int((analysed == 2).sum()) != n:
            return "analysed.ome.zarr does not mark the unknown cells"
        if s["counts"]["cells_analysed"] + n != s["counts"]["patches"]:
            return "analysed + unknown cells differ from the patches"
        return None

    spec.check = check
    return spec


@case("tissue on an OME-Zarr with a damaged chunk", expect="error")
def _(ws: Workspace) -> Spec:
    z = _ngff(ws)
    chunk = next(p for p in sorted((z / "0").iterdir()) if not p.name.startswith("."))
    chunk.write_bytes(b"\x02\x01garbage" + bytes(64))
    return Spec(["tissue", str(z), "-o", str(ws.path("m.ome.zarr"))], inputs=[z],
                outputs=[ws.root])
