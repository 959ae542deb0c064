"""The one check of every ``seed=`` argument (CartoSampler, Cartographer, the cartography
functions, plot.data_map, the CLI's --seed), so a bad seed gives the same ValueError naming
``seed`` everywhere instead of NumPy's or torch's own messages."""
from __future__ import annotations

import numpy as np

__all__ = ["SEED_LIMIT", "check_seed"]

# Seeds feed np.random.default_rng(seed) and torch.Generator().manual_seed(seed + epoch) (the
# sampler); torch takes at most 2**64 - 1, so seeds below 2**63 leave room for any epoch count.
SEED_LIMIT = 2 ** 63


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as a Python int in [0, 2**63) (a Python or NumPy integer, not a bool); ValueError
    naming ``name`` otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")
    return int(seed)
