"""Import public patch datasets into the patch-set format ``lnmeta train`` reads.

Three inputs:

PatchCamelyon HDF5
    ``*_x.h5`` (dataset ``x``: ``(N, 96, 96, 3)`` uint8) with its ``*_y.h5`` (dataset
    ``y``: ``(N, 1, 1, 1)``, 1 = tumour in the centre 32 x 32 px) and optionally the
    ``*_meta.csv`` PCam ships (its ``wsi`` column names each patch's slide). PCam patches
    are 0.972 µm/px (CAMELYON16 level 2, 10x): :data:`KNOWN_MPP`.
a folder per class
    ``ROOT/<class>/*.png|jpg|tif`` (PCam/Kaggle ``.tif``, Kather, BreakHis, own exports);
    class names can be mapped (``lung_aca=tumour``) and a CSV can give each image's
    group (slide / patient), joined on the file name.
a CSV ``path,label[,slide]``
    paths relative to the CSV; labels as class names or indices; the slide / patient /
    group column is kept for splits.

A :class:`~napari_lnmeta.train.datasets.PatchSet` refers to slides, so each group
(slide, patient) becomes one *mosaic*: a lossless tiled OME-TIFF next to the patch-set
file (``OUT.mosaics/<group>.ome.tif``) holding that group's patches on a grid, one patch
per tile, with the patches' µm/px (a non-square image is cut to its centred square).
Training, caching, ``--in-memory``, splits by slide
(``--val-slides GROUP,...``) and ``--mix`` by source work on it unchanged. Patches of
another size are resized (and their µm/px scaled) so that sets can be mixed.
"""

from __future__ import annotations

import csv
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.annotations import NEGATIVE_NAMES
from ..progress import Job, Progress
from .datasets import PatchSet, SlideEntry

#: µm/px of patches of public datasets whose resolution is documented
KNOWN_MPP = {"pcam": 0.972}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Item:
    """One patch to import: where its pixels are, its class name and its group."""

    label: str
    group: str
    path: Path | None = None      # an image file
    index: int | None = None      # or a row of an HDF5 array


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return s or "group"


def order_classes(names: Iterable[str], classes: Sequence[str] | None = None) -> list[str]:
    """Class names with the negative class first (``classes`` when given, checked)."""
    found = sorted(set(names))
    if classes:
        classes = [c.strip() for c in classes if c.strip()]
        unknown = [n for n in found if n not in classes]
        if unknown:
            raise InputError(f"labels {unknown} are not among the classes {list(classes)}; "
                             "map them with --class-map NAME=CLASS")
        return list(classes)
    neg = [n for n in found if n.lower() in NEGATIVE_NAMES]
    return neg + [n for n in found if n not in neg]


def _map_label(label: str, class_map: dict[str, str], classes: Sequence[str] | None) -> str:
    label = class_map.get(label, label)
    if classes and label.isdigit() and label not in classes and int(label) < len(classes):
        return classes[int(label)]  # an index into the given classes
    return label


# --------------------------------------------------------------------------------------
# Collecting items
# --------------------------------------------------------------------------------------
def _read_groups(groups_csv: Path | None, column: str) -> dict[str, str]:
    if groups_csv is None:
        return {}
    rows = _read_csv(groups_csv)
    low = {k.lower(): k for k in rows[0]}
    pcol = low.get("path") or low.get("file") or low.get("filename") or low.get("image")
    if pcol is None or column.lower() not in low:
        raise InputError(f"{groups_csv}: needs a path (or file/filename/image) column and a "
                         f"{column!r} column, has {list(rows[0])}")
    return {Path(r[pcol]).name: r[low[column.lower()]] for r in rows}


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not rows:
        raise InputError(f"{path}: the CSV has no rows")
    return rows


def folder_items(root: str | Path, *, class_map: dict[str, str] | None = None,
                 classes: Sequence[str] | None = None, groups_csv: str | Path | None = None,
                 group_column: str = "group") -> list[Item]:
    """Items of a folder-per-class image set (``ROOT/<class>/<image>``)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    cmap = dict(class_map or {})
    groups = _read_groups(Path(groups_csv) if groups_csv else None, group_column)
    items = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                if groups and f.name not in groups:
                    raise InputError(f"{f}: not in the groups CSV {groups_csv}")
                group = groups.get(f.name, f"{d.name}_{f.stem}")
                items.append(Item(_map_label(d.name, cmap, classes), group, path=f))
    if not items:
        raise InputError(f"{root}: no images in class folders (expected ROOT/<class>/*.png|"
                         "jpg|tif)")
    return items


def csv_items(table: str | Path, *, path_column: str = "path", label_column: str = "label",
              slide_column: str | None = None, class_map: dict[str, str] | None = None,
              classes: Sequence[str] | None = None) -> list[Item]:
    """Items of a CSV ``path,label[,slide]`` (paths relative to the CSV's folder)."""
    table = Path(table)
    rows = _read_csv(table)
    low = {k.lower(): k for k in rows[0]}
    for col in (path_column, label_column):
        if col.lower() not in low:
            raise InputError(f"{table}: no {col!r} column (columns: {', '.join(rows[0])})")
    scol = None
    if slide_column:
        if slide_column.lower() not in low:
            raise InputError(f"{table}: no {slide_column!r} column (columns: "
                             f"{', '.join(rows[0])})")
        scol = low[slide_column.lower()]
    else:
        scol = next((low[c] for c in ("slide", "patient", "group", "wsi") if c in low), None)
    cmap = dict(class_map or {})
    items = []
    for i, r in enumerate(rows, start=2):
        rel = (r[low[path_column.lower()]] or "").strip()
        if not rel:
            raise InputError(f"{table}: line {i}: empty path")
        p = Path(rel) if Path(rel).is_absolute() else table.parent / rel
        if not p.is_file():
            raise InputError(f"{table}: line {i}: no such image {p}")
        label = (r[low[label_column.lower()]] or "").strip()
        if not label:
            raise InputError(f"{table}: line {i}: empty label")
        group = (r[scol] or "").strip() if scol else ""
        items.append(Item(_map_label(label, cmap, classes), group or p.stem, path=p))
    return items


def _h5(path: Path, key: str):
    try:
        import h5py
    except ImportError:
        raise InputError(f"{path}: reading PatchCamelyon HDF5 needs h5py; install it with "
                         "pip install 'napari-lnmeta[datasets]'") from None
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not an HDF5 file ({e})") from e
    if key not in f:
        f.close()
        raise InputError(f"{path}: no dataset {key!r} (PatchCamelyon files hold 'x' / 'y')")
    return f


def pcam_paths(x_path: str | Path, y_path: str | Path | None = None,
               meta_csv: str | Path | None = None) -> tuple[Path, Path, Path | None]:
    """The ``*_y.h5`` (and ``*_meta.csv`` when present) next to a ``*_x.h5``."""
    x = Path(x_path)
    if y_path is None:
        if not x.name.endswith("_x.h5"):
            raise InputError(f"{x}: expected a PatchCamelyon '*_x.h5' file (or give --y)")
        y = x.with_name(x.name[:-len("_x.h5")] + "_y.h5")
    else:
        y = Path(y_path)
    if meta_csv is None and x.name.endswith("_x.h5"):
        cand = x.with_name(x.name[:-len("_x.h5")] + "_meta.csv")
        meta_csv = cand if cand.is_file() else None
    return x, y, (Path(meta_csv) if meta_csv else None)


def pcam_items(x_path: str | Path, y_path: str | Path | None = None,
               meta_csv: str | Path | None = None, *,
               classes: Sequence[str] = ("normal", "tumour"),
               limit: int | None = None) -> tuple[list[Item], Path]:
    """Items of a PatchCamelyon ``*_x.h5`` / ``*_y.h5`` pair (groups from ``wsi``)."""
    x, y, meta = pcam_paths(x_path, y_path, meta_csv)
    with _h5(x, "x") as fx, _h5(y, "y") as fy:
        xs, ys = fx["x"], fy["y"]
        if xs.ndim != 4 or xs.shape[-1] != 3 or xs.dtype != np.uint8:
            raise InputError(f"{x}: 'x' must be (N, H, W, 3) uint8, got {xs.shape} {xs.dtype}")
        n = xs.shape[0]
        if ys.shape[0] != n:
            raise InputError(f"{y}: {ys.shape[0]} labels for {n} patches in {x}")
        labels = np.asarray(ys[:]).reshape(n, -1)[:, 0].astype(np.int64)
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise InputError(f"{y}: labels must be 0 or 1, got {sorted(set(labels.tolist()))[:5]}")
    groups = [x.stem] * n
    if meta is not None:
        rows = _read_csv(meta)
        if len(rows) != n:
            raise InputError(f"{meta}: {len(rows)} rows for {n} patches in {x}")
        low = {k.lower(): k for k in rows[0]}
        if "wsi" not in low:
            raise InputError(f"{meta}: no 'wsi' column (PatchCamelyon meta CSV)")
        groups = [r[low["wsi"]] for r in rows]
    k = n if limit is None else min(n, int(limit))
    return [Item(classes[int(labels[i])], groups[i], index=i) for i in range(k)], x


# --------------------------------------------------------------------------------------
# Writing mosaics + the patch set
# --------------------------------------------------------------------------------------
def _cell(size: int) -> int:
    return int(math.ceil(size / 16) * 16)


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if w != h:  # e.g. BreakHis 700 x 460: the centred square
                k = min(w, h)
                im = im.crop(((w - k) // 2, (h - k) // 2, (w - k) // 2 + k, (h - k) // 2 + k))
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from e


def _check_images(items: Sequence[Item]) -> int:
    """Open every image's header before any work (cheap); the first one's side."""
    from PIL import Image, UnidentifiedImageError

    native = None
    for it in items:
        try:
            with Image.open(it.path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{it.path}: not a readable image ({e})") from e
        native = native or int(min(w, h))
    return int(native)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR), np.uint8)


def _write_mosaic(path: Path, patches: Iterator[np.ndarray], n: int, size: int,
                  mpp: float | None) -> tuple[np.ndarray, tuple[int, int]]:
    """A tiled OME-TIFF with one patch per tile (row-major); returns the coordinates."""
    import tifffile

    cell = _cell(size)
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))

    def tiles():
        blank = np.zeros((cell, cell, 3), np.uint8)
        k = 0
        for p in patches:
            t = blank.copy()
            t[:size, :size] = p
            k += 1
            yield t
        for _ in range(rows * cols - k):
            yield blank

    md = {"axes": "YXS"}
    if mpp:
        md.update(PhysicalSizeX=float(mpp), PhysicalSizeY=float(mpp))
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(tiles(), shape=(rows * cell, cols * cell, 3), dtype=np.uint8,
                 tile=(cell, cell), photometric="rgb", compression="zlib", metadata=md,
                 resolution=(1e4 / mpp, 1e4 / mpp) if mpp else None,
                 resolutionunit="CENTIMETER" if mpp else None)
    k = np.arange(n)
    coords = np.stack([(k // cols) * cell, (k % cols) * cell], axis=1).astype(np.int64)
    return coords, (rows * cell, cols * cell)


def import_patches_job(items: Sequence[Item], out: str | Path, *, source: str,
                       mpp: float | None, patch_size: int | None = None,
                       classes: Sequence[str] | None = None, h5_x: Path | None = None,
                       overwrite: bool = False) -> Job[PatchSet]:
    """Write ``items`` as mosaics + a patch set ``out`` (``.npz``); a progress generator.

    Parameters
    ----------
    items
        From :func:`pcam_items`, :func:`folder_items` or :func:`csv_items`.
    out
        Patch-set file; the mosaics go to ``<out stem>.mosaics/`` next to it.
    source
        Dataset source name (for ``lnmeta train --mix SOURCE=FRACTION``).
    mpp
        µm/px of the patches as given (``None``: unknown, the model will not know its
        resolution); scaled when ``patch_size`` resizes them.
    patch_size
        Resize every patch to this side (default: the first patch's side).
    classes
        Class order (negative first); default from the labels.
    h5_x
        The ``*_x.h5`` file of PCam items.
    """
    from ..io.atomic import atomic_path, check_output

    out = Path(out)
    if out.suffix != ".npz":
        raise InputError(f"{out}: the patch set is a .npz file")
    if not items:
        raise InputError(f"{out}: nothing to import")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise InputError(f"µm/px must be a positive number, got {mpp}")
    check_output(out, overwrite=overwrite)
    mosaics = out.with_name(out.stem + ".mosaics")
    check_output(mosaics, overwrite=overwrite)
    cls = order_classes([it.label for it in items], classes)
    if len(cls) < 2:
        raise InputError(f"{out}: need at least two classes, the labels give {cls}")
    cindex = {c: i for i, c in enumerate(cls)}

    fx = _h5(h5_x, "x") if h5_x is not None else None
    try:
        native = int(fx["x"].shape[1]) if fx is not None else _check_images(items)
        size = int(patch_size or native)
        if size < 8:
            raise InputError(f"patch size must be at least 8 px, got {size}")
        read_mpp = None if mpp is None else float(mpp) * native / size

        by_group: OrderedDict[str, list[int]] = OrderedDict()
        for i, it in enumerate(items):
            by_group.setdefault(it.group, []).append(i)
        names: dict[str, str] = {}
        for g in by_group:
            base = _safe(g)
            name, k = base, 1
            while name in names.values():
                k += 1
                name = f"{base}-{k}"
            names[g] = name

        def pixels(idx: list[int]) -> Iterator[np.ndarray]:
            if fx is not None:
                xs = fx["x"]
                rows = [items[i].index for i in idx]
                for s in range(0, len(rows), 1024):
                    block = np.asarray(xs[sorted(set(rows[s:s + 1024]))])
                    pos = {r: j for j, r in enumerate(sorted(set(rows[s:s + 1024])))}
                    for r in rows[s:s + 1024]:
                        yield _resize(block[pos[r]], size)
            else:
                for i in idx:
                    yield _load_image(items[i].path, size)

        slides, si, co, la = [], [], [], []
        total = len(items)
        done = 0
        with atomic_path(mosaics, overwrite=overwrite) as tmp:
            tmp.mkdir(parents=True)
            for g, idx in by_group.items():
                fname = f"{names[g]}.ome.tif"
                coords, _ = _write_mosaic(tmp / fname, pixels(idx), len(idx), size, read_mpp)
                slides.append(SlideEntry(path=str((mosaics / fname).resolve()),
                                         name=names[g], patch_size=size, level=0, mpp=None,
                                         downsample=1.0, slide_mpp=read_mpp,
                                         mpp_override=read_mpp, source=source))
                si.append(np.full(len(idx), len(slides) - 1, np.int32))
                co.append(coords)
                la.append(np.array([cindex[items[i].label] for i in idx], np.int64))
                done += len(idx)
                yield Progress(done, total, f"mosaic {names[g]}")
    finally:
        if fx is not None:
            fx.close()
    labels = np.concatenate(la)
    ps = PatchSet(slides, np.concatenate(si), np.concatenate(co), labels,
                  (labels > 0).astype(np.float32), cls,
                  meta={"imported": {"source": source, "patches": total,
                                     "groups": len(by_group), "native_size": native,
                                     "mpp": read_mpp, "mosaics": str(mosaics.resolve())},
                        "read_mpp": read_mpp})
    ps.save(out, overwrite=overwrite)
    return ps


__all__ = ["IMAGE_SUFFIXES", "KNOWN_MPP", "Item", "csv_items", "folder_items",
           "import_patches_job", "order_classes", "pcam_items", "pcam_paths"]
