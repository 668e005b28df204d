"""Dual Path Networks for PaddlePaddle, made fast with fused custom operators."""
import importlib
import warnings

with warnings.catch_warnings():
    # `import paddle` imports paddle.utils.cpp_extension, which warns "No ccache found"; that
    # concerns compiling extensions, which dpn_fast never does at run time.
    warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
    import paddle  # noqa: F401

from dpn_fast import _extension  # noqa: F401,E402  (registers the custom ops)
from dpn_fast.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from dpn_fast.models import (  # noqa: E402
    DPN68, DPN92, DPN98, DPN107, DPN131, MODEL_NAMES, create_model)

__version__ = "0.1.0"
__all__ = ["DPN68", "DPN92", "DPN98", "DPN107", "DPN131", "MODEL_NAMES", "create_model",
           "load_checkpoint", "CheckpointError"]

# Documented submodules, reachable as dpn_fast.<name> after `import dpn_fast`. Those the
# imports above do not load (inference, predict) load on first use, so importing dpn_fast
# does not pay for them.
SUBMODULES = ("checkpoint", "inference", "models", "ops", "predict")


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f"dpn_fast.{name}")
    raise AttributeError(f"module 'dpn_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
