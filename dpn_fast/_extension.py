"""Loads the compiled op library (libdpn_fast_ops.so) and registers its Paddle custom ops.

Registration happens once per process, on `import dpn_fast`. Registering the same op names
from a second .so aborts the process, so this is the only place that loads it.
"""
import ctypes
import os
import warnings

import paddle

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # paddle warns about ccache on importing cpp_extension
    import paddle.utils.cpp_extension

LIBRARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libdpn_fast_ops.so")

if not os.path.exists(LIBRARY_PATH):
    raise ImportError(
        f"dpn_fast op library not found at {LIBRARY_PATH}. Install the package with "
        "`pip install .` (importing dpn_fast from a source checkout does not build it).")

paddle.utils.cpp_extension.load_op_meta_info_and_register_op(LIBRARY_PATH)

# The CUDA launchers are exported only from a build that compiled csrc/*.cu.
BUILT_WITH_CUDA = hasattr(ctypes.CDLL(LIBRARY_PATH), "dpn_fast_dual_path_merge_forward_cuda")


def run_op(name, *inputs_and_attrs):
    """Calls a registered dpn_fast custom op in dynamic graph or under to_static."""
    return paddle._C_ops._run_custom_op(name, *inputs_and_attrs)
