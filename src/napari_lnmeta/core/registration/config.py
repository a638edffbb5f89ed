"""Parameters of a registration (:class:`RegistrationConfig`) and its modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import InputError

if TYPE_CHECKING:

    pass

MODES = ("rigid", "affine", "nonrigid")


# --------------------------------------------------------------------------------------
# Configuration and slide descriptions
# --------------------------------------------------------------------------------------
@dataclass
class RegistrationConfig:
    """Parameters of :func:`register_job` (defaults suit H&E ↔ IHC consecutive sections).

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
