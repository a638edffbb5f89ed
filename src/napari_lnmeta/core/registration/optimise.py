"""The torch optimiser stack: sampling grids, warping, LNCC, the linear (rigid/affine)
stage and the stationary-velocity-field (non-rigid) stage, coarse to fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import RegistrationConfig

if TYPE_CHECKING:

    pass

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
