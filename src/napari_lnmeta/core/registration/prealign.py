"""Prealignment: masked normalised cross-correlation over all shifts (FFT) for every
rotation, with and without a mirror flip.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import RegistrationConfig

if TYPE_CHECKING:

    pass

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
