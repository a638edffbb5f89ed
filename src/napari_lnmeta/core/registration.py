"""Register a moving slide (IHC) onto a fixed slide (H&E), and map points and images.

The method, stage by stage (all stages work in micrometres, so slides of different
scanners and µm/px register without special cases):

1. **Prealignment** on low-resolution images (``prealign_size`` px): a stain-invariant
   representation (mean optical density, or the haematoxylin optical density that both
   H&E and IHC carry) is rotated through ``360°`` in ``angle_step`` steps, with and
   without a mirror flip; for each candidate the translation is found by masked
   normalised cross-correlation over all shifts (FFT, Padfield 2012). The scale comes
   from the µm/px of the two slides.
2. **Rigid / affine refinement** at ``affine_size`` px by gradient descent (Adam, torch)
   on local normalised cross-correlation (LNCC) of the representation, coarse to fine.
3. **Non-rigid refinement** at ``nonrigid_size`` px: a stationary velocity field
   integrated by scaling and squaring (a diffeomorphism, so its inverse is the flow of
   the negated field), optimised on LNCC with a diffusion regulariser, coarse to fine.
   On the ANHIR lung pairs it reaches a median rTRE of 0.0044–0.0082 (docs/registration.md
   has the numbers, what else was tried, and why the landmarks allow little better).

The result is a :class:`Transform` that maps level-0 ``(row, col)`` points of the fixed
slide to level-0 points of the moving slide and back, and warps images both ways. It
is saved as JSON plus an ``.npz`` holding the displacement fields.

A registration that fails (no tissue, similarity below ``min_similarity``, tissue that
does not overlap) raises :class:`~napari_lnmeta.errors.InputError` rather than return a
transform that would silently put a mask in the wrong place.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..io import jsonio
from ..io.validate import check_mpp
from ..progress import Progress

if TYPE_CHECKING:
    from collections.abc import Generator

    from ..io.slide import Slide

FORMAT = "lnmeta-transform"
FORMAT_VERSION = 1
MODES = ("rigid", "affine", "nonrigid")


# --------------------------------------------------------------------------------------
# Configuration and slide descriptions
# --------------------------------------------------------------------------------------
@dataclass
class RegistrationConfig:
    """Parameters of :func:`register` (defaults suit H&E ↔ IHC consecutive sections).

    Parameters
    ----------
    mode
        ``"rigid"`` (rotation, flip, translation, scale from µm/px), ``"affine"`` or
        ``"nonrigid"`` (affine followed by a smooth invertible deformation).
    representation
        ``"haematoxylin"`` (H optical density by Ruifrok deconvolution) or ``"grey"``
        (mean optical density of R, G, B).
    prealign_size, affine_size, nonrigid_size
        Longest side, in pixels, of the fixed image at each stage (never finer than
        level 0). The moving image is read at the same µm/px.
    angle_step
        Rotation step of the prealignment search, in degrees.
    allow_flip
        Also try the mirrored moving image (a slide mounted upside down).
    affine_iterations
        Adam iterations per resolution level of the rigid/affine stage.
    nonrigid_levels
        ``(pool, spacing, iterations, window)`` per level, coarsest first: images
        averaged over ``pool × pool`` working pixels, velocity nodes every ``spacing``
        working pixels, LNCC window in pooled pixels.
    smoothing
        Gaussian sigma (working pixels) applied to the representation before the
        non-rigid stage: it keeps the fine alveolar/cellular texture, which differs
        between sections, from dominating the match.
    nonrigid_step
        Initial Adam step of the velocity field, in node spacings (annealed per level).
    lncc_window
        LNCC window (pixels) used to report similarity.
    smoothness
        Weight of the diffusion regulariser on the velocity field. With ``nonrigid_step``
        1 it gave a smoother field and a lower mean landmark error on the ANHIR pairs than
        weight 1 with step 0.5 (docs/registration.md): consecutive sections share their
        structures, not their fine alveolar/tumour texture, which a weak regulariser
        lets the field chase.
    min_similarity
        Smallest acceptable similarity after the linear stage (LNCC of the smoothed
        representation, 31-px window; calibrated in docs/registration.md).
    min_overlap
        Smallest acceptable fraction of the smaller tissue area that overlaps.
    candidates
        How many of the best prealignment candidates the rigid stage refines.
    device
        torch device (``"cpu"``, ``"cuda"``); ``None`` picks CUDA when present.
    threads
        CPU threads for torch during the registration (restored afterwards); ``None``
        keeps torch's setting. One thread is much faster on a machine whose cores are
        busy with other work (OpenMP threads then wait on each other).
    """

    mode: str = "nonrigid"
    representation: str = "grey"
    prealign_size: int = 128
    affine_size: int = 384
    nonrigid_size: int = 1024
    angle_step: float = 10.0
    allow_flip: bool = True
    affine_iterations: int = 40
    nonrigid_levels: tuple[tuple[int, int, int, int], ...] = (
        (4, 32, 80, 21), (2, 16, 60, 15))
    smoothing: float = 2.0
    nonrigid_step: float = 1.0
    lncc_window: int = 9
    smoothness: float = 2.0
    min_similarity: float = 0.13
    min_overlap: float = 0.5
    candidates: int = 2
    device: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"registration mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.representation not in ("haematoxylin", "grey"):
            raise InputError(f"representation must be 'haematoxylin' or 'grey', got {self.representation!r}")
        self.nonrigid_levels = tuple(tuple(int(x) for x in lv) for lv in self.nonrigid_levels)


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
        (the :class:`~napari_lnmeta.io.omezarr.SlideFrame` convention).
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

    def warp_to_moving(self, image: np.ndarray, *, image_downsample: float = 1.0,
                       image_origin: tuple[float, float] = (0.0, 0.0),
                       origin: tuple[float, float] = (0.0, 0.0),
                       shape: tuple[int, int] | None = None, downsample: float = 1.0,
                       order: int = 1, cval: float = 0.0) -> np.ndarray:
        """Resample a fixed-slide image onto a moving-slide grid (the inverse direction)."""
        if shape is None:
            shape = (math.ceil(self.moving.shape[0] / downsample),
                     math.ceil(self.moving.shape[1] / downsample))
        p = self.moving_grid_to_fixed(origin, shape, downsample)
        return sample_image(image, p, image_origin, image_downsample, order=order, cval=cval)

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
        from ..io.atomic import atomic_path, check_output

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


def sample_image(image: np.ndarray, coords: np.ndarray, origin: tuple[float, float],
                 downsample: float, *, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Sample ``image`` at level-0 coordinates ``coords (2, h, w)`` of the slide it lies on.

    ``image`` pixel ``(i, j)`` covers level-0 ``origin + [i, i+1) * downsample``.
    """
    from scipy import ndimage as ndi

    img = np.asarray(image)
    idx = (coords - np.asarray(origin, dtype=np.float64)[:, None, None]
           - (downsample - 1) / 2) / downsample
    if img.ndim == 2:
        out = ndi.map_coordinates(img, idx, order=order, mode="constant", cval=cval,
                                  prefilter=False)
        return out.astype(img.dtype, copy=False)
    chans = [ndi.map_coordinates(img[..., c], idx, order=order, mode="constant", cval=cval,
                                 prefilter=False) for c in range(img.shape[2])]
    out = np.stack(chans, axis=-1)
    if np.issubdtype(img.dtype, np.integer):
        out = np.clip(np.rint(out), np.iinfo(img.dtype).min, np.iinfo(img.dtype).max)
    return out.astype(img.dtype, copy=False)


def read_mapped(slide: Slide, coords: np.ndarray, downsample: float, *, cval: int = 255,
                margin: int = 2) -> np.ndarray:
    """RGB of ``slide`` at level-0 coordinates ``coords (2, h, w)`` (bilinear).

    Reads the bounding box of the coordinates at the pyramid level closest to (and not
    coarser than) ``downsample`` level-0 px per output px.
    """
    h, w = coords.shape[1:]
    sh, sw = slide.shape
    r0, r1 = float(np.nanmin(coords[0])), float(np.nanmax(coords[0]))
    c0, c1 = float(np.nanmin(coords[1])), float(np.nanmax(coords[1]))
    if r1 < -downsample or c1 < -downsample or r0 > sh + downsample or c0 > sw + downsample:
        return np.full((h, w, 3), cval, np.uint8)
    r0, c0 = max(r0, 0.0), max(c0, 0.0)
    r1, c1 = min(r1, sh - 1.0), min(c1, sw - 1.0)
    level = slide.best_level_for_downsample(max(downsample, 1.0))
    lds = slide.level_downsamples[level]
    ly0 = max(int(math.floor(r0 / lds)) - margin, 0)
    lx0 = max(int(math.floor(c0 / lds)) - margin, 0)
    ly1 = int(math.ceil(r1 / lds)) + margin + 1
    lx1 = int(math.ceil(c1 / lds)) + margin + 1
    lh, lw = slide.level_shapes[level]
    ly1, lx1 = min(ly1, lh), min(lx1, lw)
    if ly1 <= ly0 or lx1 <= lx0:
        return np.full((h, w, 3), cval, np.uint8)
    region = slide.read_region((int(ly0 * lds), int(lx0 * lds)), (ly1 - ly0, lx1 - lx0),
                               level=level)
    ratio = downsample / lds
    if ratio >= 1.5:  # no level close enough: average before sampling (no aliasing)
        from scipy import ndimage as ndi

        k = int(round(ratio))
        region = ndi.uniform_filter(region, size=(k, k, 1), mode="nearest")
    return sample_image(region, coords, (ly0 * lds, lx0 * lds), lds, order=1, cval=cval)


def array_slide(rgb: np.ndarray, *, mpp: float | None = None, name: str = "image") -> Slide:
    """Wrap an in-memory RGB array (a napari layer, a test image) as a :class:`Slide`."""
    from ..io.slide import Slide

    arr = np.asarray(rgb)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise InputError(f"{name}: expected an RGB image, got shape {arr.shape}")
    arr = np.ascontiguousarray(np.clip(arr[..., :3], 0, 255).astype(np.uint8))

    class ArraySlide(Slide):
        format = "array"

        def __init__(self):
            super().__init__(Path(name), mpp=mpp)
            self._img = arr
            self.level_shapes = [arr.shape[:2]]

        def _read_level(self, level, y, x, h, w):
            return np.ascontiguousarray(self._img[y:y + h, x:x + w])

    return ArraySlide()


def warped_pyramid(transform: Transform, moving: Slide, *, tile: int = 512,
                   min_size: int = 512) -> tuple[list[Any], list[float]]:
    """The moving slide resampled onto the fixed slide, as a lazy multiscale RGB pyramid.

    Level ``k`` has downsample ``2**k`` on the fixed slide; each ``tile`` × ``tile`` chunk
    reads only the moving region that maps onto it when it is computed (napari computes
    what is on screen). Returns the dask arrays and their downsamples.
    """
    import dask.array as da

    h0, w0 = transform.fixed.shape
    levels, dss = [], []
    ds = 1.0
    while True:
        h, w = math.ceil(h0 / ds), math.ceil(w0 / ds)

        def block(block_info=None, _ds=ds):
            loc = block_info[None]["array-location"]
            (r0, r1), (c0, c1) = loc[0], loc[1]
            return transform.warp_slide_region(moving, (r0 * _ds, c0 * _ds),
                                               (r1 - r0, c1 - c0), _ds)

        chunks = (tuple(min(tile, h - i) for i in range(0, h, tile)),
                  tuple(min(tile, w - j) for j in range(0, w, tile)), (3,))
        levels.append(da.map_blocks(block, chunks=chunks, dtype=np.uint8,
                                    name=f"lnmeta-warped-{id(transform):x}-{ds:g}",
                                    meta=np.empty((0, 0, 0), np.uint8)))
        dss.append(ds)
        if max(h, w) <= min_size:
            break
        ds *= 2
    return levels, dss


# --------------------------------------------------------------------------------------
# Inputs: slides or arrays, read at a chosen downsample
# --------------------------------------------------------------------------------------
class _Source:
    """A slide or an RGB array, with its level-0 shape, µm/px and low-resolution reads."""

    def __init__(self, obj: Slide | np.ndarray | str | Path, mpp: float | None = None,
                 name: str | None = None):
        from ..io.slide import Slide, open_slide

        self.slide: Slide | None = None
        self.array: np.ndarray | None = None
        if isinstance(obj, (str, Path)):
            obj = open_slide(obj, mpp=mpp)
        if isinstance(obj, Slide):
            self.slide = obj
            self.shape = tuple(int(v) for v in obj.shape)
            self.mpp = obj.mpp if mpp is None else float(mpp)
            self.name = name or obj.name
            self.path = str(obj.path)
        else:
            arr = np.asarray(obj)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=-1)
            if arr.ndim != 3 or arr.shape[2] < 3:
                raise InputError(f"{name or 'image'}: expected an RGB image, got shape {arr.shape}")
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            self.array = np.ascontiguousarray(arr[..., :3])
            self.shape = arr.shape[:2]
            self.mpp = None if mpp is None else float(mpp)
            self.name = name or "image"
            self.path = None
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def info(self) -> SlideInfo:
        return SlideInfo(self.name, self.shape, self.mpp, self.path)

    def read(self, size: tuple[int, int]) -> np.ndarray:
        """The whole image resampled (box filter) to ``size = (h, w)``."""
        from PIL import Image

        size = (max(int(size[0]), 1), max(int(size[1]), 1))
        if size in self._cache:
            return self._cache[size]
        if self.array is not None:
            src = self.array
        else:
            slide = self.slide
            ds = min(slide.shape[0] / size[0], slide.shape[1] / size[1])
            pyr = slide.pyramid()
            dss = [(slide.shape[0] / p.shape[0] + slide.shape[1] / p.shape[1]) / 2 for p in pyr]
            idx = max((i for i, d in enumerate(dss) if d <= ds * 1.001), default=0)
            src = np.asarray(pyr[idx].compute(scheduler="threads"))
        if src.shape[:2] == size:
            out = np.ascontiguousarray(src)
        else:
            out = np.asarray(Image.fromarray(src).resize((size[1], size[0]), Image.BOX))
        self._cache[size] = out
        return out


# --------------------------------------------------------------------------------------
# Image representation and foreground
# --------------------------------------------------------------------------------------
def representation(rgb: np.ndarray, kind: str = "haematoxylin") -> np.ndarray:
    """Stain-invariant float32 image: 0 on glass, about 1 on dense tissue.

    ``"haematoxylin"``: the H concentration of Ruifrok colour deconvolution (both H&E and
    DAB IHC have a haematoxylin counterstain); ``"grey"``: mean optical density. Each is
    divided by its 99th percentile over the foreground so stain intensity differences
    between the two slides do not matter.
    """
    from .stain import deconvolve, rgb_to_od

    rep = deconvolve(rgb)[..., 0] if kind == "haematoxylin" else rgb_to_od(rgb).mean(-1)
    rep = rep.astype(np.float32)
    fg = rep[foreground(rgb)]
    scale = float(np.percentile(fg, 99)) if fg.size > 16 else float(rep.max() or 1.0)
    return np.clip(rep / max(scale, 1e-6), 0, 2).astype(np.float32)


def foreground(rgb: np.ndarray, *, min_od: float = 0.05) -> np.ndarray:
    """Tissue (anything that absorbs light) at low resolution, for registration only.

    Otsu on the grey optical density, never below ``min_od`` so a blank slide gives an
    empty mask; a small closing joins sparse tissue (lung alveoli, fat).
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from .stain import rgb_to_od

    od = ndi.uniform_filter(rgb_to_od(rgb).mean(-1), 3)
    thr = min_od
    if od.max() > min_od and od.min() < od.max():
        thr = max(float(threshold_otsu(od)) * 0.5, min_od)
    mask = od > thr
    mask = ndi.binary_closing(mask, structure=np.ones((5, 5)), border_value=0)
    return ndi.binary_fill_holes(mask) if mask.mean() < 0.5 else mask


# --------------------------------------------------------------------------------------
# Prealignment: masked NCC over all shifts, for every rotation (and flip)
# --------------------------------------------------------------------------------------
def _masked_ncc(f: np.ndarray, mf: np.ndarray, g: np.ndarray, mg: np.ndarray,
                min_overlap: float, fixed_fft=None) -> tuple[np.ndarray, tuple]:
    """Pearson correlation of ``f`` and ``g`` over their overlap, for every shift of ``g``.

    ``out[s]`` correlates ``f(x)`` with ``g(x - s)`` (shifts wrap: negative shifts sit
    at the end). Shifts whose overlap is below ``min_overlap`` of the smaller mask are 0.
    """
    from scipy import fft

    shape = (f.shape[0] + g.shape[0], f.shape[1] + g.shape[1])
    shape = tuple(fft.next_fast_len(s, real=True) for s in shape)
    if fixed_fft is None:
        fixed_fft = [fft.rfft2(a, shape) for a in (f * mf, f * f * mf, mf.astype(np.float64))]
    Ff, Ff2, Fm = fixed_fft
    Gg = np.conj(fft.rfft2(g * mg, shape))
    Gg2 = np.conj(fft.rfft2(g * g * mg, shape))
    Gm = np.conj(fft.rfft2(mg.astype(np.float64), shape))

    def corr(a, b):
        return fft.irfft2(a * b, shape)

    n = np.rint(corr(Fm, Gm))
    sf, sg = corr(Ff, Gm), corr(Fm, Gg)
    sff, sgg = corr(Ff2, Gm), corr(Fm, Gg2)
    sfg = corr(Ff, Gg)
    nn = np.maximum(n, 1)
    num = sfg - sf * sg / nn
    den = (sff - sf ** 2 / nn) * (sgg - sg ** 2 / nn)
    out = np.where(den > 1e-9, num / np.sqrt(np.maximum(den, 1e-12)), 0.0)
    out[n < min_overlap * min(mf.sum(), mg.sum())] = 0.0
    return out, fixed_fft


def _distinct_candidates(cands: list[dict[str, Any]], n: int,
                         ratio: float = 0.85) -> list[dict[str, Any]]:
    """The best candidate, plus up to ``n - 1`` distinct poses scoring ≥ ``ratio`` of it.

    Neighbouring angles of the same pose are not worth refining twice; a mirrored or
    far-rotated pose with a similar score is (symmetric tissue outlines).
    """
    out = [cands[0]]
    for c in cands[1:]:
        if len(out) >= n or c["score"] < ratio * cands[0]["score"]:
            break
        distinct = all(c["flip"] != o["flip"]
                       or abs((c["angle"] - o["angle"] + 180) % 360 - 180) > 20 for o in out)
        if distinct:
            out.append(c)
    return out


def _rotation(theta_deg: float, flip: bool) -> np.ndarray:
    """2×2 matrix on ``(row, col)`` vectors: optional column mirror, then rotation."""
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    rot = np.array([[c, -s], [s, c]])
    return rot @ np.diag([1.0, -1.0]) if flip else rot


def _prealign(f: np.ndarray, mf: np.ndarray, g: np.ndarray, mg: np.ndarray,
              scale: float, config: RegistrationConfig) -> list[dict[str, Any]]:
    """Candidate linear maps (fixed px → moving px, both at the prealign resolution).

    ``scale`` is moving px per fixed px (1 when both share µm/px). Returns candidates
    sorted by masked NCC, best first: ``{"L", "t", "score", "angle", "flip"}`` where a
    fixed pixel ``p`` maps to ``L @ p + t`` in moving pixels.
    """
    from scipy import ndimage as ndi

    angles = np.arange(0.0, 360.0, config.angle_step)
    flips = (False, True) if config.allow_flip else (False,)
    hm, wm = g.shape
    side = int(math.ceil(math.hypot(hm, wm) / scale)) + 2
    cands = []
    fixed_fft = None
    fs = ndi.gaussian_filter(f, 1.0)
    gs = ndi.gaussian_filter(g, 1.0)
    gc = np.array([(hm - 1) / 2, (wm - 1) / 2])
    oc = np.array([(side - 1) / 2, (side - 1) / 2])
    for flip in flips:
        for ang in angles:
            # L maps fixed px offsets to moving px offsets; the canvas holds the moving
            # image resampled in the fixed frame, centred: canvas x -> L (x - oc) + gc
            L = scale * _rotation(ang, flip)
            off = gc - L @ oc
            canvas = ndi.affine_transform(gs, L, offset=off, output_shape=(side, side), order=1,
                                          cval=0.0)
            cmask = ndi.affine_transform(np.ones_like(gs), L, offset=off, output_shape=(side, side),
                                         order=0, cval=0.0) > 0.5
            ncc, fixed_fft = _masked_ncc(fs, np.ones_like(fs), canvas, cmask.astype(np.float64),
                                         0.25, fixed_fft)
            k = int(np.argmax(ncc))
            sy, sx = np.unravel_index(k, ncc.shape)
            # out[s] correlates f(x) with canvas(x - s): fixed x <-> canvas x - s
            sy = sy - ncc.shape[0] if sy > ncc.shape[0] // 2 else sy
            sx = sx - ncc.shape[1] if sx > ncc.shape[1] // 2 else sx
            shift = np.array([sy, sx], dtype=np.float64)
            # fixed p -> canvas p - shift -> moving L (p - shift - oc) + gc
            t = gc - L @ (oc + shift)
            cands.append({"L": L, "t": t, "score": float(ncc.flat[k]), "angle": float(ang),
                          "flip": bool(flip)})
    cands.sort(key=lambda c: -c["score"])
    return cands


# --------------------------------------------------------------------------------------
# torch optimisation: sampling, LNCC, linear and velocity-field stages
# --------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """A working image over a slide: per-axis level-0 px per pixel, µm/px of level 0."""

    shape: tuple[int, int]
    ds: tuple[float, float]
    mpp: float

    def centres_um(self, torch, device) -> Any:
        h, w = self.shape
        r = (torch.arange(h, dtype=torch.float32, device=device) * self.ds[0]
             + (self.ds[0] - 1) / 2) * self.mpp
        c = (torch.arange(w, dtype=torch.float32, device=device) * self.ds[1]
             + (self.ds[1] - 1) / 2) * self.mpp
        rr, cc = torch.meshgrid(r, c, indexing="ij")
        return torch.stack([rr, cc], dim=-1)  # (h, w, 2) µm

    def pooled(self, k: int) -> _Grid:
        return _Grid((self.shape[0] // k, self.shape[1] // k), (self.ds[0] * k, self.ds[1] * k),
                     self.mpp)

    def um_to_norm(self, q, torch) -> Any:
        """µm ``(…, 2)`` (row, col) → grid_sample coordinates ``(…, 2)`` (x, y)."""
        h, w = self.shape
        ir = (q[..., 0] / self.mpp - (self.ds[0] - 1) / 2) / self.ds[0]
        ic = (q[..., 1] / self.mpp - (self.ds[1] - 1) / 2) / self.ds[1]
        return torch.stack([(2 * ic + 1) / w - 1, (2 * ir + 1) / h - 1], dim=-1)


def _torch_device(device: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _with_gradients(img):
    """``(1, 1, h, w)`` → ``(1, 3, h, w)``: the image and its row/column derivatives.

    Sampling these three channels together gives the warped image *and* its spatial
    gradient, so :func:`_warp` can back-propagate to the coordinates without torch's
    (slow, on CPU) ``grid_sample`` backward.
    """
    import torch

    dr = torch.zeros_like(img)
    dc = torch.zeros_like(img)
    dr[..., 1:-1, :] = (img[..., 2:, :] - img[..., :-2, :]) / 2
    dc[..., :, 1:-1] = (img[..., :, 2:] - img[..., :, :-2]) / 2
    return torch.cat([img, dr, dc], dim=1)


def _warp_fn():
    import torch
    import torch.nn.functional as F

    class WarpFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, img3, g):
            out = F.grid_sample(img3, g, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
            ctx.save_for_backward(out[:, 1:3])
            ctx.hw = img3.shape[-2:]
            return out[:, :1]

        @staticmethod
        def backward(ctx, grad):
            (dm,) = ctx.saved_tensors
            h, w = ctx.hw
            # d(out)/d(x_norm) = d(out)/d(col) * w/2, likewise rows
            gx = grad[:, 0] * dm[:, 1] * (w / 2)
            gy = grad[:, 0] * dm[:, 0] * (h / 2)
            return None, torch.stack([gx, gy], dim=-1)

    return WarpFn


_WARP = None


def _warp(img3, grid: _Grid, q):
    """Sample an image from :func:`_with_gradients` at µm points ``q (H, W, 2)``.

    Returns ``(1, 1, H, W)``; outside the image reads 0. Differentiable in ``q``.
    """
    import torch

    global _WARP
    if _WARP is None:
        _WARP = _warp_fn()
    g = grid.um_to_norm(q, torch)[None]
    return _WARP.apply(img3, g)


def _box(x, win: int):
    """Mean over a ``win × win`` window (truncated at the border), by cumulative sums.

    O(1) per pixel whatever the window, where ``avg_pool2d`` with stride 1 is O(win²).
    """
    import torch
    import torch.nn.functional as F

    pad = win // 2
    h, w = x.shape[-2:]

    def run(t, dim, n):
        t = F.pad(t, (0, 0, pad + 1, pad) if dim == -2 else (pad + 1, pad, 0, 0))
        c = torch.cumsum(t, dim=dim)
        hi = c.narrow(dim, win, n)
        lo = c.narrow(dim, 0, n)
        return hi - lo

    s = run(run(x, -2, h), -1, w)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    cnt = run(run(ones, -2, h), -1, w)
    return s / cnt


class _Lncc:
    """Weighted mean local normalised cross-correlation against a fixed image.

    The fixed image's local means and variances are computed once; each call then box-
    filters three maps of the warped moving image.
    """

    def __init__(self, fixed, win: int, weight=None):
        import torch

        self.win = int(win)
        self.f = fixed
        st = _box(torch.cat([fixed, fixed * fixed], dim=1), self.win)
        self.mf = st[:, :1]
        self.vf = (st[:, 1:2] - self.mf ** 2).clamp_min(0)
        self.w = weight
        self.wsum = None if weight is None else weight.sum().clamp_min(1e-6)

    def __call__(self, b):
        import torch

        st = _box(torch.cat([b, b * b, self.f * b], dim=1), self.win)
        mb = st[:, :1]
        vb = (st[:, 1:2] - mb * mb).clamp_min(0)
        cc = (st[:, 2:3] - self.mf * mb) / (self.vf * vb + 1e-4).sqrt()
        if self.w is None:
            return cc.mean()
        return (cc * self.w).sum() / self.wsum


def _lncc(a, b, win: int, weight=None):
    """Weighted mean LNCC of ``a`` and ``b`` (one-off; see :class:`_Lncc`)."""
    return _Lncc(a, win, weight)(b)


def _pyramid(x, levels: int):
    import torch.nn.functional as F

    out = [x]
    for _ in range(levels - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out[::-1]  # coarsest first


class _Linear:
    """``q = L (p - c) + c + t`` in µm, ``L = L0 + dL`` (affine) or ``s R(dθ) L0`` (rigid)."""

    def __init__(self, L0: np.ndarray, t0: np.ndarray, centre: np.ndarray, extent: float,
                 rigid: bool, device):
        import torch

        self.torch = torch
        self.L0 = torch.tensor(L0, dtype=torch.float32, device=device)
        self.t0 = torch.tensor(t0, dtype=torch.float32, device=device)
        self.c = torch.tensor(centre, dtype=torch.float32, device=device)
        self.extent = float(extent)
        self.rigid = rigid
        n = 1 if rigid else 4
        self.dl = torch.zeros(n, device=device, requires_grad=True)
        self.dt = torch.zeros(2, device=device, requires_grad=True)

    def params(self):
        return [self.dl, self.dt]

    def matrix(self):
        torch = self.torch
        if self.rigid:
            th = self.dl[0]
            c, s = torch.cos(th), torch.sin(th)
            rot = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
            return rot @ self.L0
        return self.L0 + self.dl.view(2, 2) * float(self.L0.abs().max())

    def translation(self):
        return self.t0 + self.dt * self.extent

    def __call__(self, p):
        L = self.matrix()
        return (p - self.c) @ L.T + self.c + self.translation()

    def as_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(L, b)`` with ``q = L p + b`` (µm)."""
        with self.torch.no_grad():
            L = self.matrix().double().cpu().numpy()
            t = self.translation().double().cpu().numpy()
            c = self.c.double().cpu().numpy()
        return L, c - L @ c + t


def _optimise_linear(fimg, fgrid: _Grid, mimg, mgrid: _Grid, weight, lin: _Linear,
                     iterations: int, levels: int, win: int, lr: float, *,
                     finest: bool = True):
    """Coarse-to-fine Adam on ``-LNCC``; a generator yielding after every 10 iterations.

    ``finest=False`` stops one level short of full resolution (cheap candidate checks).
    """
    import torch

    fp = _pyramid(fimg, levels)
    mp = _pyramid(mimg, levels)
    wp = _pyramid(weight, levels)
    opt = _Adam(lin.params(), lr=lr)
    for lvl in range(levels if finest else levels - 1):
        k = 2 ** (levels - 1 - lvl)
        fg, mg = fgrid.pooled(k), mgrid.pooled(k)
        fi, mi, wi = fp[lvl], mp[lvl], wp[lvl]
        fi = fi[..., :fg.shape[0], :fg.shape[1]]
        mi = _with_gradients(mi[..., :mg.shape[0], :mg.shape[1]])
        wi = wi[..., :fg.shape[0], :fg.shape[1]]
        p = fg.centres_um(torch, fimg.device)
        sim = _Lncc(fi, win, wi)
        for it in range(iterations):
            _cosine_lr(opt, lr / 2 ** lvl, it, iterations)
            opt.zero_grad()
            loss = -sim(_warp(mi, mg, lin(p)))
            loss.backward()
            opt.step()
            if it % 10 == 9:
                yield 10


class _Adam:
    """Adam (Kingma & Ba 2015) for a few tensors.

    ``torch.optim`` imports ``torch._dynamo`` on first use, which crashes when that first
    use is in a Qt worker thread; twenty lines of Adam avoid the import altogether.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params = list(params)
        self.lr = float(lr)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        self.t += 1
        c1 = 1 - self.b1 ** self.t
        c2 = 1 - self.b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                g = p.grad
                m.mul_(self.b1).add_(g, alpha=1 - self.b1)
                v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
                p.sub_(self.lr * (m / c1) / ((v / c2).sqrt() + self.eps))


def _cosine_lr(opt, base: float, it: int, n: int, floor: float = 0.001) -> None:
    """Anneal the step from ``base`` to ``floor * base`` over a level (cosine).

    Adam's steps stay near the learning rate however small the gradient, so without
    annealing the estimate keeps jittering by about one step around the optimum.
    """
    f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * it / max(n - 1, 1)))
    opt.lr = base * f


def _expv(v, grid_um: tuple[float, float], origin_um: tuple[float, float], steps: int = 6):
    """Scaling and squaring: displacement ``(1, 2, h, w)`` (µm) of ``exp(v)``."""
    import torch
    import torch.nn.functional as F

    u = v / (2 ** steps)
    h, w = v.shape[2:]
    for _ in range(steps):
        # sample u at p + u(p): in grid index units
        ir = torch.arange(h, dtype=v.dtype, device=v.device).view(h, 1).expand(h, w)
        ic = torch.arange(w, dtype=v.dtype, device=v.device).view(1, w).expand(h, w)
        qr = ir + u[0, 0] / grid_um[0]
        qc = ic + u[0, 1] / grid_um[1]
        g = torch.stack([(2 * qc + 1) / w - 1, (2 * qr + 1) / h - 1], -1)[None]
        u = u + F.grid_sample(u, g, mode="bilinear", padding_mode="border", align_corners=False)
    return u


def _disp_at(u, ugrid: _Grid, p):
    """Displacement ``u (1, 2, h, w)`` on ``ugrid`` at µm points ``p (H, W, 2)`` → ``(H, W, 2)``."""
    import torch
    import torch.nn.functional as F

    g = ugrid.um_to_norm(p, torch)[None]
    out = F.grid_sample(u, g, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].permute(1, 2, 0)


def _optimise_svf(fimg, fgrid: _Grid, mimg, mgrid: _Grid, weight, lin_L, lin_b,
                  config: RegistrationConfig):
    """Stationary velocity field (µm), coarse to fine; ``q = A(exp(v)(p))``.

    ``config.nonrigid_levels`` lists ``(pool, spacing, iterations, window)`` per level:
    images average-pooled by ``pool``, velocity nodes every ``spacing`` working pixels.
    The loss is ``-LNCC + smoothness * |∇v|²`` (gradient in node units, so the weight
    means the same at every spacing). A generator yielding after every 10 iterations;
    returns ``(v, grid)`` with ``v (1, 2, h, w)`` on ``grid``.
    """
    import torch
    import torch.nn.functional as F

    dev = fimg.device
    L = torch.tensor(lin_L, dtype=torch.float32, device=dev)
    b = torch.tensor(lin_b, dtype=torch.float32, device=dev)
    v = None
    vgrid = None
    for pool, spacing, iters, win in config.nonrigid_levels:
        fg, mg = fgrid.pooled(pool), mgrid.pooled(pool)
        fi = F.avg_pool2d(fimg, pool) if pool > 1 else fimg
        mi = _with_gradients(F.avg_pool2d(mimg, pool) if pool > 1 else mimg)
        wi = F.avg_pool2d(weight, pool) if pool > 1 else weight
        vg = fgrid.pooled(max(int(spacing), 1))
        px_um = (vg.ds[0] * vg.mpp, vg.ds[1] * vg.mpp)
        scale = torch.tensor(px_um, device=dev).view(1, 2, 1, 1)
        if v is None:
            v_param = torch.zeros(1, 2, *vg.shape, device=dev)
        else:
            with torch.no_grad():
                v_param = _disp_at(v, vgrid, vg.centres_um(torch, dev)).permute(2, 0, 1)[None] / scale
        v_param = v_param.contiguous().requires_grad_(True)
        opt = _Adam([v_param], lr=config.nonrigid_step)
        p = fg.centres_um(torch, dev)
        lncc = _Lncc(fi, int(win), wi)
        for it in range(int(iters)):
            _cosine_lr(opt, config.nonrigid_step, it, int(iters))
            opt.zero_grad()
            u = _expv(v_param * scale, px_um, (0, 0))
            q = (p + _disp_at(u, vg, p)) @ L.T + b
            sim = lncc(_warp(mi, mg, q))
            dr = v_param[:, :, 1:, :] - v_param[:, :, :-1, :]
            dc = v_param[:, :, :, 1:] - v_param[:, :, :, :-1]
            loss = -sim + config.smoothness * ((dr ** 2).mean() + (dc ** 2).mean())
            loss.backward()
            opt.step()
            if it % 10 == 9:
                yield 10
        v = (v_param * scale).detach()
        vgrid = vg
    return v, vgrid


# --------------------------------------------------------------------------------------
# The registration job
# --------------------------------------------------------------------------------------
def _working_grid(src: _Source, size: int, mpp_um: float) -> tuple[_Grid, tuple[int, int]]:
    h0, w0 = src.shape
    ds = max(1.0, max(h0, w0) / float(size))
    shape = (max(int(round(h0 / ds)), 1), max(int(round(w0 / ds)), 1))
    return _Grid(shape, (h0 / shape[0], w0 / shape[1]), mpp_um), shape


def _moving_grid(src: _Source, fixed_grid: _Grid, mpp_um: float) -> tuple[_Grid, tuple[int, int]]:
    """Moving working grid at the µm/px of the fixed one (never finer than level 0)."""
    um = fixed_grid.ds[0] * fixed_grid.mpp
    ds = max(1.0, um / mpp_um)
    h0, w0 = src.shape
    shape = (max(int(round(h0 / ds)), 1), max(int(round(w0 / ds)), 1))
    return _Grid(shape, (h0 / shape[0], w0 / shape[1]), mpp_um), shape


def register(fixed: Slide | np.ndarray | str | Path, moving: Slide | np.ndarray | str | Path,
             config: RegistrationConfig | None = None, *, fixed_mpp: float | None = None,
             moving_mpp: float | None = None,
             fixed_name: str | None = None, moving_name: str | None = None,
             ) -> Generator[Progress, None, Transform]:
    """Register ``moving`` onto ``fixed``; a progress generator returning a :class:`Transform`.

    Parameters
    ----------
    fixed, moving
        Slides (:class:`~napari_lnmeta.io.slide.Slide`), paths, or RGB arrays (then
        ``fixed_mpp``/``moving_mpp`` give their µm/px, if known).
    config
        :class:`RegistrationConfig`; the default is non-rigid.

    Returns
    -------
    Transform
        Level-0 ``(row, col)`` fixed ↔ moving, with ``metrics`` describing each stage.

    Raises
    ------
    InputError
        No tissue in either image, or a registration that fails its checks (best
        similarity below ``config.min_similarity``, tissue that does not overlap).
    """
    import torch

    cfg = config or RegistrationConfig()
    job = _register(fixed, moving, cfg, fixed_mpp=fixed_mpp, moving_mpp=moving_mpp,
                    fixed_name=fixed_name, moving_name=moving_name)
    before = torch.get_num_threads()
    try:
        while True:
            # threads are set around each step: the generator may be driven from a worker
            # thread and torch's setting is per process
            if cfg.threads:
                torch.set_num_threads(int(cfg.threads))
            try:
                step = next(job)
            except StopIteration as stop:
                return stop.value
            finally:
                if cfg.threads:
                    torch.set_num_threads(before)
            yield step
    finally:
        job.close()


def _register(fixed, moving, cfg: RegistrationConfig, *, fixed_mpp: float | None = None,
              moving_mpp: float | None = None, fixed_name: str | None = None,
              moving_name: str | None = None) -> Generator[Progress, None, Transform]:
    """The work behind :func:`register`."""
    import torch

    t_start = time.perf_counter()
    fsrc = _Source(fixed, fixed_mpp, fixed_name)
    msrc = _Source(moving, moving_mpp, moving_name)
    notes = []
    f_mpp, m_mpp = fsrc.mpp, msrc.mpp
    if f_mpp is None and m_mpp is None:
        f_mpp = m_mpp = 1.0
        notes.append("µm/px unknown for both images: pixel units, scale assumed equal")
    elif f_mpp is None or m_mpp is None:
        f_mpp = m_mpp = f_mpp or m_mpp
        notes.append("µm/px unknown for one image: assumed equal to the other's")
    device = _torch_device(cfg.device)
    n_lin = cfg.affine_iterations * 3 * 2
    n_nr = sum(lv[2] for lv in cfg.nonrigid_levels) if cfg.mode == "nonrigid" else 0
    total = 10 + n_lin + n_nr + 5
    done = 0
    yield Progress(done, total, "reading low-resolution images")

    # ---- prealignment ------------------------------------------------------------
    fg0, fshape0 = _working_grid(fsrc, cfg.prealign_size, f_mpp)
    mg0, mshape0 = _moving_grid(msrc, fg0, m_mpp)
    f_rgb0, m_rgb0 = fsrc.read(fshape0), msrc.read(mshape0)
    f_fg0, m_fg0 = foreground(f_rgb0), foreground(m_rgb0)
    for src, fgm in ((fsrc, f_fg0), (msrc, m_fg0)):
        if fgm.sum() < 0.002 * fgm.size or fgm.sum() < 20:
            raise InputError(f"{src.name}: no tissue found (nothing darker than glass at "
                             f"low resolution); cannot register")
    f_rep0 = representation(f_rgb0, cfg.representation) * f_fg0
    m_rep0 = representation(m_rgb0, cfg.representation) * m_fg0
    # moving px per fixed px at the prealign level (≈1: both are read at the same µm/px)
    scale = (fg0.ds[0] * fg0.mpp) / (mg0.ds[0] * mg0.mpp)
    done = 2
    yield Progress(done, total, "prealignment: searching rotations and flips")
    cands = _prealign(f_rep0.astype(np.float64), f_fg0, m_rep0.astype(np.float64), m_fg0,
                      scale, cfg)
    done = 10
    timings = {"prealign": round(time.perf_counter() - t_start, 2)}
    yield Progress(done, total, "prealignment done")

    def px_to_um(L_px, t_px):
        """Prealign pixel map → µm map ``q = L p + b`` (pixel centres, per-axis ds)."""
        Sf = np.diag([fg0.ds[0] * fg0.mpp, fg0.ds[1] * fg0.mpp])
        Sm = np.diag([mg0.ds[0] * mg0.mpp, mg0.ds[1] * mg0.mpp])
        of = np.array([(fg0.ds[0] - 1) / 2 * fg0.mpp, (fg0.ds[1] - 1) / 2 * fg0.mpp])
        om = np.array([(mg0.ds[0] - 1) / 2 * mg0.mpp, (mg0.ds[1] - 1) / 2 * mg0.mpp])
        # p_um = Sf p_px + of ; q_um = Sm q_px + om ; q_px = L p_px + t
        L = Sm @ L_px @ np.linalg.inv(Sf)
        b = Sm @ (t_px - L_px @ np.linalg.inv(Sf) @ of) + om
        return L, b

    # ---- rigid / affine at affine_size ----------------------------------------------
    fg1, fshape1 = _working_grid(fsrc, cfg.affine_size, f_mpp)
    mg1, mshape1 = _moving_grid(msrc, fg1, m_mpp)
    f_rgb1, m_rgb1 = fsrc.read(fshape1), msrc.read(mshape1)
    f_fg1, m_fg1 = foreground(f_rgb1), foreground(m_rgb1)
    f_rep1 = representation(f_rgb1, cfg.representation) * f_fg1
    m_rep1 = representation(m_rgb1, cfg.representation) * m_fg1
    fimg = torch.from_numpy(f_rep1)[None, None].to(device)
    mimg = torch.from_numpy(m_rep1)[None, None].to(device)
    weight = torch.from_numpy(_dilate(f_fg1, 3).astype(np.float32))[None, None].to(device)
    centre = np.array([fshape1[0] * fg1.ds[0] / 2, fshape1[1] * fg1.ds[1] / 2]) * f_mpp
    extent = max(fshape1[0] * fg1.ds[0], fshape1[1] * fg1.ds[1]) * f_mpp
    levels = 3
    win1 = max(cfg.lncc_window * 2 + 1, 15)

    best = None
    tries = _distinct_candidates(cands, cfg.candidates)
    n_try = len(tries)
    total += cfg.affine_iterations * 3 * (n_try - 1)
    for ci, cand in enumerate(tries):
        L0, b0 = px_to_um(cand["L"], cand["t"])
        # centred parametrisation: q = L0 (p - c) + c + t0 with t0 = L0 c + b0 - c
        t0 = L0 @ centre + b0 - centre
        lin = _Linear(L0, t0, centre, extent, rigid=True, device=device)
        for step in _optimise_linear(fimg, fg1, mimg, mg1, weight, lin,
                                     cfg.affine_iterations, levels, win1, 0.01,
                                     finest=n_try == 1 or cfg.mode == "rigid"):
            done += step
            yield Progress(done, total, f"rigid: candidate {ci + 1}/{n_try}")
        with torch.no_grad():
            s = _similarity(fimg, fg1, mimg, mg1, weight, lin, cfg.lncc_window)
        if best is None or s > best[0]:
            best = (s, lin, cand)
    sim_rigid, lin, cand = best
    L_um, b_um = lin.as_numpy()
    stage_metrics: dict[str, Any] = {
        "prealign": {"angle": cand["angle"], "flip": cand["flip"], "ncc": cand["score"]},
        "rigid": {"lncc": sim_rigid},
    }
    # The affine stage also runs in rigid mode: the failure check judges whether the two
    # images show the same tissue, which the most flexible linear fit answers best.
    t0 = L_um @ centre + b_um - centre
    lin_a = _Linear(L_um, t0, centre, extent, rigid=False, device=device)
    for step in _optimise_linear(fimg, fg1, mimg, mg1, weight, lin_a,
                                 cfg.affine_iterations, levels, win1, 0.005):
        done += step
        yield Progress(done, total, "affine")
    with torch.no_grad():
        s = _similarity(fimg, fg1, mimg, mg1, weight, lin_a, cfg.lncc_window)
    La, ba = lin_a.as_numpy()
    # an affine that shears or rescales by more than 1.5x is not a tissue section
    sv = np.linalg.svd(La @ np.linalg.inv(L_um), compute_uv=False)
    plausible = bool(s >= sim_rigid and sv.max() / sv.min() < 1.5)
    L_chk, b_chk = (La, ba) if plausible else (L_um, b_um)
    if cfg.mode != "rigid":
        L_um, b_um = L_chk, b_chk
        stage_metrics["affine"] = {"lncc": s, "kept": plausible}

    timings["linear"] = round(time.perf_counter() - t_start - sum(timings.values()), 2)

    # ---- failure checks on the linear result --------------------------------------------
    overlap = _tissue_overlap(f_fg1, fg1, m_fg1, mg1, L_chk, b_chk)
    with torch.no_grad():
        check = _check_similarity(f_rep1, fg1, m_rep1, mg1, weight, L_chk, b_chk, device)
    stage_metrics["tissue_overlap"] = overlap
    stage_metrics["check_lncc"] = check
    if check < cfg.min_similarity:
        raise InputError(
            f"registration of {msrc.name} onto {fsrc.name} failed: similarity {check:.2f} "
            f"is below {cfg.min_similarity} (different tissue, or too little in common)")
    if overlap < cfg.min_overlap:
        raise InputError(
            f"registration of {msrc.name} onto {fsrc.name} failed: only {100 * overlap:.0f}% "
            f"of the tissue overlaps after alignment (needs {100 * cfg.min_overlap:.0f}%)")

    # ---- non-rigid ---------------------------------------------------------------------
    fld = None
    if cfg.mode == "nonrigid":
        fg2, fshape2 = _working_grid(fsrc, cfg.nonrigid_size, f_mpp)
        mg2, mshape2 = _moving_grid(msrc, fg2, m_mpp)
        f_rgb2, m_rgb2 = fsrc.read(fshape2), msrc.read(mshape2)
        f_fg2, m_fg2 = foreground(f_rgb2), foreground(m_rgb2)
        fimg2 = _tensor(_smooth(representation(f_rgb2, cfg.representation) * f_fg2,
                                cfg.smoothing), device)
        mimg2 = _tensor(_smooth(representation(m_rgb2, cfg.representation) * m_fg2,
                                cfg.smoothing), device)
        weight2 = torch.from_numpy(_dilate(f_fg2, 5).astype(np.float32))[None, None].to(device)
        job = _optimise_svf(fimg2, fg2, mimg2, mg2, weight2, L_um, b_um, cfg)
        while True:
            try:
                step = next(job)
            except StopIteration as stop:
                v, vg = stop.value
                break
            done += step
            yield Progress(done, total, "non-rigid")
        with torch.no_grad():
            vpx = (vg.ds[0] * vg.mpp, vg.ds[1] * vg.mpp)
            u_c = _expv(v, vpx, (0, 0))
            # store on a grid 4x finer than the velocity nodes: the forward field is the
            # one optimised (bilinear between nodes), the inverse is solved on this grid
            sg = fg2.pooled(max(int(cfg.nonrigid_levels[-1][1]) // 4, 1))
            pts = sg.centres_um(torch, device)
            u_f = _disp_at(u_c, vg, pts).permute(2, 0, 1)[None]
            u_i0 = _disp_at(_expv(-v, vpx, (0, 0)), vg, pts).permute(2, 0, 1)[None]
            sim_lin2 = _similarity_field(fimg2, fg2, mimg2, mg2, weight2, L_um, b_um, None,
                                         sg, cfg.lncc_window)
            sim_nr = _similarity_field(fimg2, fg2, mimg2, mg2, weight2, L_um, b_um, u_f,
                                       sg, cfg.lncc_window)
            jac = _jacobian_min(u_f[0].cpu().numpy(), (sg.ds[0] * sg.mpp, sg.ds[1] * sg.mpp))
        stage_metrics["nonrigid"] = {"lncc_before": sim_lin2, "lncc": sim_nr,
                                     "min_jacobian": jac}
        if sim_nr > sim_lin2 and jac > 0:
            ufp = (u_f[0].cpu().numpy() / f_mpp).astype(np.float32)
            # exp(-v) is the inverse up to interpolation error; a few fixed-point steps on
            # the stored grid make the two fields agree to a small fraction of a pixel
            uip = invert_field(ufp, sg.ds, initial=u_i0[0].cpu().numpy() / f_mpp)
            origin = ((sg.ds[0] - 1) / 2, (sg.ds[1] - 1) / 2)
            fld = DisplacementField(origin, (sg.ds[0], sg.ds[1]), ufp, uip)
        else:
            notes.append("non-rigid step did not improve similarity; kept the affine result")

    # ---- assemble the level-0 pixel transform ------------------------------------------
    # q_um = L p_um + b, p_um = f_mpp p_px, q_px = q_um / m_mpp
    A = np.eye(3)
    A[:2, :2] = L_um * (f_mpp / m_mpp)
    A[:2, 2] = b_um / m_mpp
    timings["total"] = round(time.perf_counter() - t_start, 2)
    metrics = {"stages": stage_metrics, "similarity": check, "notes": notes,
               "timings": timings,
               "seconds": round(time.perf_counter() - t_start, 2),
               "config": asdict(cfg), "device": str(device)}
    yield Progress(total, total, "registration done")
    return Transform(A, fsrc.info(), msrc.info(), fld, cfg.mode, metrics)


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(img, sigma).astype(np.float32) if sigma > 0 else img


def _tensor(img: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None].to(device)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=r)


def _similarity(fimg, fg, mimg, mg, weight, lin, win) -> float:
    import torch

    p = fg.centres_um(torch, fimg.device)
    return float(_lncc(fimg, _warp(_with_gradients(mimg), mg, lin(p)), win, weight))


def _similarity_field(fimg, fg, mimg, mg, weight, L, b, u, ugrid, win) -> float:
    import torch

    p = fg.centres_um(torch, fimg.device)
    if u is not None:
        p = p + _disp_at(u, ugrid, p)
    Lt = torch.tensor(L, dtype=torch.float32, device=fimg.device)
    bt = torch.tensor(b, dtype=torch.float32, device=fimg.device)
    return float(_lncc(fimg, _warp(_with_gradients(mimg), mg, p @ Lt.T + bt), win, weight))


def _check_similarity(f_rep: np.ndarray, fg: _Grid, m_rep: np.ndarray, mg: _Grid, weight,
                      L, b, device) -> float:
    """The failure check: LNCC of the representations smoothed by 2 px, 31-px window.

    Measured at the affine stage's resolution: 0.16–0.27 for the four ANHIR H&E ↔ IHC
    pairs (consecutive sections), at most 0.105 for unrelated tissue (other slides,
    other halves of the same lung); see docs/registration.md.
    """
    fi = _tensor(_smooth(f_rep, 2.0), device)
    mi = _tensor(_smooth(m_rep, 2.0), device)
    return _similarity_field(fi, fg, mi, mg, weight, L, b, None, None, 31)


def _tissue_overlap(f_fg, fg: _Grid, m_fg, mg: _Grid, L, b) -> float:
    """Fraction of the smaller tissue area that overlaps the other after the linear map."""
    import torch

    p = fg.centres_um(torch, "cpu").double().numpy()
    q = p @ L.T + b
    ir = (q[..., 0] / mg.mpp - (mg.ds[0] - 1) / 2) / mg.ds[0]
    ic = (q[..., 1] / mg.mpp - (mg.ds[1] - 1) / 2) / mg.ds[1]
    ir_i, ic_i = np.rint(ir).astype(int), np.rint(ic).astype(int)
    inside = (ir_i >= 0) & (ir_i < m_fg.shape[0]) & (ic_i >= 0) & (ic_i < m_fg.shape[1])
    warped = np.zeros_like(f_fg)
    warped[inside] = m_fg[ir_i[inside], ic_i[inside]]
    inter = float((warped & f_fg).sum())
    # moving tissue area in fixed pixels
    area_m = m_fg.sum() * (mg.ds[0] * mg.ds[1] * mg.mpp ** 2) / (fg.ds[0] * fg.ds[1] * fg.mpp ** 2)
    area_m /= abs(np.linalg.det(L)) if abs(np.linalg.det(L)) > 0 else 1.0
    smaller = max(min(float(f_fg.sum()), float(area_m)), 1.0)
    return inter / smaller


def _jacobian_min(u: np.ndarray, spacing: tuple[float, float]) -> float:
    """Smallest Jacobian determinant of ``p -> p + u(p)`` (``u (2, h, w)`` in µm)."""
    if min(u.shape[1:]) < 2:
        return 1.0
    dr = np.gradient(u[0], spacing[0], spacing[1])
    dc = np.gradient(u[1], spacing[0], spacing[1])
    det = (1 + dr[0]) * (1 + dc[1]) - dr[1] * dc[0]
    return float(det.min())


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


__all__ = ["MODES", "DisplacementField", "RegistrationConfig", "SlideInfo", "Transform",
           "affine_from_points", "array_slide", "foreground", "invert_field", "read_mapped",
           "register", "representation", "sample_image", "warped_pyramid"]
