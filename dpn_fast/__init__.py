"""Dual Path Networks for PaddlePaddle, made fast with fused custom operators.

Without Paddle (a GPU machine with torch only), `dpn_fast.torch` (the channels-last fused
forward of timm's DPNs) and `dpn_fast.kernels` still import; everything else needs Paddle.
"""
import importlib
import warnings

__version__ = "0.1.0"
__all__ = ["DPN68", "DPN92", "DPN98", "DPN107", "DPN131", "MODEL_NAMES", "create_model",
           "compile", "load_checkpoint", "CheckpointError"]

# Documented submodules, reachable as dpn_fast.<name> after `import dpn_fast`. Those the
# imports below do not load (inference, paddleclas, predict) load on first use, so importing
# dpn_fast does not pay for them.
SUBMODULES = ("checkpoint", "inference", "models", "ops", "paddleclas", "predict")

try:
    with warnings.catch_warnings():
        # `import paddle` imports paddle.utils.cpp_extension, which warns "No ccache found"; that
        # concerns compiling extensions, which dpn_fast never does at run time.
        warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
        import paddle  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != "paddle":
        raise
    _PADDLE_MISSING = error
else:
    _PADDLE_MISSING = None
    from dpn_fast import _extension  # noqa: F401  (registers the custom ops)
    from dpn_fast.checkpoint import CheckpointError, load_checkpoint
    from dpn_fast.api import (DPN68, DPN92, DPN98, DPN107, DPN131, MODEL_NAMES, compile,
                              create_model)


def __getattr__(name):
    if _PADDLE_MISSING is not None and (name in SUBMODULES or name in __all__):
        raise ImportError(f"dpn_fast.{name} needs Paddle (pip install paddlepaddle); without it "
                          "only dpn_fast.torch and dpn_fast.kernels are usable") \
            from _PADDLE_MISSING
    if name in SUBMODULES:
        return importlib.import_module(f"dpn_fast.{name}")
    raise AttributeError(f"module 'dpn_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(SUBMODULES))
