"""Package rules: a cheap import, a Qt-free core, the manifest shipped and valid."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import napari_lnmeta

SRC = Path(napari_lnmeta.__file__).parent
QT_FREE = ("io", "core", "models", "train", "cli")
FORBIDDEN = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui.widgets",
             "napari_lnmeta._qt", "napari_lnmeta._napari")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                parts = path.relative_to(SRC.parent).with_suffix("").parts[:-node.level]
                yield ".".join(parts + ((node.module,) if node.module else ()))
            elif node.module:
                yield node.module


def test_core_packages_never_import_qt_or_napari():
    bad = []
    files = [f for sub in QT_FREE for f in (SRC / sub).rglob("*.py")]
    files += [SRC / n for n in ("cohort.py", "progress.py", "errors.py", "__init__.py")]
    for f in files:
        for mod in _imports(f):
            if any(mod == b or mod.startswith(b + ".") for b in FORBIDDEN):
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_import_contracts_hold(capsys):
    """pyproject.toml's import-linter contracts: Qt-free core, and layers that point down
    (errors < progress < io < models < core < train < cohort < cli | _napari < _qt)."""
    from importlinter.cli import lint_imports

    config = SRC.parents[1] / "pyproject.toml"
    code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_importing_the_package_is_cheap():
    code = ("import sys, napari_lnmeta, napari_lnmeta.io.slide, napari_lnmeta.cli;"
            "print(','.join(m for m in ('torch', 'dask.array', 'qtpy', 'napari', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_manifest_is_shipped_and_valid():
    from npe2 import PluginManifest

    shipped = SRC / "napari.yaml"
    root = SRC.parents[1] / "napari.yaml"
    assert shipped.is_file()
    if root.exists():
        assert root.read_text() == shipped.read_text()
    pm = PluginManifest.from_distribution("napari-lnmeta")
    assert pm.name == "napari-lnmeta"
    proc = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-lnmeta"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every python_name resolves
    for cmd in pm.contributions.commands:
        if cmd.python_name:
            mod, _, attr = cmd.python_name.partition(":")
            assert hasattr(__import__(mod, fromlist=[attr]), attr), cmd.python_name

