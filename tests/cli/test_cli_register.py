"""``lnmeta register``, ``warp-points`` and ``transfer-mask`` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_lnmeta.cli import main

PREFIX = "29-041-Izd2-w35-"


@pytest.fixture(scope="module")
def anhir_dir(shared_data):
    return shared_data / "anhir_cima_lung_lesion3_he_ihc"


def _write_points(src, dst, factor=0.1):
    """ANHIR landmarks (50 % frame) → level-0 px of the 5 % image, with an extra column."""
    with open(src, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(dst, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(rows[0] + ["note"])
        for r in rows[1:]:
            w.writerow([r[0], float(r[1]) * factor, float(r[2]) * factor, f"point {r[0]}"])


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_register_and_warp_points(anhir_dir, tmp_path, capsys):
    he = anhir_dir / "images" / f"{PREFIX}He-les3.jpg"
    ihc = anhir_dir / "images" / f"{PREFIX}CD31-3-les3.jpg"
    t = tmp_path / "t.json"
    assert main(["register", str(he), str(ihc), "-o", str(t), "--mode", "affine",
                 "--threads", "1", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    d = json.loads(t.read_text())
    assert d["format"] == "lnmeta-transform" and d["mode"] == "affine" and d["field"] is None
    assert main(["register", str(he), str(ihc), "-o", str(t), "--mode", "rigid", "-q"]) == 2
    assert "already exists" in capsys.readouterr().err

    pts = tmp_path / "ihc_points.csv"
    _write_points(anhir_dir / "landmarks" / f"{PREFIX}CD31-3-les3.csv", pts)
    out = tmp_path / "in_he.csv"
    assert main(["warp-points", str(t), str(pts), "-o", str(out)]) == 0
    src, got = _read(pts), _read(out)
    assert got[0] == src[0] and src[0][1:] == ["X", "Y", "note"]  # header, index column kept
    assert [r[0] for r in got] == [r[0] for r in src] and [r[3] for r in got] == [r[3] for r in src]
    mapped = np.array([[float(r[2]), float(r[1])] for r in got[1:]])
    he_lm = np.array([[float(r[2]), float(r[1])] for r in _read(
        anhir_dir / "landmarks" / f"{PREFIX}He-les3.csv")[1:]]) * 0.1
    rtre = np.median(np.linalg.norm(mapped - he_lm, axis=1)) / np.hypot(661, 892)
    assert rtre < 0.0075
    back = tmp_path / "back.csv"
    assert main(["warp-points", str(t), str(out), "-o", str(back), "--inverse"]) == 0
    orig = np.array([[float(r[1]), float(r[2])] for r in src[1:]])
    again = np.array([[float(r[1]), float(r[2])] for r in _read(back)[1:]])
    np.testing.assert_allclose(again, orig, atol=1e-3)


def test_warp_points_bad_csv(tmp_path, capsys):
    from napari_lnmeta.core.registration import SlideInfo, Transform

    t = Transform(np.eye(3), SlideInfo("a", (10, 10), None), SlideInfo("b", (10, 10), None))
    t.save(tmp_path / "t.json")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["warp-points", str(tmp_path / "t.json"), str(bad), "-o",
                 str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs columns X and Y" in err[0]


def test_register_unrelated_slides_fails_cleanly(anhir_dir, cmu1, tmp_path, capsys):
    he = anhir_dir / "images" / f"{PREFIX}He-les3.jpg"
    code = main(["register", str(cmu1), str(he), "-o", str(tmp_path / "t.json"),
                 "--mode", "affine", "--threads", "1", "-q"])
    assert code == 2
    assert "registration of" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


def test_transfer_mask_writes_labels_and_geojson(ihc_png, tmp_path, capsys):
    from PIL import Image

    from napari_lnmeta.core.registration import SlideInfo, Transform
    from napari_lnmeta.io.omezarr import read_ome_zarr

    with Image.open(ihc_png) as im:
        rgb = np.asarray(im.convert("RGB"))
    fixed = tmp_path / "fixed.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb))).save(fixed)
    h, w = rgb.shape[:2]
    # fixed = np.rot90(moving): fixed (r, c) shows moving (c, w - 1 - r)
    t = Transform(np.array([[0.0, 1, 0], [-1, 0, w - 1], [0, 0, 1]]),
                  SlideInfo("fixed.png", (w, h), 0.5), SlideInfo("ihc.png", (h, w), 0.5))
    t.save(tmp_path / "t.json")
    out, gj = tmp_path / "mask.ome.zarr", tmp_path / "mask.geojson"
    args = ["transfer-mask", str(fixed), str(ihc_png), "--transform", str(tmp_path / "t.json"),
            "-o", str(out), "--geojson", str(gj), "--mpp", "0.5", "--mask-mpp", "1.0",
            "--fibrosis-um", "5", "-q"]
    assert main(args) == 0
    assert "DAB threshold" in capsys.readouterr().out
    res = read_ome_zarr(out)
    assert res.kind == "labels" and res.frame.downsample == 2.0 and res.frame.slide_mpp == 0.5
    labels = res.data.compute()
    assert labels.shape == (w // 2, h // 2) and set(np.unique(labels)) == {0, 1, 2}
    assert 0.3 < (labels == 1).mean() < 0.8
    feats = json.loads(gj.read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in feats} == {"tumour", "fibrosis"}
    # the slides do not match the transform: one-line error
    small = tmp_path / "small.png"
    Image.fromarray(rgb[:100, :120]).save(small)
    assert main(["transfer-mask", str(small), str(ihc_png), "--transform",
                 str(tmp_path / "t.json"), "-o", str(tmp_path / "x.ome.zarr"), "-q"]) == 2
    assert "transform" in capsys.readouterr().err
