"""Hostile cases of pretrained backbones (empty caches, unknown names) and patch-set
imports (broken PatchCamelyon pairs, bad CSVs, folders without classes)."""

from __future__ import annotations

import csv

from ._framework import Spec, Workspace, case


def _empty_caches(ws: Workspace) -> dict[str, str]:
    return {"TORCH_HOME": str(ws.path("torch")), "HF_HOME": str(ws.path("hf")),
            "HF_HUB_OFFLINE": "1"}


def _lc_csv(ws: Workspace, n_per_group: int = 2) -> tuple:
    root = ws.shared / "lc25000_lung_224"
    rows = list(csv.DictReader((root / "labels.csv").read_text().splitlines()))
    groups = ["lung_n_g071", "lung_aca_g108"]
    table = ws.path("t.csv")
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        for g in groups:
            for r in [r for r in rows if r["group"] == g][:n_per_group]:
                w.writerow([root / r["path"], r["label"], g])
    return table, root


@case("train --init imagenet with an empty torch cache", expect="error")
def _init_not_cached(ws: Workspace) -> Spec:
    table, _ = _lc_csv(ws)
    return Spec(["train", str(ws.path("missing.npz")), "--init", "imagenet", "--out",
                 str(ws.path("run"))], env=_empty_caches(ws))


@case("extract-features --backbone uni with an empty Hub cache", expect="error")
def _uni_not_cached(ws: Workspace) -> Spec:
    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
    return Spec(["extract-features", str(slide), "--backbone", "uni", "-o",
                 str(ws.path("f.features.zarr"))], inputs=[slide], env=_empty_caches(ws))


@case("models pull of an unknown name", expect="error")
def _pull_unknown(ws: Workspace) -> Spec:
    return Spec(["models", "pull", "no-such-model"], env=_empty_caches(ws))


@case("models pull of a listed model that is not a timm model", expect="error")
def _pull_conch(ws: Workspace) -> Spec:
    return Spec(["models", "pull", "conch"], env=_empty_caches(ws))


@case("import-patches of a PCam x file without its y file", expect="error")
def _pcam_no_y(ws: Workspace) -> Spec:
    import h5py
    import numpy as np

    x = ws.path("camelyonpatch_level_2_split_valid_x.h5")
    with h5py.File(x, "w") as f:
        f.create_dataset("x", data=np.zeros((4, 96, 96, 3), np.uint8))
    return Spec(["import-patches", str(x), "--out", str(ws.path("o.npz"))], inputs=[x])


@case("import-patches of an HDF5 file that is not PCam", expect="error")
def _pcam_wrong(ws: Workspace) -> Spec:
    import h5py
    import numpy as np

    x = ws.path("data_x.h5")
    with h5py.File(x, "w") as f:
        f.create_dataset("x", data=np.zeros((4, 96, 96), np.float32))
    with h5py.File(ws.path("data_y.h5"), "w") as f:
        f.create_dataset("y", data=np.zeros((4, 1, 1, 1), np.uint8))
    return Spec(["import-patches", str(x), "--out", str(ws.path("o.npz"))], inputs=[x])


@case("import-patches of a text file named .h5", expect="error")
def _pcam_text(ws: Workspace) -> Spec:
    x = ws.path("junk_x.h5")
    x.write_text("not hdf5")
    ws.path("junk_y.h5").write_text("not hdf5")
    return Spec(["import-patches", str(x), "--out", str(ws.path("o.npz"))], inputs=[x])


@case("import-patches of a folder without class folders", expect="error")
def _folder_empty(ws: Workspace) -> Spec:
    d = ws.path("empty", "x.txt")
    d.write_text("")
    return Spec(["import-patches", str(d.parent), "--out", str(ws.path("o.npz"))],
                inputs=[d.parent])


@case("import-patches of a CSV whose label is not a class", expect="error")
def _csv_bad_label(ws: Workspace) -> Spec:
    table, root = _lc_csv(ws)
    text = table.read_text().splitlines()
    text[1] = text[1].rsplit(",", 2)[0] + ",7," + text[1].rsplit(",", 1)[1]
    table.write_text("\n".join(text) + "\n")
    return Spec(["import-patches", str(table), "--classes", "normal,tumour", "--out",
                 str(ws.path("o.npz"))], inputs=[table])


@case("import-patches of a CSV with a corrupt image", expect="error")
def _csv_corrupt_image(ws: Workspace) -> Spec:
    bad = ws.path("bad.png")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    table = ws.path("t.csv")
    table.write_text(f"path,label\n{bad},normal\n{bad},tumour\n")
    return Spec(["import-patches", str(table), "--out", str(ws.path("o.npz"))],
                inputs=[table, bad])


@case("import-patches onto an existing patch set without --overwrite", expect="error")
def _import_exists(ws: Workspace) -> Spec:
    table, _ = _lc_csv(ws)
    out = ws.path("o.npz")
    out.write_bytes(b"keep me")
    return Spec(["import-patches", str(table), "--classes", "normal,tumour", "--out", str(out)],
                inputs=[table, out])


@case("import-patches of a path,label,group CSV of real patches", expect="success")
def _import_ok(ws: Workspace) -> Spec:
    table, _ = _lc_csv(ws)
    out = ws.path("o.npz")

    def check(ws: Workspace) -> str | None:
        from napari_lnmeta.train.datasets import PatchSet

        ps = PatchSet.load(out)
        if len(ps) != 4 or sorted(ps.slide_names()) != ["lung_aca_g108", "lung_n_g071"]:
            return f"unexpected patch set {ps} {ps.slide_names()}"
        return None

    return Spec(["import-patches", str(table), "--classes", "normal,tumour", "--mpp", "1",
                 "--out", str(out)], inputs=[table], outputs=[out], check=check)


@case("extract-features --backbone phikon with an empty Hub cache", expect="error")
def _phikon_not_cached(ws: Workspace) -> Spec:
    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
    out = ws.path("f.features.zarr")
    return Spec(["extract-features", str(slide), "--backbone", "phikon", "-o", str(out)],
                inputs=[slide], outputs=[out], env=_empty_caches(ws))


@case("extract-features from a transformers folder without preprocessor_config.json",
      expect="error")
def _transformers_folder_no_preprocessor(ws: Workspace) -> Spec:
    import json

    slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
    folder = ws.path("enc")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32,
                                                    "num_hidden_layers": 1,
                                                    "num_attention_heads": 2}))
    (folder / "model.safetensors").write_bytes(b"")
    out = ws.path("f.features.zarr")
    return Spec(["extract-features", str(slide), "--backbone", str(folder), "-o", str(out)],
                inputs=[slide], outputs=[out], env=_empty_caches(ws))


@case("train --init phikon (a transformers encoder is no classifier init)", expect="error")
def _train_init_phikon(ws: Workspace) -> Spec:
    table, _ = _lc_csv(ws)
    return Spec(["train", str(ws.path("missing.npz")), "--init", "phikon", "--out",
                 str(ws.path("run"))], env=_empty_caches(ws))
