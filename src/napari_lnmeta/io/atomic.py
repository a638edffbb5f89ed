"""Output safety: input checks, one writer per output, atomic replace, stale temporaries.

Every writer goes through this module:

* :func:`check_output` refuses an output that is an input, lies inside an input or holds
  an input (symlinks resolved), and an existing output unless ``overwrite`` is given and
  the existing path is something napari-lnmeta writes (:func:`is_replaceable`): an empty
  folder, a folder we wrote (marker file :data:`MARKER`, an OME-Zarr store with our
  ``lnmeta`` attributes, a prediction folder), or a file with one of the suffixes we write
  (:data:`WRITTEN_SUFFIXES`). A folder holding anything else is never replaced.
* :func:`output_lock` holds an exclusive lock on an output for a whole run: a lock file
  ``.NAME.lock`` beside the target, ``flock``-ed and holding the writer's pid and host. A
  second writer is refused with :class:`~napari_lnmeta.errors.OutputLockedError`; a lock
  left by a dead process is free again (the kernel drops ``flock`` locks with their
  process). The lock is re-entrant within one thread.
* :func:`atomic_path` builds under ``.NAME.tmp-XXXXXXXX`` beside the target and renames
  it into place only once it is complete; the previous result is kept until then, so a
  crash, a kill or a cancel leaves either the previous result or nothing new.
* Stale temporaries (``.NAME.tmp-*`` and ``.NAME.old-*`` of a killed run) are removed
  by the next writer of ``NAME`` while it holds the lock, so they provably belong to no
  live writer. A previous result caught between the two renames of a replace
  (``NAME`` missing, ``.NAME.old-*`` present) is put back first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputExistsError, OutputLockedError

#: A file written into every folder built by :func:`atomic_path`: marks it as ours.
MARKER = ".lnmeta"
#: Existing files with these suffixes may be replaced with ``overwrite``.
WRITTEN_SUFFIXES = (".json", ".geojson", ".csv", ".npz", ".png", ".safetensors", ".md",
                    ".txt", ".zarr")
_TMP_RE = r"\.{name}\.(tmp|old)-[0-9a-f]{{8}}"
_LEFTOVER = re.compile(r"\..+\.((tmp|old)-[0-9a-f]{8}|lock)")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


# --------------------------------------------------------------------------------------
# Input and ownership checks
# --------------------------------------------------------------------------------------
def check_inputs(path: str | Path, inputs: Iterable[str | Path] = (), *,
                 whole: bool = True) -> Path:
    """Refuse an output that is an input, lies inside one or (``whole``) contains one.

    ``whole=False`` is for writers that put named files into an existing folder: an
    input beside those files is safe, so only ``path == input`` and ``path`` inside an
    input are refused.
    """
    path = Path(path)
    resolved = _real(path)
    for inp in inputs:
        if inp is None:
            continue
        real = _real(inp)
        if resolved == real or real in resolved.parents:
            raise InputError(f"{path}: refusing to write into the input {real}")
        if whole and resolved in real.parents:
            raise InputError(f"{path}: refusing to replace a folder that holds the input {real}")
    return path


def is_replaceable(path: str | Path) -> bool:
    """Whether an existing ``path`` is something napari-lnmeta wrote (see module doc)."""
    p = Path(path)
    if p.is_symlink() or not p.exists():
        return not p.exists()
    if p.is_file():
        return p.name.lower().endswith(WRITTEN_SUFFIXES)
    if not p.is_dir():
        return False
    names = {c.name for c in p.iterdir() if not _LEFTOVER.fullmatch(c.name)}
    if not names or MARKER in names:
        return True
    if names & {"summary.json", ".partial"} and names <= _PREDICTION_NAMES:
        return True
    for meta in (".zattrs", "zarr.json"):
        if meta in names:
            try:
                attrs = json.loads((p / meta).read_text())
            except (OSError, ValueError):
                return False
            attrs = attrs.get("attributes", attrs) if isinstance(attrs, dict) else {}
            return isinstance(attrs, dict) and "lnmeta" in attrs
    return False


_PREDICTION_NAMES = {"summary.json", ".partial", "probability.ome.zarr", "binary.ome.zarr",
                     "tiers.ome.zarr", "analysed.ome.zarr", "lesions.geojson", "overview.png",
                     MARKER}


def check_output(path: str | Path, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse to write over an existing output (unless asked and ours) or over any input."""
    path = check_inputs(path, inputs)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(path)
        if not is_replaceable(path):
            kind = "folder" if path.is_dir() else "file"
            raise InputError(f"{path}: --overwrite replaces only results napari-lnmeta wrote; "
                             f"this {kind} is not one (choose another output)")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path}: {path.parent} is not a folder")
    return path


# --------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------
_held: dict[str, tuple[int, int]] = {}  # lock file -> (thread id, depth)
_held_guard = threading.Lock()


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(lp: Path) -> str:
    try:
        info = json.loads(lp.read_text())
        return f"pid {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


@contextlib.contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold the exclusive writer lock on ``path`` (see module docstring).

    Raises
    ------
    OutputLockedError
        Another process (or thread) is writing ``path``.
    """
    path = Path(path)
    lp = lock_path(_real(path.parent) / path.name)
    key = str(lp)
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None:
            if owner[0] != me:
                raise OutputLockedError(path, "another job of this process")
            _held[key] = (me, owner[1] + 1)
    if owner is not None:
        try:
            yield path
        finally:
            with _held_guard:
                t, d = _held[key]
                _held[key] = (t, d - 1)
        return
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lp, path)
    with _held_guard:
        _held[key] = (me, 1)
    try:
        clean_stale(path)
        yield path
    finally:
        with _held_guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)


def _acquire(lp: Path, path: Path) -> int:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: exclusive creation only
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise OutputLockedError(path, _holder(lp)) from None
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        return fd
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(path, _holder(lp)) from None
        try:
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder has just removed
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            return fd
        os.close(fd)


def clean_stale(path: str | Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` beside ``path`` (call with the lock held).

    When ``path`` is missing and a ``.NAME.old-*`` holds a previous result caught
    between the two renames of a replace, that result is put back first. Returns the
    removed paths.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = re.compile(_TMP_RE.format(name=re.escape(path.name)))
    found = sorted((c for c in parent.iterdir() if pat.fullmatch(c.name)),
                   key=lambda c: c.stat().st_mtime if c.exists() else 0)
    olds = [c for c in found if ".old-" in c.name]
    if olds and not (path.exists() or path.is_symlink()):
        os.replace(olds[-1], path)
        found.remove(olds[-1])
    for c in found:
        _remove(c)
    return found


@contextlib.contextmanager
def claim_output(path: str | Path, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Check ``path`` (:func:`check_output`) and hold its writer lock for a whole run.

    Use it around everything a command does before its result is written, so that the
    checks done at the start still hold when the result is renamed into place::

        with claim_output(args.output, overwrite=args.overwrite, inputs=[args.slide]):
            mask = detect(...)
            mask.save(args.output, overwrite=args.overwrite)
    """
    path = check_inputs(path, inputs)
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path}: {path.parent} is not a folder")
    with output_lock(path):
        check_output(path, overwrite=overwrite, inputs=inputs)
        yield path


# --------------------------------------------------------------------------------------
# Atomic replace
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = False,
                inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path`` in one rename.

    Works for files and directories (zarr stores, result folders). The temporary
    name sits in the same directory so the final ``os.replace`` never crosses a
    filesystem. An existing target is only replaced when ``overwrite`` is true and it is
    ours (:func:`check_output`); it stays in place until the new one is complete. The
    writer lock on ``path`` is held throughout.
    """
    path = Path(path)
    check_inputs(path, inputs)
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{path}: {path.parent} is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        check_output(path, overwrite=overwrite, inputs=inputs)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        if not tmp.exists():
            raise RuntimeError(f"{path}: nothing was written")
        if tmp.is_dir() and not (tmp / MARKER).exists():
            (tmp / MARKER).write_text('{"written_by": "napari-lnmeta"}\n')
        replace(tmp, path)


def replace(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` onto ``path``; the old ``path`` is removed only after."""
    if path.exists() or path.is_symlink():
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
