"""gdc_ext: Generative Data Cartography for PyTorch."""
from gdc_ext import _C  # noqa: F401  (registers torch.ops.gdc)
