"""Registration check images (checkerboard, haematoxylin difference) and
``lnmeta check-registration``, on a real IHC image and its exact rotation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_lnmeta.cli import main
from napari_lnmeta.core.registration import (
    SlideInfo,
    Transform,
    registration_check_job,
)
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.slide import array_slide
from napari_lnmeta.progress import run


@pytest.fixture(scope="module")
def ihc(shared_data):
    with Image.open(shared_data / "skimage_ihc_dab" / "ihc.png") as im:
        return np.asarray(im.convert("RGB"))


def _rot90(shape, shift: float = 0.0):
    """The transform when the fixed image is ``np.rot90(moving)`` (exact with no shift)."""
    h, w = shape
    m = np.array([[0.0, 1.0, shift], [-1.0, 0.0, w - 1.0], [0, 0, 1]])
    return Transform(m, SlideInfo("fixed", (w, h), None), SlideInfo("moving", (h, w), None))


def test_checkerboard_and_difference(ihc):
    fixed_rgb = np.ascontiguousarray(np.rot90(ihc))
    fixed, moving = array_slide(fixed_rgb, name="fixed"), array_slide(ihc, name="moving")
    steps = []
    check = run(registration_check_job(_rot90(ihc.shape[:2]), fixed, moving, size=256),
                steps.append)
    assert steps[-1].done == steps[-1].total
    h, w = check.fixed.shape[:2]
    assert max(h, w) == 256 and check.moving.shape == check.fixed.shape
    assert check.frame.downsample == pytest.approx(max(fixed_rgb.shape[:2]) / 256)
    # the exact transform: the warped IHC is the H&E image again
    assert np.abs(check.moving.astype(int) - check.fixed.astype(int)).mean() < 10  # resampling differs
    # checkerboard: squares of 256 // 4 px, alternately H&E (even) and IHC (odd)
    board = check.checkerboard(4)
    side = 64
    for r, c in ((0, 0), (0, side), (side, 0), (side + 5, side + 7)):
        src = check.moving if ((r // side + c // side) % 2) else check.fixed
        np.testing.assert_array_equal(board[r, c], src[r, c])
    # the difference is small where they agree, larger for a transform that is off
    good = float(np.median(check.difference()))
    off = run(registration_check_job(_rot90(ihc.shape[:2], shift=40.0), fixed, moving,
                                     size=256))
    assert good < 0.05 and float(np.mean(off.difference())) > 2 * float(np.mean(check.difference()))
    with pytest.raises(ValueError):
        check.view("overlay")
    # a transform made for other slides is refused before reading anything
    with pytest.raises(InputError, match="was it registered with other slides"):
        run(registration_check_job(_rot90(ihc.shape[:2]), array_slide(ihc[:300]), moving))


def test_check_registration_cli(ihc, tmp_path, capsys):
    fixed_path, moving_path = tmp_path / "he.png", tmp_path / "ihc.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(ihc))).save(fixed_path)
    Image.fromarray(ihc).save(moving_path)
    t = tmp_path / "t.json"
    _rot90(ihc.shape[:2]).save(t)
    out = tmp_path / "check"
    argv = ["check-registration", str(fixed_path), str(moving_path), "--transform", str(t),
            "-o", str(out), "--size", "200", "--squares", "5", "-q"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out / "checkerboard.png") as im:
        board = np.asarray(im)
    with Image.open(out / "difference.png") as im:
        diff = np.asarray(im)
    assert board.ndim == 3 and max(board.shape[:2]) == 200
    assert diff.ndim == 2 and diff.shape == board.shape[:2] and np.median(diff) < 0.05 * 255
    # the same as the core job
    check = run(registration_check_job(_rot90(ihc.shape[:2]),
                                       array_slide(np.ascontiguousarray(np.rot90(ihc))),
                                       array_slide(ihc), size=200))
    np.testing.assert_array_equal(board, check.checkerboard(5))
    # nothing is replaced without --overwrite; a bad size is a clean error
    before = (out / "checkerboard.png").read_bytes()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "checkerboard.png").read_bytes() == before
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv[:-5] + ["--size", "3", "--overwrite", "-q"]) == 2
    assert "--size" in capsys.readouterr().err
