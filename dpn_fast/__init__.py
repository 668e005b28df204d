"""Dual Path Networks for PaddlePaddle, made fast with fused custom operators."""
from dpn_fast import _extension  # noqa: F401  (registers the custom ops)

__version__ = "0.1.0"
