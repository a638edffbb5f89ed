"""Public patch datasets into patch sets: a PatchCamelyon-format HDF5 pair and a
folder-per-class set made from the real LC25000 patches in shared data, imported,
trained and evaluated through the CLI, split by group (the source tile)."""

from __future__ import annotations

import csv
import json
from collections import OrderedDict

import numpy as np
import pytest

from napari_lnmeta.cli import main
from napari_lnmeta.train.datasets import PatchSet

PER_GROUP = 6


@pytest.fixture(scope="module")
def lc(shared_data):
    """Six images of each of the first four groups of every class of LC25000 (rows of
    labels.csv); the last two groups of each class are held out."""
    root = shared_data / "lc25000_lung_224"
    rows = list(csv.DictReader((root / "labels.csv").read_text().splitlines()))
    by = OrderedDict()
    for r in rows:
        by.setdefault(r["group"], []).append(r)
    picked, val = [], []
    for prefix in ("lung_n_", "lung_aca_", "lung_scc_"):
        groups = [g for g in by if g.startswith(prefix)][:4 if prefix == "lung_n_" else 2]
        for g in groups:
            picked += by[g][:PER_GROUP]
        val += groups[-2:] if prefix == "lung_n_" else groups[-1:]
    return root, picked, sorted(val)


def _load(path, size):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def pcam(tmp_path_factory, lc):
    """A PatchCamelyon-format pair (96 px, 'x' / 'y' datasets) + meta CSV (wsi column)."""
    import h5py

    root, rows, _ = lc
    tmp = tmp_path_factory.mktemp("pcam")
    x = np.stack([_load(root / r["path"], 96) for r in rows])
    y = np.array([int(r["label"]) for r in rows], np.uint8).reshape(-1, 1, 1, 1)
    with h5py.File(tmp / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(8, 96, 96, 3), compression="gzip")
    with h5py.File(tmp / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    with open(tmp / "camelyonpatch_level_2_split_train_meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
        for i, r in enumerate(rows):
            w.writerow([i, i, r["label"] == "1", r["label"] == "1", r["group"]])
    return tmp / "camelyonpatch_level_2_split_train_x.h5", x, y.reshape(-1)


def _train_eval(tmp, ps_path, val, capsys):
    out = tmp / "run"
    assert main(["train", str(ps_path), "--val-slides", ",".join(val), "--arch",
                 "lnmeta_cnn_small", "--epochs", "2", "--batch-size", "16", "--lr", "3e-3",
                 "--device", "cpu", "--workers", "1", "--in-memory", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "last.safetensors"), str(ps_path), "--n-boot", "50",
                 "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] > 0 and 0.0 <= res["metrics"]["AUC"] <= 1.0
    meta = json.loads(json.dumps(PatchSet.load(ps_path).meta))
    return out, res, meta


def test_pcam_hdf5_import_train_evaluate(pcam, lc, tmp_path, capsys, one_torch_thread):
    x_path, x, y = pcam
    ps_path = tmp_path / "pcam.npz"
    assert main(["import-patches", str(x_path), "--out", str(ps_path)]) == 0
    assert "0.972 µm/px" in capsys.readouterr().out
    ps = PatchSet.load(ps_path)
    assert ps.classes == ["normal", "tumour"] and ps.patch_size == 96
    assert ps.read_mpp == pytest.approx(0.972) and len(ps) == len(y)
    assert {e.source for e in ps.slides} == {"pcam"}
    # one slide per wsi of the meta CSV; pixels and labels survive exactly
    assert sorted(ps.slide_names()) == sorted({r["group"] for r in lc[1]})
    order = []
    for e in ps.slides:
        order += [i for i, r in enumerate(lc[1]) if r["group"] == e.name]
    got = ps.read(np.arange(len(ps)))
    np.testing.assert_array_equal(got, x[order])
    np.testing.assert_array_equal(ps.labels, y[order])
    # train on some groups, evaluate on others (split by slide = PCam wsi)
    _train_eval(tmp_path, ps_path, lc[2], capsys)


def test_folder_per_class_import_with_groups_and_mix(pcam, lc, tmp_path, capsys,
                                                     one_torch_thread):
    root, rows, val = lc
    folder = tmp_path / "set"
    for r in rows:  # a folder per LC25000 class, files copied as they are
        d = folder / r["lc25000_class"]
        d.mkdir(parents=True, exist_ok=True)
        (d / (root / r["path"]).name).write_bytes((root / r["path"]).read_bytes())
    ps_path = tmp_path / "lc.npz"
    assert main(["import-patches", str(folder), "--groups", str(root / "labels.csv"),
                 "--class-map", "lung_n=normal", "--class-map", "lung_aca=tumour",
                 "--class-map", "lung_scc=tumour", "--mpp", "1.0", "--patch-size", "96",
                 "--source", "lc25000", "--out", str(ps_path)]) == 0
    capsys.readouterr()
    ps = PatchSet.load(ps_path)
    assert ps.classes == ["normal", "tumour"] and ps.patch_size == 96
    assert ps.read_mpp == pytest.approx(224 / 96)  # resized from 224 px at 1.0 µm/px
    assert sorted(ps.slide_names()) == sorted({r["group"] for r in rows})
    first = ps.slides[int(ps.slide_index[0])].name
    src_row = next(r for r in rows if r["group"] == first)
    np.testing.assert_array_equal(ps.read([0])[0], _load(root / src_row["path"], 96))
    assert ps.labels[0] == int(src_row["label"])
    _train_eval(tmp_path, ps_path, val, capsys)

    # mixing sources: PCam and the folder set, half each
    pc_path = tmp_path / "pcam.npz"
    assert main(["import-patches", str(pcam[0]), "--out", str(pc_path)]) == 0
    assert main(["train", str(pc_path), str(ps_path), "--mix", "pcam=0.5", "--mix",
                 "lc25000=0.5", "--arch", "lnmeta_cnn_small", "--epochs", "1",
                 "--batch-size", "16", "--max-steps", "1", "--device", "cpu", "--workers", "1",
                 "--out", str(tmp_path / "mix")]) == 0
    err = capsys.readouterr().err
    assert "train: <PatchSet" in err


def test_import_refusals(pcam, tmp_path, capsys):
    import h5py

    x_path = pcam[0]
    bad = tmp_path / "bad_x.h5"
    bad.write_bytes(x_path.read_bytes())
    with h5py.File(tmp_path / "bad_y.h5", "w") as f:
        f.create_dataset("y", data=np.full((3, 1, 1, 1), 2, np.uint8))
    assert main(["import-patches", str(bad), "--out", str(tmp_path / "o.npz")]) == 2
    err = capsys.readouterr().err
    assert "bad_y.h5" in err and "\n" not in err.strip()
    assert not (tmp_path / "o.npz").exists() and not (tmp_path / "o.mosaics").exists()
    table = tmp_path / "t.csv"
    table.write_text("path,label\nmissing.png,0\n")
    assert main(["import-patches", str(table), "--out", str(tmp_path / "o.npz")]) == 2
    assert "no such image" in capsys.readouterr().err
