"""Checks of a registration result: similarity after each stage, tissue overlap and the
fold-free (positive Jacobian) displacement field, so that a failed registration is an
error rather than a mask in the wrong place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .optimise import _disp_at, _Grid, _lncc, _warp, _with_gradients

if TYPE_CHECKING:

    pass

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
