"""What the op library's kernels can use on this CPU, as the library itself reports it."""
import ctypes
import functools

from dpn_fast import _extension


@functools.cache  # the CPU does not change under a running process
def bf16_gemm_supported():
    """Whether the 1x1 GEMMs can run in bf16 here: oneDNN has bf16 matmul kernels for this CPU
    (AVX512_BF16 or AMX-BF16)."""
    # The library is already loaded (dpn_fast._extension): this returns its handle, registering
    # nothing twice.
    library = ctypes.CDLL(_extension.LIBRARY_PATH)
    return bool(library.dpn_fast_bf16_gemm_supported())


GEMM_LAYOUTS = ("plain", "transposed", "packed")


def gemm_impl(m, n, k, layout, bf16=False):
    """The oneDNN implementation the ops' GEMM gets for [m, k] x [k, n], e.g.
    "brg_matmul:avx512_core". layout: how b is given: "plain" [k, n], "transposed" [n, k] (a
    channels-last 1x1 convolution's weight), "packed" (as the compiled engine runs it); bf16:
    bf16 operands (packed only). Raises RuntimeError where oneDNN refuses the GEMM."""
    if layout not in GEMM_LAYOUTS:
        raise ValueError(f"layout must be one of {GEMM_LAYOUTS}, got {layout!r}")
    library = ctypes.CDLL(_extension.LIBRARY_PATH)
    library.dpn_fast_gemm_impl.restype = ctypes.c_char_p
    library.dpn_fast_gemm_impl.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    name = library.dpn_fast_gemm_impl(m, n, k, GEMM_LAYOUTS.index(layout), int(bf16)).decode()
    if name.startswith("error: "):
        raise RuntimeError(name[len("error: "):])
    return name
