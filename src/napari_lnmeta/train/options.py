"""Names of the training options (optimisers, schedulers, augmentation presets).

Kept free of torch so that the ``lnmeta`` parsers can offer them as choices without
importing the training stack; ``loop``, ``augment`` and ``spatial`` re-export them.
"""

from __future__ import annotations

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULERS = ("none", "cosine", "onecycle", "plateau", "cosine_restarts")
AUGMENT_PRESETS = ("none", "flips", "seed000", "seed003", "seed003-autoaugment",
                   "seed003-randaugment", "seed003-augmix", "seed003-trivialaugment", "seed004",
                   "stain")
SPATIAL_AUGMENTS = ("none", "flips", "seed004")
