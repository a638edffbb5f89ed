"""Atomic writes: build under a temporary name beside the target, then rename.

A crash or a cancel leaves either the previous result or nothing, never a
half-written file that claims to be complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputExistsError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output(path: str | Path, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse to write over an existing output (unless asked) or over any input."""
    path = Path(path)
    resolved = path.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if resolved == inp or inp in resolved.parents:
            raise InputError(f"{path}: refusing to write into the input {inp}")
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False,
                inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path`` in one rename.

    Works for files and directories (zarr stores, result folders). The temporary
    name sits in the same directory so the final ``os.replace`` never crosses a
    filesystem. An existing target is only replaced when ``overwrite`` is true.
    """
    path = check_output(path, overwrite=overwrite, inputs=inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"{path}: nothing was written")
    if path.exists():
        trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        os.replace(tmp, path)
        _remove(trash)
    else:
        os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), overwrite=overwrite)


def json_text(obj: Any) -> str:
    """JSON for people and programs: one line per top-level key and one per item of a
    top-level list (lesions, GeoJSON features).

    Every line is encoded by the C encoder (``indent`` would switch ``json`` to its pure
    Python encoder: seconds for a few thousand lesions).
    """
    from .jsonio import jsonable

    obj = jsonable(obj)  # strict JSON: non-finite numbers become null (io/jsonio.py)

    def dumps(v: Any) -> str:
        return json.dumps(v, allow_nan=False)

    if not isinstance(obj, dict):
        return dumps(obj)
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v:
            items = ",\n  ".join(dumps(x) for x in v)
            parts.append(f" {dumps(k)}: [\n  {items}\n ]")
        else:
            parts.append(f" {dumps(k)}: {dumps(v)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_json_atomic(path: str | Path, obj: Any, *, overwrite: bool = False) -> Path:
    """:func:`json_text` of ``obj``, written atomically."""
    return write_text_atomic(path, json_text(obj), overwrite=overwrite)
