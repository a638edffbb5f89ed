"""Hostile cases: never lose the user's data, one writer per output, exact resume.

Outputs pointed at inputs, ``--overwrite`` onto folders that are not ours, cohort ids
that are paths, concurrent writers, stale temporaries and locks of killed runs, damaged
checkpoints and operating-system errors. Small real slides only (CMU-1-Small-Region,
the skimage IHC image), so each case runs in seconds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ._framework import ROOT, Spec, Workspace, case

CMU = "cmu1_small_region_svs/CMU-1-Small-Region.svs"
IHC = "skimage_ihc_dab/ihc.png"


def _cmu(ws: Workspace, dest: str | None = None) -> Path:
    return ws.copy_shared(CMU, dest)


def _hold_lock(target: Path, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holding the writer lock on ``target`` (until it exits)."""
    ready = target.with_name(f"{target.name}.held")
    code = ("import sys, time, pathlib\n"
            "from napari_lnmeta.io.atomic import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    pathlib.Path(sys.argv[2]).write_text('x')\n"
            "    time.sleep(float(sys.argv[3]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-c", code, str(target), str(ready), str(seconds)],
                            env=env, stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() - t0 > 60:
            raise RuntimeError("the lock holder did not start")
        time.sleep(0.05)
    ready.unlink()
    return proc


def _scaling_transform(fixed: Path, moving: Path, path: Path) -> None:
    """A real transform file (the moving image stretched over the fixed slide)."""
    import numpy as np

    from napari_lnmeta.core.registration import SlideInfo, Transform
    from napari_lnmeta.io.slide import open_slide

    f, m = open_slide(fixed), open_slide(moving)
    sy, sx = m.shape[0] / f.shape[0], m.shape[1] / f.shape[1]
    Transform(matrix=np.diag([sy, sx, 1.0]),
              fixed=SlideInfo(f.name if hasattr(f, "name") else None, f.shape, f.mpp),
              moving=SlideInfo(None, m.shape, m.mpp)).save(path)


def _predict_argv(slide: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", str(slide), "-o", str(out), "--device", "cpu", "--workers", "1", *extra]


# --------------------------------------------------------------------------------------
# Outputs pointed at inputs
# --------------------------------------------------------------------------------------
@case("tissue -o the folder holding the slide --overwrite", expect="error")
def _tissue_onto_slide_folder(ws: Workspace) -> Spec:
    slide = _cmu(ws, "slides/CMU-1.svs")
    (slide.parent / "notes.txt").write_text("patient notes\n")
    return Spec(["tissue", str(slide), "-o", str(slide.parent), "--overwrite"],
                inputs=[slide.parent])


@case("tissue -o the slide itself --overwrite", expect="error")
def _tissue_onto_slide(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    return Spec(["tissue", str(slide), "-o", str(slide), "--overwrite"], inputs=[slide])


@case("tissue -o a symlink to the slide's folder --overwrite", expect="error")
def _tissue_symlink(ws: Workspace) -> Spec:
    slide = _cmu(ws, "slides/CMU-1.svs")
    link = ws.path("link")
    link.symlink_to(slide.parent, target_is_directory=True)
    return Spec(["tissue", str(slide), "-o", str(link), "--overwrite"], inputs=[slide.parent])


@case("tissue --overwrite onto another slide file (not a result)", expect="error")
def _tissue_onto_other_slide(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    other = _cmu(ws, "other.svs")
    return Spec(["tissue", str(slide), "-o", str(other), "--overwrite"], inputs=[slide, other])


@case("tissue --overwrite onto a user's folder of files", expect="error")
def _tissue_onto_user_folder(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    user = ws.path("thesis", "chapter1.txt")
    user.write_text("years of work\n")
    return Spec(["tissue", str(slide), "-o", str(user.parent), "--overwrite"],
                inputs=[slide, user.parent])


@case("tissue --overwrite replaces its own earlier mask", expect="success")
def _tissue_replaces_own(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mask.ome.zarr")

    def before(ws: Workspace) -> None:
        from napari_lnmeta.cli import main

        assert main(["tissue", str(slide), "-o", str(out), "--target-mpp", "20"]) == 0

    def check(ws: Workspace) -> str | None:
        attrs = json.loads((out / ".zattrs").read_text())["lnmeta"]
        if abs(attrs["downsample"] * 0.499 - 20) < 2:
            return "the old mask (20 µm/px) is still there"
        return None

    return Spec(["tissue", str(slide), "-o", str(out), "--overwrite"], inputs=[slide],
                outputs=[out], before=before, check=check)


@case("transfer-mask -o its own --transform --overwrite", expect="error")
def _transfer_onto_transform(ws: Workspace) -> Spec:
    fixed = _cmu(ws)
    moving = ws.copy_shared(IHC)
    tr = ws.path("transform.json")
    _scaling_transform(fixed, moving, tr)
    return Spec(["transfer-mask", str(fixed), str(moving), "--transform", str(tr), "-o", str(tr),
                 "--overwrite"], inputs=[fixed, moving, tr])


def _check_registration_argv(ws: Workspace, out: Path, *extra: str) -> tuple[list[str], list]:
    fixed = _cmu(ws)
    moving = ws.copy_shared(IHC)
    tr = ws.path("transform.json")
    _scaling_transform(fixed, moving, tr)
    return (["check-registration", str(fixed), str(moving), "--transform", str(tr), "-o",
             str(out), "--size", "128", "-q", *extra], [fixed, moving, tr])


@case("check-registration writes both images into a new folder", expect="success")
def _check_registration_ok(ws: Workspace) -> Spec:
    out = ws.path("check")
    argv, inputs = _check_registration_argv(ws, out)

    def check(ws: Workspace) -> str | None:
        missing = [n for n in ("checkerboard.png", "difference.png") if not (out / n).is_file()]
        return f"missing {', '.join(missing)}" if missing else None

    return Spec(argv, inputs=inputs, outputs=[out], check=check)


@case("check-registration --overwrite onto the user's own checkerboard.png", expect="error")
def _check_registration_user_png(ws: Workspace) -> Spec:
    out = ws.path("figures")
    user = ws.path("figures", "checkerboard.png")
    user.write_bytes(b"the user's figure")
    argv, inputs = _check_registration_argv(ws, out, "--overwrite")
    return Spec(argv, inputs=[*inputs, user])


@case("check-registration -o an existing file", expect="error")
def _check_registration_onto_file(ws: Workspace) -> Spec:
    out = ws.path("notes.txt")
    out.write_text("keep me\n")
    argv, inputs = _check_registration_argv(ws, out, "--overwrite")
    return Spec(argv, inputs=[*inputs, out])


@case("check-registration with the slides swapped (transform of other slides)", expect="error")
def _check_registration_swapped(ws: Workspace) -> Spec:
    argv, inputs = _check_registration_argv(ws, ws.path("check"))
    argv[1], argv[2] = argv[2], argv[1]
    return Spec(argv, inputs=inputs)


@case("predict whose slide is named overview.png inside -o --overwrite", expect="error")
def _predict_overview_png(ws: Workspace) -> Spec:
    out = ws.path("result")
    slide = ws.copy_shared(IHC, "result/overview.png")
    return Spec(_predict_argv(slide, out, "--overwrite"), inputs=[out])


@case("predict --overwrite into a folder of the user's files", expect="error")
def _predict_foreign_folder(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mine")
    (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text('{"mine": true}')
    (out / "data.xlsx").write_bytes(b"PK\x03\x04 not ours")
    return Spec(_predict_argv(slide, out, "--overwrite"), inputs=[slide, out])


@case("predict -o a path under a regular file", expect="error")
def _predict_under_file(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    f = ws.path("afile.txt")
    f.write_text("x")
    return Spec(_predict_argv(slide, f / "out"), inputs=[slide, f])


@case("tissue -o under /proc (the OS refuses the folder)", expect="error")
def _tissue_os_error(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    return Spec(["tissue", str(slide), "-o", "/proc/lnmeta-nope/mask.ome.zarr"], inputs=[slide])


@case("warp-points -o a character device (/dev/null) --overwrite", expect="error")
def _warp_to_device(ws: Workspace) -> Spec:
    tr = ws.path("t.json")
    tr.write_text("{}")
    pts = ws.path("p.csv")
    pts.write_text("X,Y\n1,2\n")
    return Spec(["warp-points", str(tr), str(pts), "-o", "/dev/null", "--overwrite"],
                inputs=[tr, pts])


# --------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------
def _cohort_csv(ws: Workspace, rows: list[dict[str, str]], name: str = "cohort.csv") -> Path:
    p = ws.path(name)
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return p


def _batch(table: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(table), "--step", "tissue", "-o", str(out), "--scheduler", "sync",
            "--retries", "0", *extra]


@case("batch with a cohort id '..'", expect="error")
def _batch_dotdot(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    table = _cohort_csv(ws, [{"slide": str(slide), "id": ".."}])
    out = ws.path("run", "out")
    return Spec(_batch(table, out), inputs=[slide.parent, table])


@case("batch with an absolute cohort id", expect="error")
def _batch_abs_id(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    victim = ws.path("victim", "keep.txt")
    victim.write_text("keep")
    table = _cohort_csv(ws, [{"slide": str(slide), "id": str(victim.parent)}])
    return Spec(_batch(table, ws.path("out")), inputs=[slide.parent, victim.parent, table])


@case("batch with a cohort id '../x'", expect="error")
def _batch_escape_id(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    table = _cohort_csv(ws, [{"slide": str(slide), "id": "../x"}])
    return Spec(_batch(table, ws.path("out")), inputs=[slide.parent, table],
                check=None)


@case("batch with ids that differ only in case", expect="error")
def _batch_case_ids(ws: Workspace) -> Spec:
    a = _cmu(ws, "in/a.svs")
    b = _cmu(ws, "in/b.svs")
    table = _cohort_csv(ws, [{"slide": str(a), "id": "Patient"}, {"slide": str(b), "id": "patient"}])
    return Spec(_batch(table, ws.path("out")), inputs=[a.parent, table])


@case("batch -o the slides' folder beside a user folder patient_A/", expect="error")
def _batch_into_slides_folder(ws: Workspace) -> Spec:
    slide = _cmu(ws, "cohort/patient_A.svs")
    notes = ws.path("cohort", "patient_A", "consent.pdf")
    notes.write_bytes(b"%PDF-1.4 signed consent")
    return Spec(_batch(slide.parent, slide.parent), inputs=[slide, notes.parent])


@case("batch -o a folder holding a user's cohort_summary.csv", expect="error")
def _batch_user_summary(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    out = ws.path("out")
    out.mkdir()
    user = out / "cohort_summary.csv"
    user.write_text("patient,stage\nA,II\n")
    return Spec(_batch(slide.parent, out), inputs=[slide.parent, user])


@case("batch -o the slides' folder without clashes (documented success)", expect="success")
def _batch_beside_slides(ws: Workspace) -> Spec:
    slide = _cmu(ws, "cohort/patient_B.svs")

    def check(ws: Workspace) -> str | None:
        if not (slide.parent / "patient_B" / "result.json").is_file():
            return "no result folder for patient_B"
        return None

    return Spec(_batch(slide.parent, slide.parent), inputs=[slide], check=check)


@case("batch --overwrite reruns a finished cohort and keeps its own summary", expect="success")
def _batch_overwrite(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    out = ws.path("out")
    stale = out / ".CMU-1.tmp-0badc0de"

    def before(ws: Workspace) -> None:
        from napari_lnmeta.cli import main

        assert main(_batch(slide.parent, out)) == 0
        (out / "CMU-1" / "result.json").write_text(json.dumps(
            {**json.loads((out / "CMU-1" / "result.json").read_text()), "seconds": -1.0}))
        stale.mkdir()

    def check(ws: Workspace) -> str | None:
        rec = json.loads((out / "CMU-1" / "result.json").read_text())
        if rec["seconds"] == -1.0:
            return "--overwrite did not run the finished slide again"
        if stale.exists():
            return f"stale temporary {stale.name} left behind"
        return None

    return Spec(_batch(slide.parent, out, "--overwrite"), inputs=[slide], outputs=[out],
                before=before, check=check)


# --------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------
@case("tissue to an -o another process is writing", expect="error")
def _tissue_locked(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mask.ome.zarr")
    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide],
                before=lambda ws: _hold_lock(out, 30.0))


@case("predict into a folder another predict is writing (other --dtype)", expect="error")
def _predict_locked(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("res")
    return Spec(_predict_argv(slide, out, "--dtype", "uint8"), inputs=[slide],
                before=lambda ws: _hold_lock(out, 30.0))


@case("batch into an -o another batch is writing", expect="error")
def _batch_locked(ws: Workspace) -> Spec:
    slide = _cmu(ws, "in/CMU-1.svs")
    out = ws.path("out")
    return Spec(_batch(slide.parent, out), inputs=[slide],
                before=lambda ws: _hold_lock(out, 30.0))


@case("tissue takes over the lock file of a killed run", expect="success")
def _tissue_stale_lock(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mask.ome.zarr")
    lock = out.with_name(f".{out.name}.lock")
    lock.write_text(json.dumps({"pid": 2 ** 22 + 17, "host": os.uname().nodename}))

    def check(ws: Workspace) -> str | None:
        if lock.exists():
            return "lock file left behind"
        return None if (out / ".zattrs").is_file() else "no mask written"

    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide], outputs=[out],
                check=check)


@case("stale .X.ome.zarr.tmp-* of a killed run is removed by the next run", expect="success")
def _tissue_stale_tmp(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mask.ome.zarr")
    stale = ws.path(".mask.ome.zarr.tmp-deadbeef", "0", ".zarray")
    stale.write_text("{}")
    unrelated = ws.path(".mask.ome.zarr.tmp-notours")
    unrelated.write_text("a name of the user's")

    def check(ws: Workspace) -> str | None:
        if stale.parent.parent.exists():
            return "stale temporary left behind"
        if not unrelated.exists():
            return "removed a file whose name is not one of ours"
        return None

    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide, unrelated],
                outputs=[out], check=check)


@case("a result caught between the two renames of a replace is restored", expect="error")
def _restore_old(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("mask.ome.zarr")

    def before(ws: Workspace) -> None:
        from napari_lnmeta.cli import main

        assert main(["tissue", str(slide), "-o", str(out)]) == 0
        os.replace(out, out.with_name(f".{out.name}.old-0123abcd"))

    # without --overwrite the restored mask is an existing result: refused, and kept
    return Spec(["tissue", str(slide), "-o", str(out)], inputs=[slide], before=before)


# --------------------------------------------------------------------------------------
# Resume checkpoints
# --------------------------------------------------------------------------------------
def _interrupted_predict(slide: Path, out: Path, *, stride: int | None = None) -> None:
    """Start a predict run and cancel it after its first batch (checkpoint on disk)."""
    from napari_lnmeta.core.inference import InferenceConfig
    from napari_lnmeta.core.predict import predict_to_folder_job

    cfg = InferenceConfig(device="cpu", workers=1, batch_size=8, stride=stride)
    job = predict_to_folder_job(slide, out, cfg)
    for p in job:
        if p.message == "inference":
            break
    job.close()
    assert (out / ".partial" / "state.zarr").is_dir() and not (out / "summary.json").exists()


@case("predict resumes over a damaged checkpoint chunk", expect="success")
def _predict_corrupt_chunk(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out, ref = ws.path("res"), ws.path("ref")

    def before(ws: Workspace) -> None:
        from napari_lnmeta.cli import main

        _interrupted_predict(slide, out)
        chunk = out / ".partial" / "state.zarr" / "probability" / "0.0"
        data = bytearray(chunk.read_bytes())
        for i in range(16, len(data), 7):
            data[i] ^= 0xA5
        chunk.write_bytes(bytes(data))
        assert main(_predict_argv(slide, ref, "--batch-size", "8")) == 0

    def check(ws: Workspace) -> str | None:
        import numpy as np

        from napari_lnmeta.io.omezarr import read_ome_zarr

        a = np.asarray(read_ome_zarr(out / "probability.ome.zarr").data)
        b = np.asarray(read_ome_zarr(ref / "probability.ome.zarr").data)
        if not np.array_equal(a, b):
            return f"resumed heatmap differs from an uninterrupted run ({np.abs(a - b).max()})"
        return None if not (out / ".partial").exists() else "checkpoint left behind"

    return Spec(_predict_argv(slide, out, "--batch-size", "8"), inputs=[slide],
                outputs=[out], before=before, check=check)


@case("predict resuming a .partial made with another --stride", expect="error")
def _predict_other_stride(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("res")
    return Spec(_predict_argv(slide, out, "--stride", "8"), inputs=[slide],
                before=lambda ws: _interrupted_predict(slide, out))


@case("predict --overwrite over a .partial made with another --stride", expect="success")
def _predict_other_stride_overwrite(ws: Workspace) -> Spec:
    slide = _cmu(ws)
    out = ws.path("res")

    def check(ws: Workspace) -> str | None:
        s = json.loads((out / "summary.json").read_text())
        return None if s["parameters"]["stride"] == 8 else f"stride {s['parameters']['stride']}"

    return Spec(_predict_argv(slide, out, "--stride", "8", "--overwrite"), inputs=[slide],
                outputs=[out], before=lambda ws: _interrupted_predict(slide, out), check=check)
