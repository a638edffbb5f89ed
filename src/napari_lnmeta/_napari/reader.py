"""napari reader: slides (OpenSlide, OME-TIFF, OME-Zarr, PNG/JPEG) and lnmeta results.

``napari_get_reader`` looks at names, directory layout and magic bytes, then opens the
file's *metadata* (no pixels). It returns ``None`` (never raises) for anything it cannot
read, missing, empty, truncated or mislabelled files included, so napari can try other
readers or report that nothing could open the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..io.slide import MppWarning, sniff

#: µm/px warnings already shown in this process (napari may ask a reader more than once)
_ANNOUNCED: set[str] = set()


def _is_result(path: Path) -> bool:
    attrs = path / ".zattrs"
    if not attrs.is_file():
        return False
    try:
        meta = json.loads(attrs.read_text())
    except (OSError, ValueError):
        return False
    return "lnmeta" in meta or "image-label" in meta


def napari_get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        p = Path(path)
        if p.is_dir() and _is_result(p):
            from ..io.omezarr import read_ome_zarr

            result = read_ome_zarr(p)
            return lambda _path: [result_layer_data(result)]
        if sniff(p) is None:
            return None
        from ..io.slide import open_slide

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MppWarning)
            slide = open_slide(p)
    except Exception:  # a reader must never raise: decline instead
        return None
    messages = [str(w.message) for w in caught if issubclass(w.category, MppWarning)]

    def reader(_path):
        from .layers import slide_layer_data

        if messages:
            from napari.utils.notifications import show_warning

            for m in messages:
                if m not in _ANNOUNCED:  # once per file, however often napari asks
                    _ANNOUNCED.add(m)
                    show_warning(m)
        return [slide_layer_data(slide)]

    return reader


def result_layer_data(res):
    """Layer data tuple for a result read by :func:`napari_lnmeta.io.omezarr.read_ome_zarr`."""
    from .layers import META, frame_kwargs

    kw = frame_kwargs(res.frame)
    kw["name"] = res.path.name.replace(".ome.zarr", "").replace(".zarr", "")
    kw["multiscale"] = len(res.pyramid) > 1
    ln = res.attrs.get("lnmeta", {})
    kw["metadata"][META]["path"] = str(res.path)
    if res.kind == "labels":
        return (res.pyramid, kw, "labels")
    dtype = res.pyramid[0].dtype
    if "contrast_limits" in ln:
        kw["contrast_limits"] = tuple(ln["contrast_limits"])
    elif dtype.kind == "u" and dtype.itemsize == 1:
        kw["contrast_limits"] = (0, 255)
    elif dtype.kind == "f":
        kw["contrast_limits"] = (0.0, 1.0)
    if ln.get("colormap"):
        kw["colormap"] = ln["colormap"]
    if res.pyramid[0].ndim == 3 and res.pyramid[0].shape[-1] in (3, 4):
        kw["rgb"] = True
    return (res.pyramid, kw, "image")
