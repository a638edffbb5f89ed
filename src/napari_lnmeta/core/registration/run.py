"""The registration job: :func:`register_job` (a progress generator) and the stages it runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InputError
from ...progress import Progress, relay
from .checks import (
    _check_similarity,
    _dilate,
    _jacobian_min,
    _similarity,
    _similarity_field,
    _smooth,
    _tensor,
    _tissue_overlap,
)
from .config import RegistrationConfig
from .inputs import _Source, foreground, representation
from .optimise import (
    _disp_at,
    _expv,
    _Grid,
    _Linear,
    _optimise_linear,
    _optimise_svf,
)
from .prealign import _distinct_candidates, _prealign
from .transform import DisplacementField, Transform, invert_field

if TYPE_CHECKING:
    from collections.abc import Generator

    from ...io.slide import Slide

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


def register_job(fixed: Slide | np.ndarray | str | Path,
                 moving: Slide | np.ndarray | str | Path,
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
    """The work behind :func:`register_job`."""
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
    from ...models.io import resolve_device

    device = resolve_device(cfg.device)
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
        steps = [done]

        def nonrigid(step: int) -> Progress:
            steps[0] += step
            return Progress(steps[0], total, "non-rigid")

        v, vg = yield from relay(job, nonrigid)
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
