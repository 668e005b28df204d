"""Loads the compiled op library (libdpn_fast_ops.so) and registers its Paddle custom ops.

Registration happens once per process, on `import dpn_fast`. Registering the same op names
from a second .so aborts the process, so this is the only place that loads it.
"""
import ctypes
import os
import sys

import paddle
from paddle.base import core
from paddle.base.framework import OpProtoHolder

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "libdpn_fast_ops.so"
LIBRARY_PATH = os.path.join(PACKAGE_DIR, LIBRARY_NAME)


def _installed_library():
    """The op library of a dpn_fast package further down sys.path, if any."""
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "dpn_fast", LIBRARY_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def _missing_library_error():
    installed = _installed_library()
    if installed:
        return ImportError(
            f"dpn_fast was imported from {PACKAGE_DIR}, a source checkout without the built op "
            f"library, which shadows the installed dpn_fast in {os.path.dirname(installed)}: "
            "Python looks in the current directory (or PYTHONPATH) first. Run Python from "
            "another directory, or take the checkout off PYTHONPATH.")
    return ImportError(
        f"dpn_fast op library not found at {LIBRARY_PATH}. Install the package with "
        "`pip install .` (importing dpn_fast from a source checkout does not build it).")


if not os.path.exists(LIBRARY_PATH):
    raise _missing_library_error()

# What paddle.utils.cpp_extension.load_op_meta_info_and_register_op does, without importing that
# module here: importing it probes for ccache and warns (paddle 3.3.1 happens to import it in
# `import paddle` too, which dpn_fast/__init__.py quiets).
OpProtoHolder.instance().update_op_proto(core.load_op_meta_info_and_register_op(LIBRARY_PATH))

# The CUDA launchers are exported only from a build that compiled csrc/*.cu.
BUILT_WITH_CUDA = hasattr(ctypes.CDLL(LIBRARY_PATH), "dpn_fast_dual_path_merge_forward_cuda")


def run_op(name, *inputs_and_attrs):
    """Calls a registered dpn_fast custom op in dynamic graph or under to_static."""
    return paddle._C_ops._run_custom_op(name, *inputs_and_attrs)
