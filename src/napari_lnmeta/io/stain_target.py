"""Stain-normalisation targets: what a normaliser maps every image onto, as a JSON file.

:class:`StainTarget` holds a fitted (or the published Macenko) reference and reads and
writes the ``lnmeta-stain-target`` JSON format; trained models keep one in their metadata.
The normalisers that use it are in :mod:`napari_lnmeta.core.stain`; the target lives here,
below models and core, so that model metadata can be validated where it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from . import jsonio

#: normalisation methods
NORMALISERS = ("macenko", "vahadane", "reinhard")
#: torchstain's / Macenko's reference H&E (columns H, E in its file; rows here)
MACENKO_REF_STAINS = np.array([[0.5626, 0.7201, 0.4062],
                               [0.2159, 0.8012, 0.5581]], dtype=np.float64)
MACENKO_REF_MAX_CONC = np.array([1.9705, 1.0308], dtype=np.float64)


@dataclass
class StainTarget:
    """What a normaliser maps every image onto; stored as JSON so runs are reproducible.

    For ``macenko``/``vahadane``: the reference H, E unit vectors (rows, OD space) and
    the 99th-percentile concentrations. For ``reinhard``: mean and standard deviation of
    CIE L*a*b* over tissue pixels.
    """

    method: str
    stains: np.ndarray | None = None
    max_conc: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    io: float = 240.0
    alpha: float = 1.0
    beta: float = 0.15
    source: str | None = None
    n_pixels: int = 0

    def __post_init__(self) -> None:
        if self.method not in NORMALISERS:
            raise ValueError(f"unknown stain normalisation {self.method!r} "
                             f"(choose from {', '.join(NORMALISERS)})")
        shapes = {"stains": (2, 3), "max_conc": (2,), "lab_mean": (3,), "lab_std": (3,)}
        for name, shape in shapes.items():
            v = getattr(self, name)
            if v is not None:
                try:
                    a = np.asarray(v, dtype=np.float64)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{name} {v!r} is not numbers") from e
                if a.shape != shape or not np.isfinite(a).all():
                    raise ValueError(f"{name} must be {shape} finite numbers, got {v!r}")
                setattr(self, name, a)
        if self.lab_std is not None and not (self.lab_std > 0).all():
            raise ValueError(f"lab_std must be > 0, got {self.lab_std.tolist()}")
        for name in ("io", "alpha", "beta"):  # beta may be -inf: every pixel is tissue
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or np.isnan(v) or (
                    name != "beta" and not np.isfinite(v)):
                raise ValueError(f"{name} {v!r} is not a finite number")

    def to_json(self) -> dict[str, Any]:
        def arr(v):
            return None if v is None else np.asarray(v).tolist()

        return {"format": "lnmeta-stain-target", "version": 1, "method": self.method,
                "stains": arr(self.stains), "max_conc": arr(self.max_conc),
                "lab_mean": arr(self.lab_mean), "lab_std": arr(self.lab_std),
                "io": self.io, "alpha": self.alpha, "beta": self.beta,
                "source": self.source, "n_pixels": int(self.n_pixels)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StainTarget:
        return cls(method=d["method"], stains=d.get("stains"), max_conc=d.get("max_conc"),
                   lab_mean=d.get("lab_mean"), lab_std=d.get("lab_std"),
                   io=float(d.get("io", 240.0)), alpha=float(d.get("alpha", 1.0)),
                   beta=float(d.get("beta", 0.15)), source=d.get("source"),
                   n_pixels=int(d.get("n_pixels", 0)))

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write JSON atomically."""
        from .atomic import write_text_atomic

        return write_text_atomic(path, jsonio.dumps(self.to_json(), indent=2) + "\n",
                                 overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> StainTarget:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"{p}: cannot read stain target ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not a JSON stain target ({e.msg})") from e
        if not isinstance(d, dict) or d.get("format") != "lnmeta-stain-target":
            raise InputError(f"{p}: not an lnmeta stain target")
        try:
            return cls.from_json(d)
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{p}: invalid stain target ({e})") from e

    @classmethod
    def default(cls, method: str = "macenko") -> StainTarget:
        """Macenko's published reference (H&E); Reinhard has no default and must be fitted."""
        if method == "reinhard":
            raise ValueError("a Reinhard target must be fitted on a reference image")
        return cls(method=method, stains=MACENKO_REF_STAINS, max_conc=MACENKO_REF_MAX_CONC,
                   source="Macenko et al. reference")


__all__ = ["MACENKO_REF_MAX_CONC", "MACENKO_REF_STAINS", "NORMALISERS", "StainTarget"]
