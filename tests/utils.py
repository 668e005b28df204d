"""Shared test helpers: the accuracy rule every fused result is held to.

A fused result passes when its max error against a float64 reference is within
2x the plain-Paddle float32 error plus a small per-dtype atol.
"""
import os
import subprocess
import sys

import numpy as np

ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def random_bn(rng, channels):
    """Raw eval BatchNorm parameters (bn_weight, bn_bias, bn_mean, bn_var) away from identity."""
    return {
        "bn_weight": rng.uniform(0.5, 1.5, channels),
        "bn_bias": 0.5 * rng.standard_normal(channels),
        "bn_mean": 0.2 * rng.standard_normal(channels),
        "bn_var": rng.uniform(0.5, 2.0, channels),
    }


def max_abs_err(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != reference {expected.shape}"
    assert np.isfinite(actual).all(), "non-finite values in result (unwritten NaN-poisoned output?)"
    return float(np.abs(actual - expected).max()) if actual.size else 0.0


def assert_matches_reference(actual, ref64, ref32, dtype="float32", name="output"):
    """`actual` (fused) vs `ref64` (float64 reference), allowed 2x the error of `ref32`."""
    err = max_abs_err(actual, ref64)
    ref_err = max_abs_err(ref32, ref64)
    bound = 2.0 * ref_err + ATOL[dtype] * max(1.0, float(np.abs(ref64).max()))
    assert err <= bound, (f"{name}: max|fused - ref64| = {err:.3e} > {bound:.3e}"
                          f" (paddle fp32 err {ref_err:.3e})")


def run_script(script, env=None):
    """Runs `script` in a fresh interpreter; it must print "ok". The working directory is the
    tests folder, so `import dpn_fast` finds the installed package, not a source checkout."""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def round_to_bf16(array):
    """float32 or float64 `array` rounded to the nearest bf16 value (ties to even), kept in its
    dtype: the mantissa bits bf16 lacks dropped, rounding on the kept bits."""
    array = np.ascontiguousarray(array)
    uint, dropped = {np.float32: (np.uint32, 16), np.float64: (np.uint64, 45)}[array.dtype.type]
    bits = array.view(uint)
    one, dropped = uint(1), uint(dropped)
    kept_lsb = (bits >> dropped) & one
    rounded = (bits + ((one << (dropped - one)) - one) + kept_lsb) & ~((one << dropped) - one)
    return rounded.view(array.dtype)
