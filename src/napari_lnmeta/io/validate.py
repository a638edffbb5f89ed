"""Checks applied where values enter: the CLI, file readers and metadata.

One rule for every physical pixel size (``--mpp``, ``--patch-mpp``, NGFF ``scale``,
OME ``PhysicalSize``, Aperio ``MPP``, OpenSlide ``mpp-x/y``, a model's ``mpp``...):

    a pixel size is a finite number of µm/px within ``[MPP_MIN, MPP_MAX]`` = [0.01, 1000].

Everything below 0.01 µm/px (10 nm: beyond any light microscope) or above 1000 µm/px
(1 mm per pixel: no longer a slide) is a mistake or lying metadata, and is refused with
a one-line :class:`~napari_lnmeta.errors.LnmetaError` naming where the value came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError, LnmetaError

MPP_MIN = 0.01
MPP_MAX = 1000.0


def mpp_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid pixel size in µm/px, or None when it is."""
    if isinstance(value, bool):
        return f"{value!r} is not a number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"{value!r} is not a number"
    if not math.isfinite(v):
        return f"{value!r} is not a finite number"
    if not (MPP_MIN <= v <= MPP_MAX):
        return f"{v:g} µm/px is outside [{MPP_MIN:g}, {MPP_MAX:g}] µm/px"
    return None


def check_mpp(value: Any, *, what: str, path: str | Path | None = None,
              error: type[LnmetaError] | None = None) -> float:
    """``value`` as a float pixel size (µm/px), or a one-line error.

    ``what`` names the value (``"--mpp"``, ``"OME PhysicalSize"``...); ``path`` the file it
    came from, when any.
    """
    problem = mpp_problem(value)
    if problem is None:
        return float(value)
    msg = f"{what}: {problem} (a pixel size must be finite and within " \
          f"[{MPP_MIN:g}, {MPP_MAX:g}] µm/px)"
    if path is None:
        raise InputError(msg)
    if error is None:
        raise InputError(f"{path}: {msg}")
    raise error(path, msg)


def mpp_arg(option: str):
    """argparse ``type=`` for a pixel-size option: the one rule, as a one-line error.

    The error is an :class:`InputError` (argparse does not catch it), so the CLI prints
    ``lnmeta: error: --mpp: ...`` and exits with status 2 before any work starts.
    """

    def parse(text: str) -> float:
        return check_mpp(text, what=option)

    parse.__name__ = "pixel size"
    return parse


def positive_arg(option: str):
    """argparse ``type=`` for a scale factor: a finite number > 0, else a one-line error."""

    def parse(text: str) -> float:
        v = finite_float(text, what=option)
        if v <= 0:
            raise InputError(f"{option}: {text!r} must be > 0")
        return v

    parse.__name__ = "positive number"
    return parse


def finite_float(value: Any, *, what: str, path: str | Path | None = None) -> float:
    """``value`` as a finite float, or a one-line InputError."""
    if isinstance(value, bool):
        v = math.nan
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
    if not math.isfinite(v):
        where = f"{path}: " if path is not None else ""
        raise InputError(f"{where}{what}: {value!r} is not a finite number")
    return v
