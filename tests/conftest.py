"""Shared fixtures: the real data in ../shared/data and small generated pyramids.

Tests never touch the network: :func:`_no_network` fails any test that connects (or
resolves a name) outside this machine, and the model caches point at empty temporary
folders with the Hugging Face Hub offline, so a test that needs pretrained weights must
build them locally (tests/_backbone_helpers.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Empty, private model caches and no Hub networking for the whole test session (set
# before anything imports huggingface_hub, which reads them at import).
_CACHES = Path(tempfile.mkdtemp(prefix="lnmeta-test-caches-"))
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ["TORCH_HOME"] = str(_CACHES / "torch")
os.environ["HF_HOME"] = str(_CACHES / "huggingface")
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

_LOCAL_HOSTS = {"localhost", "", "0.0.0.0", "::", "::1", "ip6-localhost"}


def _is_local(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    h = str(host).strip("[]").lower()
    return (h in _LOCAL_HOSTS or h.startswith("127.") or h.startswith("::ffff:127.")
            or h == socket_gethostname())


def socket_gethostname() -> str:
    import socket

    try:
        return socket.gethostname().lower()
    except OSError:  # pragma: no cover
        return "localhost"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail the test when anything connects to (or looks up) a non-local address.

    Loopback (Dask ``tcp://127.0.0.1`` clusters, napari/Qt) and AF_UNIX sockets are
    allowed. The blocked call raises ``OSError`` (so the code under test takes its
    offline path) and the test fails at teardown, naming the address.
    """
    import socket

    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) \
                and not _is_local(address[0]):
            attempts.append(f"connect {address[0]}:{address[1]}")
            raise OSError(f"network access blocked in tests: {address[0]}:{address[1]}")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            attempts.append(f"resolve {host}")
            raise socket.gaierror(f"network access blocked in tests: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    if attempts:
        pytest.fail("the test tried to use the network: " + "; ".join(attempts[:5]),
                    pytrace=False)

SHARED = Path(os.environ.get("LNMETA_SHARED_DATA",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (override with LNMETA_SHARED_DATA)."""
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED} (set LNMETA_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def cmu1(shared_data) -> Path:
    return shared_data / "cmu1_small_region_svs" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def camelyon(shared_data) -> Path:
    return shared_data / "camelyon16_tumor001_lowres"


@pytest.fixture(scope="session")
def ihc_png(shared_data) -> Path:
    return shared_data / "skimage_ihc_dab" / "ihc.png"


def write_pyramid_tiff(path: Path, image: np.ndarray, *, levels: int = 3, mpp: float | None = 0.5,
                       tile: int = 256, ome: bool = True, compression: str | None = "jpeg") -> Path:
    """Write an RGB pyramid (SubIFDs) with tifffile; returns ``path``."""
    import tifffile

    kw = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if compression == "jpeg":
        kw["compressionargs"] = {"level": 90}
    md = {"axes": "YXS"}
    if mpp is not None:
        md.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        tw.write(image, subifds=levels - 1, metadata=md if ome else None,
                 resolution=(1e4 / mpp, 1e4 / mpp) if mpp else None,
                 resolutionunit="CENTIMETER" if mpp else None, **kw)
        img = image
        for _ in range(levels - 1):
            img = img[::2, ::2]
            tw.write(img, subfiletype=1, **kw)
    return path


@pytest.fixture
def pyramid_factory(tmp_path):
    def make(image, name="slide.ome.tif", **kw):
        return write_pyramid_tiff(tmp_path / name, image, **kw)
    return make


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine two OpenMP
    threads competing with another process stall small batched ops (0.17 s vs
    0.3-2.7 s per training step measured here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
