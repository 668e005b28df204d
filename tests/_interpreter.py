"""Helpers for testing the Triton kernels (dpn_fast.kernels) under Triton's CPU interpreter, on
numpy arrays or torch CPU tensors.

The interpreter must be chosen before triton is imported (TRITON_INTERPRET=1: triton's own
library functions are decorated at import), so a module's interpreter tests run in a pytest
subprocess with the variable set (`run_module_interpreted`), and are skipped in the parent, as
tests/test_dual_path_merge.py does.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dpn_fast.kernels._host import HostTensor

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 "
                                       "(run by the module's test_under_interpreter)")


def run_module_interpreted(test_file, markers="not slow", env=None):
    """Runs `test_file`'s tests selected by `markers` in a subprocess under the interpreter: every
    one must pass, none may be skipped. Deselected there: the module's drivers
    (test_under_interpreter*) and tests of the compiled path (named *uninterpreted*)."""
    env = dict(env or os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", markers, "-k", "not under_interpreter and not uninterpreted",
                           str(test_file)],
                          env=env, capture_output=True, text=True, cwd=Path(test_file).parent,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, \
        proc.stdout[-2000:]


def host(array):
    """A C-contiguous numpy array (or a view starting inside one) as a kernel argument."""
    return HostTensor(array.ctypes.data, str(array.dtype), array)


def nan_array(shape, dtype):
    return np.full(shape, np.nan, dtype=dtype)
