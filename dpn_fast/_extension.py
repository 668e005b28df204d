"""Loads the compiled op library (libdpn_fast_ops.so) and registers its Paddle custom ops.

Registration happens once per process, on `import dpn_fast`. Registering the same op names
from a second .so aborts the process, so this is the only place that loads it. First it checks
that the Paddle imported is the one the library was compiled against (the build's record next
to it): another version or build (CPU vs GPU) would fail later with an undefined symbol, a crash
or wrong results.
"""
import ctypes
import json
import os
import sys

import paddle
from paddle.base import core
from paddle.base.framework import OpProtoHolder

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIBRARY_NAME = "libdpn_fast_ops.so"
LIBRARY_PATH = os.path.join(PACKAGE_DIR, LIBRARY_NAME)
# Written by the build (build_backend/dpn_fast_build.py): the Paddle the library is compiled for.
BUILD_RECORD_PATH = os.path.join(PACKAGE_DIR, "libdpn_fast_ops.build.json")
# The fields of the record that must match the running Paddle.
BUILD_FIELDS = ("version", "commit", "cuda")


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


def running_paddle():
    """The imported Paddle, described as the build record describes the one built against."""
    return {"version": paddle.version.full_version, "commit": paddle.version.commit,
            "cuda": paddle.version.cuda()}


def _describe(paddle_info):
    cuda = paddle_info.get("cuda")
    build = "CPU" if cuda in (None, "False") else f"CUDA {cuda}"
    name = paddle_info.get("distribution") or "paddle"
    return (f"{name} {paddle_info.get('version')} ({build} build, commit "
            f"{paddle_info.get('commit')})")


def check_built_against(record, running):
    """Raises ImportError unless `running` (running_paddle()) is the Paddle of the build
    `record` (a dict; None: the library has no record)."""
    if record is None:
        raise ImportError(
            f"{LIBRARY_PATH} has no build record ({os.path.basename(BUILD_RECORD_PATH)}), so the "
            "Paddle it was compiled against is unknown: rebuild it (pip install ., or python "
            "setup.py build_ext --inplace in a checkout)")
    if any(record.get(field) != running[field] for field in BUILD_FIELDS):
        raise ImportError(
            f"dpn_fast's op library was built against {_describe(record)}, but the Paddle "
            f"imported is {_describe(running)} (from {os.path.dirname(paddle.__file__)}). "
            "Reinstall dpn_fast in this environment so it builds against this Paddle (GPU "
            "Paddle: pip install --no-build-isolation .), or install the Paddle it was built "
            "against.")


def _build_record():
    try:
        with open(BUILD_RECORD_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


if not os.path.exists(LIBRARY_PATH):
    raise _missing_library_error()
check_built_against(_build_record(), running_paddle())

# What paddle.utils.cpp_extension.load_op_meta_info_and_register_op does, without importing that
# module here: importing it probes for ccache and warns (paddle 3.3.1 happens to import it in
# `import paddle` too, which dpn_fast/__init__.py quiets).
OpProtoHolder.instance().update_op_proto(core.load_op_meta_info_and_register_op(LIBRARY_PATH))

# The CUDA launchers are exported only from a build that compiled csrc/*.cu.
BUILT_WITH_CUDA = hasattr(ctypes.CDLL(LIBRARY_PATH), "dpn_fast_dual_path_merge_forward_cuda")


def run_op(name, *inputs_and_attrs):
    """Calls a registered dpn_fast custom op in dynamic graph or under to_static."""
    return paddle._C_ops._run_custom_op(name, *inputs_and_attrs)
