"""The DPN family as plain Paddle networks (PaddleClas's layers and state dict)."""
from dpn_fast.models.config import CONFIGS, block_shapes  # noqa: F401
from dpn_fast.models.dpn import DPN  # noqa: F401

MODEL_NAMES = tuple(CONFIGS)
