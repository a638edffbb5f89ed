"""Results store: multiscale OME-Zarr (NGFF 0.4, zarr format 2) for masks and heatmaps.

Every result remembers the slide frame it belongs to
(:class:`~napari_lnmeta.io.frame.SlideFrame`: downsample, origin, slide µm/px, slide name
and shape) in ``.zattrs["lnmeta"]``, so
:func:`~napari_lnmeta.io.frame.layer_transform` puts it exactly over the slide in napari.
Writes are atomic (temporary name, then rename).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SlideError
from .atomic import atomic_path
from .frame import SlideFrame, layer_transform

if TYPE_CHECKING:
    import dask.array as da

NGFF_VERSION = "0.4"


@dataclass
class Result:
    """A multiscale result read back from disk."""

    path: Path
    pyramid: list[da.Array]
    frame: SlideFrame
    kind: str  # "image" or "labels"
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> da.Array:
        return self.pyramid[0]


def _n_levels(shape: tuple[int, ...], min_size: int) -> int:
    longest = max(shape[:2])
    return max(1, int(math.ceil(math.log2(max(longest / min_size, 1)))) + 1)


def _downsample(arr: da.Array, labels: bool) -> da.Array:
    import dask.array as da

    h, w = arr.shape[:2]
    if labels:  # nearest: labels must keep their values
        return arr[::2, ::2]
    pad = ((0, h % 2), (0, w % 2)) + ((0, 0),) * (arr.ndim - 2)
    if h % 2 or w % 2:
        arr = da.pad(arr, pad, mode="edge")
    out = da.coarsen(np.mean, arr.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
    if np.issubdtype(arr.dtype, np.integer):
        out = (out + 0.5)
    return out.astype(arr.dtype)


def _downsample_np(arr: np.ndarray, labels: bool) -> np.ndarray:
    """:func:`_downsample` for an in-memory array: the same values, without dask."""
    h, w = arr.shape[:2]
    if labels:
        return arr[::2, ::2]
    if h % 2 or w % 2:
        pad = ((0, h % 2), (0, w % 2)) + ((0, 0),) * (arr.ndim - 2)
        arr = np.pad(arr, pad, mode="edge")
    h2, w2 = arr.shape[0] // 2, arr.shape[1] // 2
    x = arr.astype(np.float32).reshape((h2, 2, w2, 2) + arr.shape[2:])
    out = np.mean(x, axis=(1, 3))
    if np.issubdtype(arr.dtype, np.integer):
        out = out + 0.5
    return out.astype(arr.dtype)


def write_ome_zarr(path: str | Path, data: np.ndarray | da.Array, *,
                   frame: SlideFrame | None = None, kind: str = "image",
                   name: str | None = None, chunks: int = 512, min_size: int = 256,
                   overwrite: bool = False, attrs: dict[str, Any] | None = None,
                   colors: dict[int, tuple[int, int, int, int]] | None = None,
                   inputs: tuple[str | Path, ...] = ()) -> Path:
    """Write a 2-D (or ``(y, x, c)``) array as a multiscale OME-Zarr, atomically.

    Parameters
    ----------
    path
        Target ``.ome.zarr`` directory.
    data
        numpy or dask array; a dask array is never loaded whole (written chunk by
        chunk), a numpy array is written directly.
    frame
        Where the grid sits on its slide; sets the NGFF scale in micrometres.
    kind
        ``"labels"`` (integer, nearest-neighbour pyramid, NGFF ``image-label``) or
        ``"image"`` (mean pyramid).
    colors
        Optional label -> RGBA colours stored in the ``image-label`` metadata.
    inputs
        Paths that must never be written into (the input slides).
    """
    import zarr

    frame = frame or SlideFrame()
    # In-memory arrays (heatmaps, maps: ~10^5-10^6 cells) are written straight from
    # numpy: building a dask graph per level costs more than the data (and importing
    # dask.array/distributed for it, seconds in a fresh process).
    lazy = type(data).__module__.startswith("dask")
    arr = data if lazy else np.asarray(data)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or (y, x, c) array, got shape {arr.shape}")
    labels = kind == "labels"
    if labels and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("labels must be an integer array")
    chunk = (chunks, chunks) + ((arr.shape[2],) if arr.ndim == 3 else ())
    levels = [arr]
    for _ in range(_n_levels(arr.shape, min_size) - 1):
        levels.append(_downsample(levels[-1], labels) if lazy
                      else _downsample_np(levels[-1], labels))
    unit_scale = frame.mpp if frame.mpp is not None else float(frame.downsample)
    unit = "micrometer" if frame.mpp is not None else None
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    if unit:
        for a in axes:
            a["unit"] = unit
    if arr.ndim == 3:
        axes.append({"name": "c", "type": "channel"})
    tr = layer_transform(frame)
    datasets = []
    for i in range(len(levels)):
        s = unit_scale * 2 ** i
        sc = [s, s] + ([1.0] if arr.ndim == 3 else [])
        # NGFF: pixel centres; level i's pixel 0 is centred half a (coarser) pixel in.
        t0 = [tr["translate"][k] + (2 ** i - 1) / 2 * unit_scale for k in range(2)]
        tt = t0 + ([0.0] if arr.ndim == 3 else [])
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": sc}, {"type": "translation", "translation": tt}]})
    meta = {"multiscales": [{"version": NGFF_VERSION, "name": name or Path(path).name,
                             "axes": axes, "datasets": datasets}],
            "lnmeta": {"kind": kind, **frame.to_json(), **(attrs or {})}}
    if labels:
        il: dict[str, Any] = {"version": NGFF_VERSION}
        if colors:
            il["colors"] = [{"label-value": int(k), "rgba": list(v)} for k, v in colors.items()]
        meta["image-label"] = il
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        # the metadata in one write (attrs.update would rewrite .zattrs once per key)
        root = zarr.create_group(str(tmp), zarr_format=2, attributes=meta, overwrite=True)
        for i, lv in enumerate(levels):
            c = tuple(min(c, s) for c, s in zip(chunk, lv.shape, strict=True))
            z = root.create_array(str(i), shape=lv.shape, dtype=lv.dtype, chunks=c,
                                  chunk_key_encoding={"name": "v2", "separator": "/"},
                                  fill_value=0)
            if lazy:
                import dask.array as da

                da.store(lv.rechunk(c), z, lock=False, compute=True)
            else:
                z[...] = lv
    return Path(path)


def read_ome_zarr(path: str | Path) -> Result:
    """Read a result written by :func:`write_ome_zarr` (or any 2-D NGFF multiscale)."""
    import dask.array as da
    import zarr

    p = Path(path)
    if not p.exists():
        raise SlideError(p, "no such file or directory")
    try:
        root = zarr.open_group(str(p), mode="r")
    except Exception as e:
        raise SlideError(p, f"not a zarr store ({e})") from e
    attrs = dict(root.attrs)
    ms = attrs.get("multiscales")
    if not ms:
        raise SlideError(p, "zarr group without OME-NGFF 'multiscales' metadata")
    pyramid = [da.from_zarr(root[d["path"]]) for d in ms[0]["datasets"]]
    ln = attrs.get("lnmeta", {})
    if ln:
        frame = SlideFrame.from_json(ln)
    else:
        frame = SlideFrame()
        axes = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
        for t in ms[0]["datasets"][0].get("coordinateTransformations", []):
            if t.get("type") == "scale" and "x" in axes:
                frame = SlideFrame(downsample=1.0, slide_mpp=float(t["scale"][axes.index("x")]))
    kind = ln.get("kind") or ("labels" if "image-label" in attrs else "image")
    return Result(path=p, pyramid=pyramid, frame=frame, kind=kind, attrs=attrs)
