"""Sample data: real slides bundled in the package (see docs/formats.md for provenance)."""

from __future__ import annotations

from importlib.resources import files


def sample_path(name: str):
    """Path of a bundled sample file (``CMU-1-Small-Region.svs`` or ``ihc.png``)."""
    return files("napari_lnmeta") / "data" / name


def _open(name: str, mpp: float | None = None):
    from ..io.slide import open_slide
    from .layers import slide_layer_data

    slide = open_slide(str(sample_path(name)), mpp=mpp)
    return [slide_layer_data(slide)]


def cmu1_small_region():
    """CMU-1-Small-Region: real Aperio SVS H&E, 2220x2967 px at 0.499 µm/px (CC0)."""
    return _open("CMU-1-Small-Region.svs")


def ihc_dab():
    """scikit-image's IHC image (DAB + haematoxylin, colon); no pixel size in the file."""
    import warnings

    from ..io.slide import MppWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MppWarning)
        return _open("ihc.png")
