"""The Batch widget runs a cohort in a worker while napari stays responsive."""

from __future__ import annotations

import os

from napari_lnmeta._qt.batch_widget import BatchWidget


def test_batch_widget_runs_cohort(make_napari_viewer, qtbot, shared_data, tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    for rel in ("cmu1_small_region_svs/CMU-1-Small-Region.svs", "skimage_ihc_dab/ihc.png"):
        os.symlink(shared_data / rel, folder / os.path.basename(rel))
    (folder / "broken.svs").write_bytes(b"II*\x00garbage")
    viewer = make_napari_viewer()
    w = BatchWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.cohort.value = folder
    w.out.value = tmp_path / "out"
    w.scheduler.value = "sync"
    w.step.value = "tissue"
    w.panel.run_button.click()
    assert w.panel.running and not w.panel.run_button.isEnabled()
    qtbot.waitUntil(lambda: not w.panel.running, timeout=120_000)
    assert w.report is not None
    status = {r["id"]: r["status"] for r in w.report.records}
    assert status == {"CMU-1-Small-Region": "done", "ihc": "done", "broken": "failed"}
    texts = [w.table.item(r, 1).text() for r in range(w.table.rowCount())]
    assert sorted(texts) == ["done", "done", "failed"]
    assert w.panel.status.text() == "done"
