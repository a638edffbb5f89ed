"""Shared fixtures: the real data in ../shared/data and small generated pyramids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

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
