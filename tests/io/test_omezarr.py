"""Results store: multiscale OME-Zarr with its slide frame, written atomically."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_lnmeta.errors import InputError, OutputExistsError
from napari_lnmeta.io.atomic import atomic_path
from napari_lnmeta.io.frame import SlideFrame, layer_transform
from napari_lnmeta.io.omezarr import read_ome_zarr, write_ome_zarr


def test_roundtrip_labels_with_frame(tmp_path):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, (700, 530), dtype=np.uint8)
    frame = SlideFrame(downsample=16, origin=(32, 48), slide_mpp=0.25, slide="a.svs",
                       slide_shape=(11200, 8480))
    out = write_ome_zarr(tmp_path / "m.ome.zarr", mask, frame=frame, kind="labels",
                         colors={1: (255, 0, 0, 255)}, min_size=100)
    res = read_ome_zarr(out)
    assert res.kind == "labels"
    assert res.frame == frame
    np.testing.assert_array_equal(res.data.compute(), mask)
    # nearest-neighbour pyramid keeps label values
    assert [p.shape for p in res.pyramid] == [(700, 530), (350, 265), (175, 133), (88, 67)]
    assert set(np.unique(res.pyramid[2].compute())) <= {0, 1, 2}
    attrs = json.loads((out / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["axes"][0]["unit"] == "micrometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [4.0, 4.0]
    assert attrs["image-label"]["colors"][0]["label-value"] == 1


def test_layer_transform_centres_cells_on_their_pixels():
    # cell (i, j) covers level-0 px [o + i*d, o + (i+1)*d): centre (o + i*d + (d-1)/2) * mpp
    f = SlideFrame(downsample=4, origin=(8, 0), slide_mpp=0.5)
    t = layer_transform(f)
    assert t["scale"] == (2.0, 2.0)
    assert t["translate"] == ((8 + 1.5) * 0.5, 1.5 * 0.5)
    assert layer_transform(SlideFrame(downsample=1, slide_mpp=0.5))["translate"] == (0.0, 0.0)


def test_float_heatmap_pyramid_and_refusals(tmp_path):
    hm = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    p = tmp_path / "h.ome.zarr"
    write_ome_zarr(p, hm, frame=SlideFrame(downsample=8), min_size=64)
    res = read_ome_zarr(p)
    assert res.kind == "image" and res.frame.slide_mpp is None
    assert res.pyramid[1].dtype == np.float32
    assert res.pyramid[1][0, 0].compute() == pytest.approx(hm[:2, :2].mean())
    with pytest.raises(OutputExistsError, match="already exists"):
        write_ome_zarr(p, hm)
    write_ome_zarr(p, hm * 0, overwrite=True)
    assert float(read_ome_zarr(p).data.max().compute()) == 0.0
    with pytest.raises(InputError, match="refusing to write into the input"):
        write_ome_zarr(tmp_path / "slide.zarr" / "x.ome.zarr", hm, inputs=[tmp_path / "slide.zarr"])


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.ome.zarr"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []
    # a previous result survives a failed overwrite
    write_ome_zarr(target, np.ones((10, 10), np.uint8), kind="labels")
    with pytest.raises(RuntimeError), atomic_path(target, overwrite=True) as tmp:
        tmp.mkdir()
        raise RuntimeError("crash")
    assert read_ome_zarr(target).data.compute().sum() == 100
    assert sorted(os.listdir(tmp_path)) == ["result.ome.zarr"]


@pytest.mark.parametrize("dtype, kind", [(np.float16, "image"), (np.uint8, "image"),
                                         (np.uint8, "labels"), (np.float32, "image")])
def test_numpy_arrays_write_the_same_store_as_dask_arrays(tmp_path, dtype, kind):
    """In-memory arrays skip dask; every level must hold exactly what the dask path writes
    (odd sizes: edge padding; integers: rounding)."""
    import dask.array as da

    rng = np.random.default_rng(1)
    a = rng.random((301, 517), dtype=np.float32)
    a = (a * (3 if kind == "labels" else 255)).astype(dtype) if dtype == np.uint8 else a.astype(dtype)
    kw = dict(kind=kind, frame=SlideFrame(downsample=256, slide_mpp=0.25), chunks=128,
              min_size=32)
    write_ome_zarr(tmp_path / "np.ome.zarr", a, **kw)
    write_ome_zarr(tmp_path / "da.ome.zarr", da.from_array(a, chunks=100), **kw)
    r_np, r_da = read_ome_zarr(tmp_path / "np.ome.zarr"), read_ome_zarr(tmp_path / "da.ome.zarr")
    assert len(r_np.pyramid) == len(r_da.pyramid) == 6
    for x, y in zip(r_np.pyramid, r_da.pyramid, strict=True):
        assert x.dtype == y.dtype == dtype and x.chunksize == y.chunksize
        if dtype == np.float32:  # the 2x2 means may differ in summation order: 1 ulp
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-7, atol=0)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(r_np.data), a)
    assert r_np.attrs == {**r_da.attrs, "multiscales": [
        {**r_da.attrs["multiscales"][0], "name": "np.ome.zarr"}]}


def test_json_text_is_json_with_one_line_per_item(tmp_path):
    from napari_lnmeta.io.atomic import json_text, write_json_atomic

    obj = {"type": "FeatureCollection", "n": 2, "nested": {"a": [1, 2]}, "empty": [],
           "features": [{"id": i, "p": i / 3, "bad": None} for i in range(5)]}
    text = json_text(obj)
    assert json.loads(text) == obj
    assert len(text.splitlines()) == 2 + 4 + 2 + 5  # braces, keys, list brackets, items
    write_json_atomic(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == obj
