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

One subject per module: :mod:`.config` (:class:`RegistrationConfig`), :mod:`.transform`
(:class:`Transform` and its file I/O, landmark affines), :mod:`.warp` (images through a
transform), :mod:`.inputs` (sources, representation, foreground), :mod:`.prealign`,
:mod:`.optimise` (the torch stages), :mod:`.run` (:func:`register_job`), :mod:`.checks` and
:mod:`.views` (checkerboard / difference images for judging a result by eye).
Import from the package.
"""

from .config import (
    MODES,
    RegistrationConfig,
)
from .inputs import (
    foreground,
    representation,
)
from .run import (
    register_job,
)
from .transform import (
    FORMAT,
    FORMAT_VERSION,
    DisplacementField,
    SlideInfo,
    Transform,
    affine_from_points,
    invert_field,
)
from .views import (
    VIEWS,
    RegistrationCheck,
    check_png,
    registration_check_job,
)
from .warp import (
    read_mapped,
    sample_image,
    warped_pyramid,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MODES",
    "VIEWS",
    "DisplacementField",
    "RegistrationCheck",
    "RegistrationConfig",
    "SlideInfo",
    "Transform",
    "affine_from_points",
    "check_png",
    "foreground",
    "invert_field",
    "read_mapped",
    "register_job",
    "registration_check_job",
    "representation",
    "sample_image",
    "warped_pyramid",
]
