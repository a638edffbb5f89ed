"""``lnmeta tissue``, ``lnmeta grid``, ``lnmeta stain-fit`` end to end on a real slide."""

from __future__ import annotations

import json

import numpy as np

from napari_lnmeta.cli import main
from napari_lnmeta.core.tiling import PatchGrid
from napari_lnmeta.core.tissue import TissueMask
from napari_lnmeta.io.omezarr import read_ome_zarr
from napari_lnmeta.io.stain_target import StainTarget


def test_tissue_grid_stain_fit(cmu1, tmp_path, capsys):
    mask = tmp_path / "mask.ome.zarr"
    assert main(["tissue", str(cmu1), "-o", str(mask)]) == 0
    res = read_ome_zarr(mask)
    assert res.kind == "labels" and res.frame.slide_mpp is not None
    assert res.attrs["lnmeta"]["tissue"]["method"] == "otsu"
    tm = TissueMask.load(mask)
    assert 0.1 < tm.area_fraction < 0.9
    out = capsys.readouterr().out
    assert "tissue:" in out and "wrote" in out

    # an existing output is refused in one line, exit status 2
    assert main(["tissue", str(cmu1), "-o", str(mask)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["tissue", str(cmu1), "-o", str(mask), "--overwrite", "--method", "hsv"]) == 0

    grid = tmp_path / "grid.npz"
    assert main(["grid", str(cmu1), "-o", str(grid), "--tissue", str(mask), "--patch-size", "128",
                 "--patch-mpp", "1.0", "--entropy-min", "3"]) == 0
    g = PatchGrid.load(grid)
    assert len(g) > 0 and g.patch_size == 128 and g.mpp == 1.0
    assert (g.entropy >= 3).all()

    target = tmp_path / "target.json"
    assert main(["stain-fit", str(cmu1), "-o", str(target), "--method", "macenko",
                 "--n-patches", "4", "--patch-size", "128"]) == 0
    t = StainTarget.load(target)
    assert t.method == "macenko" and np.isfinite(t.stains).all()
    assert json.loads(target.read_text())["format"] == "lnmeta-stain-target"


def test_blank_slide_one_line_error(tmp_path, capsys, pyramid_factory):
    path = pyramid_factory(np.full((512, 512, 3), 255, np.uint8), levels=2)
    assert main(["tissue", str(path), "-o", str(tmp_path / "m.ome.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lnmeta: error:") and "no tissue found at threshold" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "m.ome.zarr").exists()
