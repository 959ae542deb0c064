"""Names of the files gdc writes into a Hugging Face checkpoint folder, in a module that imports
nothing: the ``gdc`` CLI reads checkpoint folders without importing ``transformers``, and
:mod:`gdc_ext.integrations.hf` writes them under these same names."""
from __future__ import annotations

__all__ = ["STATE_FILE", "META_FILE", "CHECKPOINT_PREFIX"]

STATE_FILE = "gdc_carto_state.safetensors"  # the CartoState (CartoState.save) of the checkpoint
META_FILE = "gdc_carto.json"  # the Cartographer's configuration and labels, the global step, checksums
# transformers.trainer_utils.PREFIX_CHECKPOINT_DIR: the Trainer's checkpoint folders are <prefix>-<global step>
CHECKPOINT_PREFIX = "checkpoint"
