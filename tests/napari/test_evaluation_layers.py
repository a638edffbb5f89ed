"""Detection and ground-truth layers → FROC inputs (``_napari.evaluation_layers``), on real
napari layers placed in micrometres."""

from __future__ import annotations

import numpy as np
import pytest

from napari_lnmeta._napari.evaluation_layers import (
    check_units,
    detection_probabilities,
    level0_points,
    slide_shape,
    truth_from_layer,
)
from napari_lnmeta._napari.layers import META, frame_kwargs
from napari_lnmeta.errors import InputError
from napari_lnmeta.io.frame import SlideFrame


def test_layers_become_level0_inputs():
    import napari.layers

    mpp = 0.5
    pts = napari.layers.Points(np.array([[10.0, 20.0], [3.0, 4.0]]), scale=(mpp, mpp),
                               translate=(1.0, 2.0), units=("µm", "µm"),
                               features={"probability": [0.9, 0.2]})
    # world (µm) = data * scale + translate; level-0 px = world / µm/px
    np.testing.assert_allclose(level0_points(pts, mpp), [[12.0, 24.0], [5.0, 8.0]])
    np.testing.assert_allclose(detection_probabilities(pts, 2), [0.9, 0.2])
    bare = napari.layers.Points(np.zeros((3, 2)))
    np.testing.assert_allclose(detection_probabilities(bare, 3), 1.0)

    # a Labels layer made from a result frame keeps that frame (µm/px filled in)
    frame = SlideFrame(4.0, (8.0, 0.0), None, "s", (64, 64))
    kw = frame_kwargs(frame)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 3:6] = 2
    labels = napari.layers.Labels(mask, **kw)
    arr, fr = truth_from_layer(labels, mpp)
    assert arr.dtype == bool and arr.sum() == 9
    assert fr.downsample == 4.0 and tuple(fr.origin) == (8.0, 0.0) and fr.slide_mpp == mpp

    # a Shapes layer: polygons in level-0 px; lines are not regions
    shapes = napari.layers.Shapes([np.array([[0.0, 0.0], [0.0, 5.0], [5.0, 5.0]]),
                                   np.array([[0.0, 0.0], [9.0, 9.0]])],
                                  shape_type=["polygon", "line"], scale=(mpp, mpp))
    polys = truth_from_layer(shapes, mpp)
    assert len(polys) == 1
    only_lines = napari.layers.Shapes([np.array([[0.0, 0.0], [9.0, 9.0]])],
                                      shape_type=["line"], name="lines")
    with pytest.raises(InputError, match="'lines' has no polygon"):
        truth_from_layer(only_lines, mpp)

    # layers in pixels and in µm do not share a frame
    px = napari.layers.Labels(mask, name="in pixels")
    with pytest.raises(InputError, match="'in pixels' is in pixels"):
        check_units(px, pts)
    check_units(napari.layers.Labels(mask, scale=(mpp, mpp), units=("µm", "µm")), pts)

    slide = napari.layers.Image(np.zeros((8, 8, 3), np.uint8), rgb=True,
                                metadata={META: {"shape": [800, 600]}})
    assert slide_shape(slide) == (800, 600) and slide_shape(None) is None
