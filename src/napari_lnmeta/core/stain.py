"""Stain tools: optical density and colour deconvolution (H, E, DAB).

Normalisers (Macenko, Vahadane, Reinhard) build on these functions.
"""

from __future__ import annotations

import numpy as np

#: Ruifrok & Johnston (2001) stain vectors, rows = H, E, DAB in OD space
#: (the same numbers as scikit-image's ``hed_from_rgb`` inverse).
RUIFROK_HED = np.array([[0.65, 0.70, 0.29],
                        [0.07, 0.99, 0.11],
                        [0.27, 0.57, 0.78]], dtype=np.float64)


def rgb_to_od(rgb: np.ndarray, *, background: float = 255.0) -> np.ndarray:
    """Optical density ``-log(I / I0)`` per channel; never inf (intensities clipped to >= 1)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return -np.log(np.maximum(rgb, 1.0) / background)


def od_to_rgb(od: np.ndarray, *, background: float = 255.0) -> np.ndarray:
    return np.clip(background * np.exp(-od), 0, 255).astype(np.uint8)


def normalize_stains(stains: np.ndarray) -> np.ndarray:
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
    inv = np.linalg.inv(stains if stains.shape == (3, 3) else normalize_stains(stains))
    img = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    img = np.maximum(img, 1e-6)
    log_adjust = np.log(1e-6)
    stains_conc = (np.log(img) / log_adjust) @ inv
    return np.maximum(stains_conc, 0)
