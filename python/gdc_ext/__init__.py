"""gdc_ext: Generative Data Cartography for PyTorch.

Replace ``nn.CrossEntropyLoss`` with :class:`CartoLoss`, give it a :class:`CartoState`, pass
sample ids, call ``state.end_epoch()`` after each epoch, and read ``state.scores()``.
"""
from gdc_ext import _abi  # noqa: F401  (first: a clear ImportError if torch is not the one the build used)
from gdc_ext import _C  # noqa: F401  (registers torch.ops.gdc)
from gdc_ext import functional, ops
from gdc_ext.functional import expand_sample_ids
from gdc_ext.loss import CartoLoss
from gdc_ext.ops import ArgumentError, TargetIndexError
from gdc_ext.state import CartoState, Scores

__version__ = "0.1.0"
__all__ = ["ArgumentError", "CartoLoss", "CartoState", "Scores", "TargetIndexError", "expand_sample_ids",
           "functional", "ops", "reference"]

from gdc_ext.cartography import (QUADRANT_NAMES, Quadrants, loss_weights, multiplicities, prune,  # noqa: E402
                                  quadrants, score_values, selection_order)
__all__ += ["QUADRANT_NAMES", "Quadrants", "loss_weights", "multiplicities", "prune", "quadrants", "score_values",
            "selection_order"]

from gdc_ext.cartography import DEFAULT_SCORE, SCORES  # noqa: E402  (the by= vocabulary and its default)

__all__ += ["DEFAULT_SCORE", "SCORES"]

from gdc_ext.sampler import CartoSampler  # noqa: E402
from gdc_ext.cartographer import Cartographer  # noqa: E402

__all__ += ["CartoSampler", "Cartographer"]

from gdc_ext.references import unigram_reference, zlib_reference  # noqa: E402

__all__ += ["unigram_reference", "zlib_reference"]

from gdc_ext.counterfactual import crossfit_split, duplicate_groups, reference_losses  # noqa: E402

__all__ += ["crossfit_split", "duplicate_groups", "reference_losses"]

# gdc_ext.plot (matplotlib), gdc_ext.cli and gdc_ext.integrations.hf (transformers) are imported
# on use, never here: `import gdc_ext` stays light. gdc_ext.reference (the NumPy specification,
# the tests' oracle) is loaded on first access of `gdc_ext.reference`, so the library itself
# never runs on it.


def __getattr__(name: str):
    if name in ("reference", "audit"):  # gdc_ext.audit: the canary audit kit, loaded on use too
        import importlib

        return importlib.import_module(f"gdc_ext.{name}")
    raise AttributeError(f"module 'gdc_ext' has no attribute {name!r}")

from gdc_ext.linear_cross_entropy import CartoLinearCrossEntropyLoss, linear_cross_entropy  # noqa: E402

__all__ += ["CartoLinearCrossEntropyLoss", "linear_cross_entropy"]

# the sharded state (torch.distributed, one shard of the ids per rank) and what works on its shards
from gdc_ext.sharded import ShardedCartoState  # noqa: E402
from gdc_ext.sharded_sampler import ShardedCartoSampler  # noqa: E402
from gdc_ext.sharded_selection import ShardedScores  # noqa: E402

__all__ += ["ShardedCartoSampler", "ShardedCartoState", "ShardedScores"]
