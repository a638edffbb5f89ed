"""Names of the training options (optimisers, schedulers, augmentation presets).

Kept free of torch so that the ``lnmeta`` parsers can offer them as choices without
importing the training stack; ``loop``, ``augment`` and ``spatial`` re-export them.
"""

from __future__ import annotations

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine", "onecycle", "plateau", "cosine_restarts")
AUGMENT_PRESETS = ("none", "flips", "photometric", "policy-trivialaugment",
                   "policy-autoaugment", "policy-randaugment", "policy-augmix",
                   "dihedral-jitter", "stain")
SPATIAL_AUGMENTS = ("none", "flips", "dihedral-jitter")
#: earlier names of the presets (the seed that describes them), still accepted
AUGMENT_ALIASES = {"seed000": "photometric", "seed003": "policy-trivialaugment",
                   **{f"seed003-{p}": f"policy-{p}"
                      for p in ("autoaugment", "randaugment", "augmix", "trivialaugment")},
                   "seed004": "dihedral-jitter"}


def augment_name(name: str | None) -> str:
    """A preset's name, an earlier name (``seed000`` ...) read as the current one."""
    name = (name or "none").lower()
    return AUGMENT_ALIASES.get(name, name)
