"""The installed op library: its OpenMP regions must run on Paddle's runtime alone, and its
CPU outputs come from a cache of freed blocks (csrc/host_block_cache.cc)."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import paddle
import pytest

import dpn_fast

OPENMP_PREFIXES = ("GOMP_", "omp_", "__kmpc_", "kmp_")


def dynamic_symbols(library, undefined):
    """Names in `library`'s dynamic symbol table, imported (undefined) or exported, unversioned."""
    args = ["nm", "-D", "--undefined-only" if undefined else "--defined-only", str(library)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_openmp_imports_are_all_in_paddles_runtime():
    """GCC emits GOMP_* calls; Paddle's libiomp5 implements most, not all. One it lacks (e.g.
    GOMP_loop_nonmonotonic_dynamic_start, GCC's default for schedule(dynamic)) binds to libgomp
    if anything loaded it, whose loop then runs every iteration on every libiomp5 thread:
    correct results, no speed-up from threads. So every OpenMP import must resolve in libiomp5."""
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not found")
    runtime = Path(paddle.__file__).parent / "libs" / "libiomp5.so"
    if not runtime.exists():
        pytest.skip("this Paddle wheel ships no libiomp5 (the library links the system OpenMP)")
    library = Path(dpn_fast.__file__).parent / "libdpn_fast_ops.so"
    imported = {s for s in dynamic_symbols(library, undefined=True)
                if s.startswith(OPENMP_PREFIXES)}
    assert imported, "no OpenMP imports found: is the CPU core still built with OpenMP?"
    missing = imported - dynamic_symbols(runtime, undefined=False)
    assert not missing, f"OpenMP entry points missing from {runtime.name}: {sorted(missing)}"


def stem_output(seed):
    """A stem output of 1 x 64 x 56 x 56 floats (over the 128 KiB the cache starts at)."""
    from dpn_fast.ops import stem_conv_bn_relu_pool
    from test_stem_conv_bn_relu_pool import as_tensors, make_inputs
    arrays = make_inputs(np.random.default_rng(seed), 1, 3, 224, 224, 64, 7)
    with paddle.no_grad():
        return stem_conv_bn_relu_pool(*as_tensors(arrays, "float32"))


def test_freed_output_blocks_are_reused_and_live_ones_never_shared():
    first = stem_output(0)
    address = first.data_ptr()
    expected = first.numpy().copy()
    second = stem_output(1)  # `first` is alive: another block
    assert second.data_ptr() != address
    np.testing.assert_array_equal(first.numpy(), expected)
    del first
    assert stem_output(2).data_ptr() == address  # the freed block, taken again


def test_cache_limit_zero_returns_blocks_to_the_system(tmp_path):
    """DPN_FAST_HOST_CACHE_MB=0 keeps nothing; results are the same."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import numpy as np
        from test_op_library import stem_output
        outs = [stem_output(seed).numpy() for seed in (0, 1, 0)]
        np.testing.assert_array_equal(outs[0], outs[2])
        assert not np.array_equal(outs[0], outs[1])
        np.save(sys.argv[1], outs[0])
        print("ok")
    """)
    results = []
    for limit in ("0", "1024"):
        path = str(tmp_path / f"limit{limit}.npy")
        proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True,
                              env=dict(os.environ, DPN_FAST_HOST_CACHE_MB=limit), timeout=300,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
        results.append(np.load(path))
    np.testing.assert_array_equal(results[0], results[1])
