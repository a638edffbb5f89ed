"""The one JSON writer: strict JSON only, never ``NaN`` or ``Infinity``.

Python's ``json`` writes ``NaN``/``Infinity`` by default, which no strict parser reads.
Every JSON file the package writes goes through :func:`dumps` (or :func:`write_json`):

* non-finite floats become ``null`` (an unknown value), explicitly, before encoding;
* numpy scalars and arrays become plain numbers and lists, paths become strings;
* ``allow_nan=False`` is kept as the last guard: anything non-finite that slipped
  through is a bug, raised, not written.

:func:`napari_lnmeta.io.atomic.json_text` / ``write_json_atomic`` (one line per item,
for large result files) apply the same rule through :func:`jsonable`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePath
from typing import Any


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, numpy values as Python ones, keys as str."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) or k is None else k:
                jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, PurePath):
        return str(obj)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return obj
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return jsonable(float(obj))
    return obj


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False,
          default=None) -> str:
    """Strict JSON text of ``obj`` (see the module docstring)."""
    return json.dumps(jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False,
                      default=default)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1,
               overwrite: bool = False, sort_keys: bool = False) -> Path:
    """Write ``obj`` as strict JSON, atomically (:func:`~napari_lnmeta.io.atomic.write_text_atomic`)."""
    from .atomic import write_text_atomic

    return write_text_atomic(path, dumps(obj, indent=indent, sort_keys=sort_keys),
                             overwrite=overwrite)
