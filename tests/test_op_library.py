"""The installed op library's links: its OpenMP regions must run on Paddle's runtime alone."""
import shutil
import subprocess
from pathlib import Path

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
    imported = {s for s in dynamic_symbols(library, undefined=True) if s.startswith(OPENMP_PREFIXES)}
    assert imported, "no OpenMP imports found: is the CPU core still built with OpenMP?"
    missing = imported - dynamic_symbols(runtime, undefined=False)
    assert not missing, f"OpenMP entry points missing from {runtime.name}: {sorted(missing)}"
