"""Hostile-input cases: a registry, a runner and one outcome classifier.

Each case sets up its own scratch folder (copies of real data, broken files, hostile
command lines), runs the real ``lnmeta`` entry point and is classified into one of
:data:`CATEGORIES`. ``tests/hostile/test_hostile.py`` asserts that every case is
``correct`` or ``clear error``; ``benchmarks/hostile_report.py`` prints the counts.

A case module is any ``tests/hostile/cases_*.py``; it registers cases with :func:`case`::

    @case("tissue -o onto its own input folder --overwrite", expect="error")
    def _(ws: Workspace) -> Spec:
        slide = ws.copy_shared("cmu1_small_region_svs/CMU-1-Small-Region.svs")
        return Spec(["tissue", str(slide), "-o", str(slide.parent), "--overwrite"],
                    inputs=[slide])

``expect="error"`` wants exit status 2 with a one-line ``lnmeta: error: ...`` message;
``expect="success"`` wants exit status 0 and, when given, ``Spec.check(ws)`` to return
``None`` (or a string saying what is wrong, which makes the case "silent wrong").
Inputs listed in ``Spec.inputs`` (files or folders) are checksummed before and after:
any change is "data loss". A traceback on stderr is "traceback"; a run past its
timeout is "hang"; any ``*.json`` left under ``Spec.outputs`` that does not parse
strictly (``NaN``/``Infinity`` included) is "silent wrong".
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("correct", "clear error", "traceback", "hang", "silent wrong", "data loss")
ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LNMETA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@dataclass
class Workspace:
    """A scratch folder for one case."""

    root: Path
    shared: Path = SHARED

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def copy_shared(self, rel: str, dest: str | None = None) -> Path:
        """Copy a file or folder from ``../shared/data`` into the workspace."""
        src = self.shared / rel
        dst = self.path(dest or Path(rel).name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst


@dataclass
class Spec:
    """What to run and what to watch."""

    argv: Sequence[str]
    inputs: Sequence[Path] = ()
    outputs: Sequence[Path] = ()
    check: Callable[[Workspace], str | None] | None = None
    timeout: float = 180.0
    env: dict[str, str] = field(default_factory=dict)
    before: Callable[[Workspace], None] | None = None  # e.g. start a competing writer
    subprocess: bool = False  # needs its own process (signals, a hang, process-wide state)


@dataclass
class Case:
    name: str
    expect: str  # "error" | "success"
    make: Callable[[Workspace], Spec]


@dataclass
class Outcome:
    category: str
    detail: str
    returncode: int | None = None
    stderr: str = ""


CASES: list[Case] = []


def case(name: str, *, expect: str):
    """Register a hostile case (decorator over ``make(ws) -> Spec``)."""
    if expect not in ("error", "success"):
        raise ValueError(expect)

    def deco(make: Callable[[Workspace], Spec]) -> Callable[[Workspace], Spec]:
        if any(c.name == name for c in CASES):
            raise ValueError(f"duplicate hostile case name: {name}")
        CASES.append(Case(name, expect, make))
        return make

    return deco


def load_cases() -> list[Case]:
    """Import every ``cases_*`` module beside this file and return the registry."""
    pkg = importlib.import_module("tests.hostile")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("cases_"):
            importlib.import_module(f"tests.hostile.{mod.name}")
    return list(CASES)


def checksum(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (relative names)."""
    out: dict[str, str] = {}
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        base = path
    elif path.exists():
        files, base = [path], path.parent
    else:
        return {str(path): "<missing>"}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(f.relative_to(base))] = h.hexdigest()
    return out


def _strict_json(path: Path) -> str | None:
    def bad_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        json.loads(path.read_text(), parse_constant=bad_constant)
    except (ValueError, UnicodeDecodeError) as e:
        return f"{path}: invalid JSON ({e})"
    return None


def run_cli(argv: Sequence[str], *, cwd: Path, timeout: float,
            env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """Run ``python -m napari_lnmeta.cli ARGV`` in a fresh process."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONPATH", str(ROOT / "src"))
    full_env.update(env or {})
    try:
        p = subprocess.run([sys.executable, "-m", "napari_lnmeta.cli", *map(str, argv)],
                           cwd=cwd, env=full_env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(e.stdout), text(e.stderr)
    return p.returncode, p.stdout, p.stderr


def run_in_process(argv: Sequence[str], *, cwd: Path,
                   env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """Run ``napari_lnmeta.cli.main(ARGV)`` here, as the console script would.

    An exception escaping ``main`` is reported as the traceback Python would print.
    """
    import contextlib
    import io
    import traceback

    from napari_lnmeta.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_env = {k: os.environ.get(k) for k in (env or {})}
    old_cwd = os.getcwd()
    os.environ.update(env or {})
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(map(str, argv)))
            except SystemExit as e:  # argparse errors and --help
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - this is what the user would see
                err.write(traceback.format_exc())
                rc = 1
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def run_case(c: Case, root: Path, *, in_process: bool = True) -> Outcome:
    """Set up, run and classify one case in the scratch folder ``root``.

    ``in_process`` runs the CLI's ``main`` in this interpreter (fast: torch is imported
    once); cases with ``Spec.subprocess`` always get a fresh process.
    """
    ws = Workspace(Path(root))
    ws.root.mkdir(parents=True, exist_ok=True)
    spec = c.make(ws)
    sums = {str(p): checksum(Path(p)) for p in spec.inputs}
    if spec.before is not None:
        spec.before(ws)
    if in_process and not spec.subprocess:
        rc, out, err = run_in_process(spec.argv, cwd=ws.root, env=spec.env)
    else:
        rc, out, err = run_cli(spec.argv, cwd=ws.root, timeout=spec.timeout, env=spec.env)

    def outcome(cat: str, detail: str) -> Outcome:
        return Outcome(cat, detail, rc, err)

    if rc is None:
        return outcome("hang", f"still running after {spec.timeout:.0f} s")
    changed = [p for p, s in sums.items() if checksum(Path(p)) != s]
    if changed:
        return outcome("data loss", f"input changed or removed: {', '.join(changed)}")
    if "Traceback (most recent call last)" in err:
        return outcome("traceback", err.strip().splitlines()[-1] if err.strip() else "")
    for o in spec.outputs:
        o = Path(o)
        jsons = [o] if o.suffix == ".json" and o.is_file() else (
            sorted(o.rglob("*.json")) if o.is_dir() else [])
        for j in jsons:
            problem = _strict_json(j)
            if problem:
                return outcome("silent wrong", problem)
    if c.expect == "error":
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if rc == 2 and lines and lines[-1].startswith("lnmeta: error: "):
            return outcome("clear error", lines[-1])
        if rc == 0:
            return outcome("silent wrong", "exit 0 where an error was due")
        return outcome("traceback" if rc == 1 else "silent wrong",
                       f"exit {rc}: {lines[-1] if lines else '(no message)'}")
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        if rc == 2 and lines and lines[-1].startswith("lnmeta: error: "):
            return outcome("silent wrong", f"refused a valid request: {lines[-1]}")
        return outcome("traceback", f"exit {rc}: {lines[-1] if lines else '(no message)'}")
    if spec.check is not None:
        problem = spec.check(ws)
        if problem:
            return outcome("silent wrong", problem)
    return outcome("correct", "")
