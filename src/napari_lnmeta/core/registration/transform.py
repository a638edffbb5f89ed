"""The result of a registration: :class:`Transform` (fixed <-> moving level-0 points, images
warped both ways, saved as JSON plus an ``.npz`` of displacement fields), its
:class:`DisplacementField` and :class:`SlideInfo`, and an affine from landmark pairs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from ...io import jsonio
from ...io.validate import check_mpp
from .warp import read_mapped, sample_image

if TYPE_CHECKING:

    from ...io.slide import Slide

FORMAT = "lnmeta-transform"
FORMAT_VERSION = 1


@dataclass
class SlideInfo:
    """What a transform remembers about each slide."""

    name: str | None
    shape: tuple[int, int]
    mpp: float | None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [int(v) for v in self.shape], "mpp": self.mpp,
                "path": self.path}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SlideInfo:
        return cls(name=d.get("name"), shape=tuple(int(v) for v in d["shape"]),
                   mpp=d.get("mpp"), path=d.get("path"))


@dataclass
class DisplacementField:
    """A dense displacement on a regular grid over the fixed slide (level-0 pixels).

    Grid node ``(i, j)`` sits at level-0 ``origin + (i, j) * spacing`` of the fixed slide.
    ``forward[:, i, j]`` is ``u`` with ``p -> p + u(p)``; ``inverse`` is ``w`` with
    ``r -> r + w(r)`` its inverse, both ``(2, H, W)`` float32 in level-0 ``(row, col)``.
    """

    origin: tuple[float, float]
    spacing: tuple[float, float]
    forward: np.ndarray
    inverse: np.ndarray

    def sample(self, which: str, points: np.ndarray) -> np.ndarray:
        """Bilinear displacement at level-0 points ``(N, 2)``; constant beyond the grid."""
        from scipy import ndimage as ndi

        arr = self.forward if which == "forward" else self.inverse
        pts = np.asarray(points, dtype=np.float64)
        idx = (pts - np.asarray(self.origin)) / np.asarray(self.spacing)
        h, w = arr.shape[1:]
        idx[:, 0] = np.clip(idx[:, 0], 0, h - 1)
        idx[:, 1] = np.clip(idx[:, 1], 0, w - 1)
        return np.stack([ndi.map_coordinates(arr[k], idx.T, order=1, mode="nearest")
                         for k in range(2)], axis=1)


@dataclass
class Transform:
    """A registration result: fixed level-0 ``(row, col)`` ↔ moving level-0 ``(row, col)``.

    The forward map (fixed → moving, what image warping pulls through) is
    ``q = A (s + u(s))`` with ``s = C p``: ``A = matrix`` (3×3, homogeneous
    ``(row, col, 1)``), ``u`` the optional non-rigid :class:`DisplacementField` on the
    fixed slide and ``C = pre`` an optional manual correction (identity when ``None``).
    The inverse map is ``p = C⁻¹ (r + w(r))`` with ``r = A⁻¹ q``.

    Attributes
    ----------
    metrics
        Similarities after each stage, the flip/angle found, runtime (JSON-able).
    """

    matrix: np.ndarray
    fixed: SlideInfo
    moving: SlideInfo
    field: DisplacementField | None = None
    mode: str = "affine"
    metrics: dict[str, Any] = dc_field(default_factory=dict)
    pre: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3)
        if self.pre is not None:
            self.pre = np.asarray(self.pre, dtype=np.float64).reshape(3, 3)

    # -- points ------------------------------------------------------------------------
    def fixed_to_moving(self, points: np.ndarray) -> np.ndarray:
        """Map level-0 ``(row, col)`` points ``(N, 2)`` of the fixed slide into the moving one."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if self.pre is not None:
            p = _apply(self.pre, p)
        if self.field is not None:
            p = p + self.field.sample("forward", p)
        return _apply(self.matrix, p)

    def moving_to_fixed(self, points: np.ndarray) -> np.ndarray:
        """Map level-0 ``(row, col)`` points ``(N, 2)`` of the moving slide into the fixed one."""
        q = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        r = _apply(np.linalg.inv(self.matrix), q)
        if self.field is not None:
            r = r + self.field.sample("inverse", r)
        if self.pre is not None:
            r = _apply(np.linalg.inv(self.pre), r)
        return r

    # -- dense coordinates ---------------------------------------------------------------
    def fixed_grid_to_moving(self, origin: tuple[float, float], shape: tuple[int, int],
                             downsample: float) -> np.ndarray:
        """Moving level-0 coordinates ``(2, h, w)`` of the centres of a fixed-slide grid.

        Grid pixel ``(i, j)`` covers fixed level-0 ``origin + [i, i+1) * downsample``
        (the :class:`~napari_lnmeta.io.frame.SlideFrame` convention).
        """
        h, w = int(shape[0]), int(shape[1])
        pts = _grid_points(origin, (h, w), downsample)
        return self.fixed_to_moving(pts).reshape(h, w, 2).transpose(2, 0, 1)

    def moving_grid_to_fixed(self, origin: tuple[float, float], shape: tuple[int, int],
                             downsample: float) -> np.ndarray:
        """Fixed level-0 coordinates ``(2, h, w)`` of the centres of a moving-slide grid."""
        h, w = int(shape[0]), int(shape[1])
        pts = _grid_points(origin, (h, w), downsample)
        return self.moving_to_fixed(pts).reshape(h, w, 2).transpose(2, 0, 1)

    # -- images ------------------------------------------------------------------------
    def warp_to_fixed(self, image: np.ndarray, *, image_downsample: float = 1.0,
                      image_origin: tuple[float, float] = (0.0, 0.0),
                      origin: tuple[float, float] = (0.0, 0.0),
                      shape: tuple[int, int] | None = None, downsample: float = 1.0,
                      order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a moving-slide image onto a fixed-slide grid.

        Parameters
        ----------
        image
            ``(h, w)`` or ``(h, w, c)`` array on the moving slide: pixel ``(i, j)`` covers
            moving level-0 ``image_origin + [i, i+1) * image_downsample``.
        origin, shape, downsample
            The output grid on the fixed slide (``shape`` defaults to the whole slide).
        order
            0 for labels (nearest), 1 for intensities (bilinear).
        cval
            Value outside the moving image (255 for RGB slides, 0 for masks).
        """
        if shape is None:
            shape = (math.ceil(self.fixed.shape[0] / downsample),
                     math.ceil(self.fixed.shape[1] / downsample))
        q = self.fixed_grid_to_moving(origin, shape, downsample)
        return sample_image(image, q, image_origin, image_downsample, order=order, cval=cval)

    def warp_slide_region(self, moving: Slide, origin: tuple[float, float],
                          shape: tuple[int, int], downsample: float) -> np.ndarray:
        """RGB of the moving slide resampled onto a fixed-slide grid, reading only what is needed.

        Memory is bounded by the output and the moving region behind it, read at the
        pyramid level closest to the output's resolution.
        """
        q = self.fixed_grid_to_moving(origin, shape, downsample)
        return read_mapped(moving, q, self.moving_downsample(downsample), cval=255)

    def moving_downsample(self, fixed_downsample: float) -> float:
        """Moving level-0 px per output px for an output at ``fixed_downsample`` on the fixed slide."""
        det = abs(np.linalg.det(self.matrix[:2, :2]))
        if self.pre is not None:
            det *= abs(np.linalg.det(self.pre[:2, :2]))
        return float(fixed_downsample * math.sqrt(det))

    # -- editing -----------------------------------------------------------------------
    def with_fixed_correction(self, correction: np.ndarray) -> Transform:
        """A copy with an extra affine applied on the fixed side (manual nudge).

        ``correction`` (3×3) maps a fixed point to where the current transform should be
        evaluated: the new forward map is ``p -> T(C p)``. With point pairs from the
        viewer (``b``: where a feature of the warped moving image should be; ``a``: where
        it is now, both fixed coordinates) ``C = affine_from_points(b, a)``.
        """
        c = np.asarray(correction, dtype=np.float64).reshape(3, 3)
        pre = c if self.pre is None else self.pre @ c
        metrics = dict(self.metrics, manual_correction=pre.tolist())
        return Transform(self.matrix.copy(), self.fixed, self.moving, self.field, self.mode,
                         metrics, pre)

    # -- persistence -------------------------------------------------------------------
    def to_json(self, field_file: str | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "mode": self.mode,
            "convention": "level-0 (row, col); forward fixed->moving q = A (s + u(s)), "
                          "s = C p (C = pre, identity if null); inverse p = C^-1 (r + w(r)), "
                          "r = A^-1 q",
            "fixed": self.fixed.to_json(), "moving": self.moving.to_json(),
            "matrix": self.matrix.tolist(), "metrics": _jsonable(self.metrics),
            "pre": None if self.pre is None else self.pre.tolist(),
            "field": None,
        }
        if self.field is not None:
            d["field"] = {"file": field_file, "origin": list(map(float, self.field.origin)),
                          "spacing": list(map(float, self.field.spacing)),
                          "shape": list(self.field.forward.shape[1:])}
        return d

    def save(self, path: str | Path, *, overwrite: bool = False,
             inputs: tuple[str | Path, ...] = ()) -> Path:
        """Write ``path`` (JSON) and, for a non-rigid transform, ``<stem>.field.npz`` beside it.

        Both are written atomically; the field file is written first so a JSON never
        points at a missing field.
        """
        from ...io.atomic import atomic_path, check_output

        path = Path(path)
        check_output(path, overwrite=overwrite, inputs=inputs)
        field_name = None
        if self.field is not None:
            field_name = _field_name(path)
            with atomic_path(path.with_name(field_name), overwrite=True,
                             inputs=inputs) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, forward=self.field.forward.astype(np.float32),
                                    inverse=self.field.inverse.astype(np.float32),
                                    origin=np.asarray(self.field.origin, np.float64),
                                    spacing=np.asarray(self.field.spacing, np.float64))
        text = jsonio.dumps(self.to_json(field_name), indent=2)
        with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Transform:
        """Read a transform written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such transform file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: not a JSON transform ({e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else None
            raise InputError(f"{path}: not an lnmeta transform (format={fmt!r})")
        try:
            return cls._from_file_json(path, d)
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise InputError(f"{path}: malformed lnmeta transform ({what})") from e

    @classmethod
    def _from_file_json(cls, path: Path, d: dict[str, Any]) -> Transform:
        """Validate every part of a transform file (see :meth:`load`)."""

        def matrix(v: Any, name: str) -> np.ndarray:
            m = np.asarray(v, dtype=np.float64)
            if m.shape != (3, 3) or not np.isfinite(m).all():
                raise InputError(f"{path}: '{name}' must be a 3x3 matrix of finite numbers")
            if not np.allclose(m[2], [0, 0, 1]) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
                raise InputError(f"{path}: '{name}' is not an invertible affine matrix "
                                 "(last row 0 0 1, non-zero determinant)")
            return m

        def slide_info(v: Any, name: str) -> SlideInfo:
            if not isinstance(v, dict):
                raise InputError(f"{path}: '{name}' is not an object")
            info = SlideInfo.from_json(v)
            if len(info.shape) != 2 or min(info.shape) <= 0:
                raise InputError(f"{path}: '{name}.shape' {v.get('shape')!r} is not a "
                                 "positive (height, width)")
            if info.mpp is not None:
                info.mpp = check_mpp(info.mpp, what=f"'{name}.mpp'", path=path)
            return info

        mode = d.get("mode", "affine")
        if not isinstance(mode, str):
            raise InputError(f"{path}: 'mode' {mode!r} is not a name")
        metrics = d.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise InputError(f"{path}: 'metrics' is not an object")
        fld = None
        if d.get("field"):
            if not isinstance(d["field"], dict) or not isinstance(d["field"].get("file"), str):
                raise InputError(f"{path}: 'field' must name its .npz file")
            fpath = path.with_name(d["field"]["file"])
            if not fpath.is_file():
                raise InputError(f"{path}: its displacement field {fpath.name} is missing")
            try:
                with np.load(fpath) as z:
                    origin, spacing = z["origin"], z["spacing"]
                    fwd, inv = z["forward"], z["inverse"]
            except (OSError, ValueError, KeyError, EOFError) as e:
                raise InputError(f"{fpath}: not a readable displacement field ({e})") from e
            origin = np.asarray(origin, dtype=np.float64).reshape(-1)
            spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
            if (origin.shape != (2,) or spacing.shape != (2,) or not np.isfinite(origin).all()
                    or not np.isfinite(spacing).all() or not (spacing > 0).all()):
                raise InputError(f"{fpath}: origin and spacing must be 2 finite numbers "
                                 "(spacing > 0)")
            if (fwd.ndim != 3 or fwd.shape[0] != 2 or fwd.shape != inv.shape
                    or min(fwd.shape[1:]) < 1 or not np.isfinite(fwd).all()
                    or not np.isfinite(inv).all()):
                raise InputError(f"{fpath}: forward/inverse must be finite (2, H, W) arrays of "
                                 "one shape")
            fld = DisplacementField(tuple(origin.tolist()), tuple(spacing.tolist()),
                                    fwd.astype(np.float32), inv.astype(np.float32))
        pre = d.get("pre")
        return cls(matrix(d["matrix"], "matrix"), slide_info(d["fixed"], "fixed"),
                   slide_info(d["moving"], "moving"), fld, mode, metrics,
                   None if pre is None else matrix(pre, "pre"))


def invert_field(forward: np.ndarray, spacing: tuple[float, float],
                 initial: np.ndarray | None = None, iterations: int = 20) -> np.ndarray:
    """Inverse of ``p -> p + u(p)`` on the same grid: ``w`` with ``r + w(r) + u(r + w(r)) = r``.

    Fixed-point iteration ``w <- -u(r + w)`` (bilinear), which converges for a map
    whose displacement gradient stays below 1 (an invertible, smooth field).
    ``forward`` is ``(2, h, w)`` in the units of ``spacing`` (level-0 px).
    """
    from scipy import ndimage as ndi

    fwd = np.asarray(forward, dtype=np.float64)
    h, w = fwd.shape[1:]
    sp = np.asarray(spacing, dtype=np.float64)[:, None, None]
    grid = np.mgrid[:h, :w].astype(np.float64)
    inv = -fwd.copy() if initial is None else np.asarray(initial, dtype=np.float64).copy()
    for _ in range(iterations):
        idx = grid + inv / sp
        idx[0] = np.clip(idx[0], 0, h - 1)
        idx[1] = np.clip(idx[1], 0, w - 1)
        inv = -np.stack([ndi.map_coordinates(fwd[k], idx, order=1, mode="nearest")
                         for k in range(2)])
    return inv.astype(np.float32)


def _field_name(path: Path) -> str:
    name = path.name
    stem = name[:-5] if name.lower().endswith(".json") else name
    return f"{stem}.field.npz"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def _grid_points(origin: tuple[float, float], shape: tuple[int, int],
                 downsample: float) -> np.ndarray:
    """Level-0 centres ``(h*w, 2)`` of a grid whose pixel ``(i, j)`` covers ``origin + [i, i+1) * d``."""
    h, w = shape
    rr = origin[0] + np.arange(h) * downsample + (downsample - 1) / 2
    cc = origin[1] + np.arange(w) * downsample + (downsample - 1) / 2
    return np.stack(np.meshgrid(rr, cc, indexing="ij"), axis=-1).reshape(-1, 2)


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 3×3 affine on ``(row, col)`` points mapping ``src`` onto ``dst``.

    With two point pairs a similarity (rotation, scale, translation) is fitted; with one,
    a translation.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if len(src) != len(dst) or len(src) == 0:
        raise InputError(f"need the same number (≥1) of points in both sets, got {len(src)} and {len(dst)}")
    M = np.eye(3)
    if len(src) == 1:
        M[:2, 2] = dst[0] - src[0]
        return M
    if len(src) == 2:
        # similarity via complex numbers: z' = a z + b
        zs = src[:, 1] + 1j * src[:, 0]
        zd = dst[:, 1] + 1j * dst[:, 0]
        if abs(zs[1] - zs[0]) < 1e-9:
            raise InputError("the two source points coincide")
        a = (zd[1] - zd[0]) / (zs[1] - zs[0])
        bb = zd[0] - a * zs[0]
        # x' = Re(a) x - Im(a) y + Re(b); y' = Im(a) x + Re(a) y + Im(b); rows=y, cols=x
        M[0, 0], M[0, 1], M[0, 2] = a.real, a.imag, bb.imag
        M[1, 0], M[1, 1], M[1, 2] = -a.imag, a.real, bb.real
        return M
    X = np.c_[src, np.ones(len(src))]
    sol, *_ = np.linalg.lstsq(X, dst, rcond=None)
    M[:2, :] = sol.T
    return M
