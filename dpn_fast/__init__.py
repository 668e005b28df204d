"""Dual Path Networks for PaddlePaddle, made fast with fused custom operators."""
from dpn_fast import _extension  # noqa: F401  (registers the custom ops)
from dpn_fast.checkpoint import CheckpointError, load_checkpoint
from dpn_fast.models import DPN68, DPN92, DPN98, DPN107, DPN131, MODEL_NAMES, create_model

__version__ = "0.1.0"
__all__ = ["DPN68", "DPN92", "DPN98", "DPN107", "DPN131", "MODEL_NAMES", "create_model",
           "load_checkpoint", "CheckpointError"]
