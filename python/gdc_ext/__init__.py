"""gdc_ext: Generative Data Cartography for PyTorch.

Replace ``nn.CrossEntropyLoss`` with :class:`CartoLoss`, give it a :class:`CartoState`, pass
sample ids, call ``state.end_epoch()`` after each epoch, and read ``state.scores()``.
"""
from gdc_ext import _C  # noqa: F401  (registers torch.ops.gdc)
from gdc_ext import ops, reference
from gdc_ext.loss import CartoLoss, expand_sample_ids
from gdc_ext.ops import TargetIndexError
from gdc_ext.state import CartoState, Scores

__version__ = "0.1.0"
__all__ = ["CartoLoss", "CartoState", "Scores", "TargetIndexError", "expand_sample_ids", "ops", "reference"]

from gdc_ext.cartography import QUADRANT_NAMES, Quadrants, loss_weights, multiplicities, prune, quadrants  # noqa: E402

__all__ += ["QUADRANT_NAMES", "Quadrants", "loss_weights", "multiplicities", "prune", "quadrants"]

from gdc_ext.sampler import CartoSampler  # noqa: E402
from gdc_ext.cartographer import Cartographer  # noqa: E402

__all__ += ["CartoSampler", "Cartographer"]

from gdc_ext.references import unigram_reference, zlib_reference  # noqa: E402

__all__ += ["unigram_reference", "zlib_reference"]

# gdc_ext.plot (matplotlib), gdc_ext.cli and gdc_ext.integrations.hf (transformers) are imported
# on use, never here: `import gdc_ext` stays light.
