"""Stain tools: optical density, colour deconvolution (H, E, DAB) and normalisation.

* :func:`deconvolve` with Ruifrok & Johnston's vectors (:data:`RUIFROK_HED`, identical
  to :func:`skimage.color.rgb2hed`) or with vectors estimated from the slide
  (:func:`estimate_stains`: Macenko or Vahadane);
* normalisation by Macenko, Vahadane or Reinhard, fitted on tissue pixels only
  (optical density >= ``beta`` in every channel), as a reusable :class:`StainTarget`
  saved/loaded as JSON; :func:`normalise` and :class:`StainNormaliser` in numpy;
* :class:`TorchStainNormaliser`, the same maps on ``(B, H, W, 3)`` batches on a device
  (torch is imported only when it is built).

Blank or background-only tiles are returned unchanged: nothing here produces NaN/inf.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.stain_target import NORMALISERS, StainTarget

if TYPE_CHECKING:
    from ..io.slide import Slide

#: Ruifrok & Johnston (2001) stain vectors, rows = H, E, DAB in OD space
#: (the same numbers as scikit-image's ``hed_from_rgb`` inverse).
RUIFROK_HED = np.array([[0.65, 0.70, 0.29],
                        [0.07, 0.99, 0.11],
                        [0.27, 0.57, 0.78]], dtype=np.float64)


def rgb_to_od(rgb: np.ndarray, *, background: float = 255.0) -> np.ndarray:
    """Optical density ``-log(I / I0)`` per channel; never inf (intensities clipped to >= 1)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return -np.log(np.maximum(rgb, 1.0) / background)


def normalise_stains(stains: np.ndarray) -> np.ndarray:
    """Unit-length rows; a missing third vector is completed by the cross product."""
    stains = np.asarray(stains, dtype=np.float64)
    if stains.shape == (2, 3):
        stains = np.vstack([stains, np.cross(stains[0], stains[1])])
    norms = np.linalg.norm(stains, axis=1, keepdims=True)
    return stains / np.where(norms == 0, 1, norms)


def deconvolve(rgb: np.ndarray, stains: np.ndarray = RUIFROK_HED) -> np.ndarray:
    """Stain concentrations ``(..., 3)`` (H, E, DAB for the default vectors).

    Matches :func:`skimage.color.rgb2hed` when given its vectors: skimage uses
    ``-log(max(I, 1e-6)) / log(1e-6)`` on ``I`` in [0, 1]; we reproduce that scaling so
    values are comparable with skimage's, and clip negatives exactly as it does.
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB (..., 3), got shape {rgb.shape}")
    stains = np.asarray(stains, dtype=np.float64)
    # Used as given (skimage does not normalise Ruifrok's rows); 2 vectors get a third.
    inv = np.linalg.inv(stains if stains.shape == (3, 3) else normalise_stains(stains))
    img = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    img = np.maximum(img, 1e-6)
    log_adjust = np.log(1e-6)
    stains_conc = (np.log(img) / log_adjust) @ inv
    return np.maximum(stains_conc, 0)


# ------------------------------------------------------------------------------------------
# Stain vectors estimated from the image (Macenko, Vahadane)
# ------------------------------------------------------------------------------------------
#: fewer tissue pixels than this: the tile is returned unchanged by the normalisers
MIN_TISSUE_PIXELS = 64


def optical_density(rgb: np.ndarray, *, io: float = 240.0) -> np.ndarray:
    """``-log((I + 1) / Io)`` per channel (Macenko's convention; ``Io`` = bright light)."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / io)


def tissue_pixels(od: np.ndarray, *, beta: float = 0.15) -> np.ndarray:
    """Pixels whose optical density is at least ``beta`` in every channel (not background)."""
    return np.all(np.asarray(od) >= beta, axis=-1)


def _order_he(stains: np.ndarray) -> np.ndarray:
    # haematoxylin absorbs more red than eosin: it has the larger first (R) OD component
    return stains if stains[0, 0] >= stains[1, 0] else stains[::-1].copy()


def macenko_stains(od_tissue: np.ndarray, *, alpha: float = 1.0) -> np.ndarray:
    """H and E unit vectors (rows) from tissue optical densities, Macenko et al. 2009.

    The OD cloud is projected on the plane of its two main eigenvectors; the stains are
    the directions at the ``alpha`` and ``100 - alpha`` percentiles of the angle.
    """
    od = np.asarray(od_tissue, dtype=np.float64).reshape(-1, 3)
    if len(od) < 3:
        raise ValueError("not enough tissue pixels to estimate stain vectors")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    # sign convention: both plane vectors point into the positive OD octant (the angles
    # then never wrap around ±pi for H&E, so the percentiles are well defined)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2])
    stains /= np.maximum(np.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
    return _order_he(stains)


#: L1 weight of the Vahadane factorisation (see :func:`vahadane_stains`)
VAHADANE_LAMBDA = 0.02


def vahadane_stains(od_tissue: np.ndarray, *, lam: float = VAHADANE_LAMBDA, n_iter: int = 300,
                    max_pixels: int = 20_000, init: np.ndarray | None = None,
                    seed: int = 0) -> np.ndarray:
    """H and E unit vectors by sparse non-negative matrix factorisation (Vahadane 2016).

    Minimises ``0.5 * ||V - W D||^2 + lam * |W|_1`` with ``W, D >= 0`` and unit rows of
    ``D`` by multiplicative updates (no SPAMS), starting from Macenko's vectors. ``V`` is
    a random subsample of at most ``max_pixels`` tissue OD rows.

    ``lam`` defaults to 0.02, below the 0.1 of SPAMS-based implementations: these
    updates run to convergence, and at 0.1 the L1 term pulls haematoxylin towards pure
    red on lightly stained tiles (cosine 0.90 to Macenko's vector on CMU-1; 0.99 at 0.02).
    """
    v = np.asarray(od_tissue, dtype=np.float64).reshape(-1, 3)
    if len(v) < 3:
        raise ValueError("not enough tissue pixels to estimate stain vectors")
    if len(v) > max_pixels:
        v = v[np.random.default_rng(seed).choice(len(v), max_pixels, replace=False)]
    v = np.maximum(v, 0.0)
    d = macenko_stains(v) if init is None else np.asarray(init, dtype=np.float64)
    d = np.maximum(d, 1e-3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    w = np.maximum(np.linalg.lstsq(d.T, v.T, rcond=None)[0].T, 1e-3)
    eps = 1e-10
    for _ in range(n_iter):
        w *= (v @ d.T) / (w @ (d @ d.T) + lam + eps)
        d *= (w.T @ v) / ((w.T @ w) @ d + eps)
        n = np.maximum(np.linalg.norm(d, axis=1, keepdims=True), eps)
        d /= n
        w *= n.T
    return _order_he(d)


def concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations ``(..., 2)`` of OD ``(..., 3)`` for 2 stain rows."""
    od = np.asarray(od, dtype=np.float64)
    flat = od.reshape(-1, 3)
    c = np.linalg.lstsq(np.asarray(stains, dtype=np.float64).T, flat.T, rcond=None)[0].T
    return c.reshape(od.shape[:-1] + (2,))


def estimate_stains(rgb: np.ndarray, *, method: str = "macenko", io: float = 240.0,
                    beta: float = 0.15, alpha: float = 1.0,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """A ``(3, 3)`` H, E, residual stain matrix estimated from an H&E image.

    Usable with :func:`deconvolve` in place of :data:`RUIFROK_HED`; the third row is the
    unit cross product of H and E.

    Raises
    ------
    InputError
        Too few tissue pixels (blank image).
    """
    from ..errors import InputError

    od = optical_density(rgb, io=io).reshape(-1, 3)
    keep = tissue_pixels(od, beta=beta)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool).reshape(-1)
    if keep.sum() < MIN_TISSUE_PIXELS:
        raise InputError(f"only {int(keep.sum())} tissue pixels (OD >= {beta} in every channel): "
                         "cannot estimate stain vectors")
    he = vahadane_stains(od[keep]) if method == "vahadane" else macenko_stains(od[keep],
                                                                               alpha=alpha)
    return normalise_stains(he)


# ------------------------------------------------------------------------------------------
# Fitted targets and normalisation (numpy)
# ------------------------------------------------------------------------------------------
def _lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, dtype=np.uint8))


def _he_stats(rgb: np.ndarray, method: str, *, io: float, alpha: float, beta: float,
              mask: np.ndarray | None, conc_pixels: str):
    """(stains, concentrations of all pixels, 99th-percentile concentrations, n tissue)."""
    od = optical_density(rgb, io=io).reshape(-1, 3)
    keep = tissue_pixels(od, beta=beta)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool).reshape(-1)
    n = int(keep.sum())
    if n < MIN_TISSUE_PIXELS:
        return None, None, None, n
    he = (macenko_stains(od[keep], alpha=alpha) if method == "macenko"
          else vahadane_stains(od[keep]))
    c = concentrations(od, he)
    ref = c if conc_pixels == "all" else c[keep]
    max_c = np.maximum(np.percentile(ref, 99, axis=0), 1e-6)
    return he, c, max_c, n


def fit_target(rgb: np.ndarray, method: str = "macenko", *, mask: np.ndarray | None = None,
               io: float = 240.0, alpha: float = 1.0, beta: float = 0.15,
               conc_pixels: str = "tissue", source: str | None = None) -> StainTarget:
    """Fit a normalisation target on the tissue pixels of a reference image.

    Parameters
    ----------
    rgb
        ``(..., 3)`` uint8 reference (a tile, or a mosaic of tiles from a slide).
    method
        ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
    mask
        Optional extra restriction (bool, same leading shape); tissue pixels are always
        those with OD >= ``beta`` in every channel.
    io, alpha, beta
        Macenko's light intensity, angle percentile and background OD cut.
    conc_pixels
        ``"tissue"`` (default): the 99th-percentile concentrations come from tissue
        pixels; ``"all"``: from every pixel, as torchstain does.

    Raises
    ------
    InputError
        The reference has too few tissue pixels.
    """
    from ..errors import InputError

    if method not in NORMALISERS:
        raise InputError(f"unknown stain normalisation {method!r} "
                         f"(choose from {', '.join(NORMALISERS)})")
    rgb = _as_rgb(rgb)
    if method == "reinhard":
        od = optical_density(rgb, io=io).reshape(-1, 3)
        keep = tissue_pixels(od, beta=beta)
        if mask is not None:
            keep &= np.asarray(mask, dtype=bool).reshape(-1)
        n = int(keep.sum())
        if n < MIN_TISSUE_PIXELS:
            raise InputError(f"the reference has only {n} tissue pixels: cannot fit a target")
        lab = _lab(rgb).reshape(-1, 3)[keep]
        return StainTarget(method=method, lab_mean=lab.mean(axis=0), lab_std=lab.std(axis=0),
                           io=io, alpha=alpha, beta=beta, source=source, n_pixels=n)
    he, _, max_c, n = _he_stats(rgb, method, io=io, alpha=alpha, beta=beta, mask=mask,
                                conc_pixels=conc_pixels)
    if he is None:
        raise InputError(f"the reference has only {n} tissue pixels: cannot fit a target")
    return StainTarget(method=method, stains=he, max_conc=max_c, io=io, alpha=alpha, beta=beta,
                       source=source, n_pixels=n)


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim < 2 or rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB (..., 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return rgb


def normalise(rgb: np.ndarray, target: StainTarget, *, mask: np.ndarray | None = None,
              conc_pixels: str = "tissue") -> np.ndarray:
    """Map ``rgb`` onto ``target``'s stain appearance (same shape, uint8).

    Statistics of the image are taken on its tissue pixels only; an image with fewer
    than :data:`MIN_TISSUE_PIXELS` of them (blank, background) is returned unchanged, so
    the output is never NaN or inf.
    """
    rgb = _as_rgb(rgb)
    shape = rgb.shape
    if target.method == "reinhard":
        od = optical_density(rgb, io=target.io).reshape(-1, 3)
        keep = tissue_pixels(od, beta=target.beta)
        if mask is not None:
            keep &= np.asarray(mask, dtype=bool).reshape(-1)
        if keep.sum() < MIN_TISSUE_PIXELS:
            return rgb.copy()
        from skimage.color import lab2rgb

        lab = _lab(rgb).reshape(-1, 3)
        mu, sd = lab[keep].mean(axis=0), np.maximum(lab[keep].std(axis=0), 1e-6)
        out = (lab - mu) / sd * target.lab_std + target.lab_mean
        out = lab2rgb(out.reshape(shape))
        return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    he, c, max_c, _ = _he_stats(rgb, target.method, io=target.io, alpha=target.alpha,
                                beta=target.beta, mask=mask, conc_pixels=conc_pixels)
    if he is None:
        return rgb.copy()
    c = c * (target.max_conc / max_c)
    # exponent capped: anything above log(256 / io) is white anyway (and exp would overflow)
    out = target.io * np.exp(np.minimum(-(c @ target.stains), 10.0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape)


class StainNormaliser:
    """Fit once, apply many times (numpy); ``save``/``load`` the fitted target as JSON.

    Parameters
    ----------
    method
        ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
    target
        An already fitted :class:`StainTarget` (e.g. :meth:`StainTarget.load`).
    """

    def __init__(self, method: str = "macenko", target: StainTarget | None = None, **params):
        self.method = target.method if target is not None else method
        if self.method not in NORMALISERS:
            raise ValueError(f"unknown stain normalisation {self.method!r}")
        self.target = target
        self.params = params

    def fit(self, rgb: np.ndarray, *, mask: np.ndarray | None = None,
            source: str | None = None) -> StainNormaliser:
        self.target = fit_target(rgb, self.method, mask=mask, source=source, **self.params)
        return self

    def transform(self, rgb: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
        if self.target is None:
            raise RuntimeError("fit the normaliser (or give a target) first")
        return normalise(rgb, self.target, mask=mask)

    __call__ = transform

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        if self.target is None:
            raise RuntimeError("nothing fitted to save")
        return self.target.save(path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> StainNormaliser:
        return cls(target=StainTarget.load(path))


def reference_mosaic(slide: Slide, *, tissue: Any = None, n_patches: int = 32,
                     patch_size: int = 256, mpp: float | None = None, seed: int = 0) -> np.ndarray:
    """A ``(n * S, S, 3)`` stack of random tissue patches of a slide, to fit a target on.

    Patches are read at ``mpp`` (default: 1 µm/px when the slide is finer, else level 0)
    from the patches of a tissue grid that are at least 80 % tissue.
    """
    from ..errors import InputError
    from .tiling import make_grid, read_patches
    from .tissue import tissue_mask

    if tissue is None:
        tissue = tissue_mask(slide)
    if mpp is None and slide.mpp is not None and slide.mpp < 1.0:
        mpp = 1.0
    grid = make_grid(slide, patch_size=patch_size, mpp=mpp, tissue=tissue, min_tissue=0.8)
    if len(grid) == 0:
        grid = make_grid(slide, patch_size=patch_size, mpp=mpp, tissue=tissue, min_tissue=0.2)
    if len(grid) == 0:
        raise InputError(f"{slide.name}: no tissue patch of {patch_size} px to fit a stain target")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(grid), min(n_patches, len(grid)), replace=False))
    return read_patches(slide, grid, idx).reshape(-1, patch_size, 3)


def fit_slide_target(slide: Slide, method: str = "macenko", *, tissue: Any = None,
                     n_patches: int = 32, patch_size: int = 256, mpp: float | None = None,
                     seed: int = 0, **params) -> StainTarget:
    """Fit a target on random tissue patches of a slide (see :func:`reference_mosaic`)."""
    mosaic = reference_mosaic(slide, tissue=tissue, n_patches=n_patches, patch_size=patch_size,
                              mpp=mpp, seed=seed)
    return fit_target(mosaic, method, source=slide.name, **params)


# ------------------------------------------------------------------------------------------
# Torch: the same normalisers on batches, on a device
# ------------------------------------------------------------------------------------------
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]])
_D65 = np.array([0.95047, 1.0, 1.08883])


class TorchStainNormaliser:
    """Apply a fitted :class:`StainTarget` to ``(B, H, W, 3)`` uint8 batches with torch.

    Each image of the batch gets its own statistics (tissue pixels only), as
    :func:`normalise` does; images with too few tissue pixels come back unchanged.
    Runs on any torch device; everything is batched (no Python loop over images).

    Parameters
    ----------
    target
        The fitted target.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``...
    dtype
        Compute precision (``torch.float32`` by default).
    vahadane_iter, max_fit_pixels
        Vahadane only: multiplicative-update iterations, and pixels per image (a regular
        subsample) used to learn the image's stain vectors.
    """

    def __init__(self, target: StainTarget, device: Any = "cpu", *, dtype: Any = None,
                 conc_pixels: str = "tissue", vahadane_iter: int = 300,
                 max_fit_pixels: int = 8192):
        import torch

        self.target = target
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.conc_pixels = conc_pixels
        self.vahadane_iter = int(vahadane_iter)
        self.max_fit_pixels = int(max_fit_pixels)

        def t(a):
            return None if a is None else torch.as_tensor(np.asarray(a), dtype=self.dtype,
                                                          device=self.device)

        self._stains = t(target.stains)
        self._max_conc = t(target.max_conc)
        self._lab_mean = t(target.lab_mean)
        self._lab_std = t(target.lab_std)
        self._xyz = t(_XYZ_FROM_RGB)
        self._rgb = t(np.linalg.inv(_XYZ_FROM_RGB))
        self._white = t(_D65)

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _percentiles(vals, mask, qs: tuple[float, ...]):
        """Per-row percentiles ``qs`` of ``vals[mask]`` (linear, like numpy): ``(len(qs), ...)``.

        One sort per call (masked values sort last as +inf), shared by all ``qs``.
        """
        import torch

        lead = vals.shape[:-1]
        v2 = vals.reshape(-1, vals.shape[-1])
        m2 = mask.reshape(-1, mask.shape[-1])
        k = m2.sum(dim=-1).clamp(min=1)
        out = torch.empty((len(qs), v2.shape[0]), dtype=vals.dtype, device=vals.device)
        v = torch.where(m2, v2, torch.full_like(v2, float("inf")))
        srt = torch.sort(v, dim=-1).values
        for i, q in enumerate(qs):
            pos = (q / 100.0) * (k - 1).to(vals.dtype)
            lo = pos.floor().long().clamp(min=0)
            hi = torch.minimum(lo + 1, k - 1)
            frac = pos - lo.to(vals.dtype)
            a = srt.gather(-1, lo[:, None])[:, 0]
            b = srt.gather(-1, hi[:, None])[:, 0]
            out[i] = a + (b - a) * frac
        return out.reshape((len(qs), *lead))

    def _macenko(self, od, m, valid):
        import torch

        alpha = self.target.alpha
        mf = m.to(od.dtype)[..., None]
        kk = m.sum(dim=1).clamp(min=2).to(od.dtype)
        mu = (od * mf).sum(dim=1) / kk[:, None]
        d = (od - mu[:, None]) * mf
        cov = d.transpose(1, 2) @ d / (kk - 1)[:, None, None]
        eye = torch.eye(3, dtype=od.dtype, device=od.device).expand_as(cov)
        cov = torch.where(valid[:, None, None], cov, eye)
        _, vecs = torch.linalg.eigh(cov)
        plane = vecs[..., 1:3]
        plane = plane * torch.where(plane.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
        proj = od @ plane
        phi = torch.atan2(proj[..., 1], proj[..., 0])
        lo, hi = self._percentiles(phi, m, (alpha, 100 - alpha))
        v1 = (plane @ torch.stack([lo.cos(), lo.sin()], dim=-1)[..., None])[..., 0]
        v2 = (plane @ torch.stack([hi.cos(), hi.sin()], dim=-1)[..., None])[..., 0]
        he = torch.stack([v1, v2], dim=1)
        he = he / he.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        swap = he[:, 0, 0] < he[:, 1, 0]
        return torch.where(swap[:, None, None], he.flip(1), he)

    def _vahadane(self, od, m, valid):
        import torch

        d = self._macenko(od, m, valid).clamp(min=1e-3)
        d = d / d.norm(dim=-1, keepdim=True)
        step = max(1, od.shape[1] // self.max_fit_pixels)
        v = (od[:, ::step] * m[:, ::step, None].to(od.dtype)).clamp(min=0)
        gram = d @ d.transpose(1, 2) + 1e-6 * torch.eye(2, dtype=od.dtype, device=od.device)
        w = (v @ d.transpose(1, 2) @ torch.linalg.inv(gram)).clamp(min=1e-3)
        w = w * m[:, ::step, None].to(od.dtype)
        lam, eps = VAHADANE_LAMBDA, 1e-10
        for _ in range(self.vahadane_iter):
            w = w * (v @ d.transpose(1, 2)) / (w @ (d @ d.transpose(1, 2)) + lam + eps)
            d = d * (w.transpose(1, 2) @ v) / ((w.transpose(1, 2) @ w) @ d + eps)
            n = d.norm(dim=-1, keepdim=True).clamp(min=eps)
            d = d / n
            w = w * n.transpose(1, 2)
        swap = d[:, 0, 0] < d[:, 1, 0]
        return torch.where(swap[:, None, None], d.flip(1), d)

    def _rgb2lab(self, x):
        import torch

        x = torch.where(x > 0.04045, ((x + 0.055) / 1.055).clamp(min=0) ** 2.4, x / 12.92)
        xyz = (x @ self._xyz.T) / self._white
        f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1.0 / 3.0), 7.787 * xyz + 16 / 116)
        fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
        return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-1)

    def _lab2rgb(self, lab):
        import torch

        fy = (lab[..., 0] + 16) / 116
        fx = lab[..., 1] / 500 + fy
        fz = (fy - lab[..., 2] / 200).clamp(min=0)
        f = torch.stack([fx, fy, fz], dim=-1)
        xyz = torch.where(f > 0.2068966, f ** 3, (f - 16 / 116) / 7.787) * self._white
        rgb = xyz @ self._rgb.T
        rgb = torch.where(rgb > 0.0031308, 1.055 * rgb.clamp(min=0) ** (1 / 2.4) - 0.055,
                          12.92 * rgb)
        return rgb.clamp(0, 1)

    # -- call ----------------------------------------------------------------------------
    def _apply(self, xf):
        """``(B, N, 3)`` float intensities in [0, 255] -> normalised, same shape (float)."""
        import torch

        tg = self.target
        od = -torch.log((xf + 1.0) / tg.io)
        m = (od >= tg.beta).all(dim=-1)
        valid = m.sum(dim=1) >= MIN_TISSUE_PIXELS
        if tg.method == "reinhard":
            lab = self._rgb2lab(xf / 255.0)
            mf = m.to(xf.dtype)[..., None]
            k = mf.sum(dim=1).clamp(min=1)
            mu = (lab * mf).sum(dim=1) / k
            sd = (((lab - mu[:, None]) ** 2 * mf).sum(dim=1) / k).sqrt().clamp(min=1e-6)
            lab = (lab - mu[:, None]) / sd[:, None] * self._lab_std + self._lab_mean
            out = self._lab2rgb(lab) * 255.0
        else:
            he = self._vahadane(od, m, valid) if tg.method == "vahadane" else \
                self._macenko(od, m, valid)
            gram = he @ he.transpose(1, 2)
            eye = torch.eye(2, dtype=xf.dtype, device=xf.device).expand_as(gram)
            gram = torch.where(valid[:, None, None], gram, eye)
            c = od @ he.transpose(1, 2) @ torch.linalg.inv(gram)
            cm = torch.ones_like(m) if self.conc_pixels == "all" else m
            cm2 = cm[:, None, :].expand(-1, 2, -1)
            max_c = self._percentiles(c.transpose(1, 2), cm2, (99.0,))[0]
            c = c * (self._max_conc / max_c.clamp(min=1e-6))[:, None]
            out = tg.io * torch.exp((-(c @ self._stains)).clamp(max=10.0))
        out = out.clamp(0, 255)
        return torch.where(valid[:, None, None], out, xf)

    def __call__(self, batch: Any, *, channels_last: bool = True):
        """Normalise a batch; returns a uint8 tensor on the device, in the input's layout.

        ``batch`` is a numpy array or tensor, ``(B, H, W, 3)`` (or ``(B, 3, H, W)`` with
        ``channels_last=False``), uint8 or float in [0, 255].
        """
        import torch

        x = torch.as_tensor(batch).to(self.device)
        if x.ndim == 3:
            x = x[None]
        if not channels_last:
            x = x.permute(0, 2, 3, 1)
        b, h, w, _ = x.shape
        out = self._apply(x.reshape(b, h * w, 3).to(self.dtype))
        out = out.round().to(torch.uint8).reshape(b, h, w, 3)
        if not channels_last:
            out = out.permute(0, 3, 1, 2)
        return out

    def normalise_float(self, x):
        """Float NCHW batches in [0, 1] -> normalised float NCHW in [0, 1] (same dtype).

        For model pipelines that already converted uint8 to float on the device.
        """
        b, _, h, w = x.shape
        xf = (x.permute(0, 2, 3, 1).reshape(b, h * w, 3) * 255.0).to(self.dtype)
        out = self._apply(xf) / 255.0
        return out.reshape(b, h, w, 3).permute(0, 3, 1, 2).to(x.dtype)


def torch_normaliser(normalisation: dict[str, Any] | StainTarget, *, device: Any = "cpu",
                     **kwargs) -> Any:
    """A callable normalising float NCHW batches in [0, 1] on ``device``.

    ``normalisation`` is a model's ``{"method": ..., "target": {...}}`` (the target as
    :meth:`StainTarget.to_json` writes it; Macenko's reference when it is missing), or a
    :class:`StainTarget`.
    """
    if isinstance(normalisation, StainTarget):
        target = normalisation
    else:
        method = normalisation.get("method", "macenko")
        td = normalisation.get("target")
        if td:
            target = StainTarget.from_json({"method": method, **td})
        else:
            target = StainTarget.default(method)
    return TorchStainNormaliser(target, device=device, **kwargs).normalise_float
