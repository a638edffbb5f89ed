"""Load triton's native library so that it cannot collide with the OpenGL driver's LLVM.

Why: ``import torchvision`` (any part of it) imports ``torch._dynamo``, which imports
``triton`` where it is installed (every CUDA build of torch on Linux). ``triton._C.libtriton``
carries its own copy of LLVM. Mesa's OpenGL drivers (llvmpipe/swrast, radeonsi: Intel and AMD
desktops, virtual machines, remote desktops, ``xvfb``) load the system ``libLLVM-*.so`` when
napari creates its canvas. Loading ``libtriton.so`` *after* that binds part of its LLVM to the
system copy and the process dies with a segmentation fault, in whichever thread imports it. The
same import *before* the canvas exists is harmless, which is why scripts and the CLI never see it.

What: :func:`install` adds a ``sys.meta_path`` finder that intercepts only the extension module
``triton._C.libtriton``. When a system LLVM is already mapped into the process, the module is
loaded with ``RTLD_DEEPBIND`` so that it resolves LLVM symbols against its own copy first; in
every other case it is loaded exactly as Python would. Nothing is imported early and nothing
costs time unless triton is actually loaded. The plugin's napari entry points (``_napari`` and
``_qt``) call :func:`install`; it is idempotent and a no-op outside Linux.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "triton._C.libtriton"


def llvm_mapped() -> bool:
    """True when a shared LLVM library (``libLLVM*.so``) is mapped into this process."""
    try:
        with open(f"/proc/{os.getpid()}/maps", encoding="utf-8", errors="replace") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


class _DeepBindLoader(importlib.abc.Loader):
    """Wrap an ``ExtensionFileLoader``: create the module with ``RTLD_DEEPBIND`` when needed."""

    def __init__(self, inner: importlib.machinery.ExtensionFileLoader):
        self.inner = inner

    def create_module(self, spec):
        if not llvm_mapped():
            return self.inner.create_module(spec)
        old = sys.getdlopenflags()
        sys.setdlopenflags(old | os.RTLD_DEEPBIND)
        try:
            return self.inner.create_module(spec)
        finally:
            sys.setdlopenflags(old)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``triton._C.libtriton`` like the path finder does, then wraps its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return spec
        spec.loader = _DeepBindLoader(spec.loader)
        return spec


def installed() -> bool:
    return any(isinstance(f, _Finder) for f in sys.meta_path)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (Linux only; idempotent)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "RTLD_DEEPBIND"):
        return
    if TARGET in sys.modules or installed():
        return
    sys.meta_path.insert(0, _Finder())
