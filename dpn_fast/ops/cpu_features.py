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


def gemm_impl(m, n, k, b_transposed):
    """The oneDNN implementation the ops' float32 GEMM gets for [m, k] x [k, n] (b_transposed: b
    given as [n, k], a channels-last 1x1 convolution's weight), e.g. "brg_matmul:avx512_core"."""
    library = ctypes.CDLL(_extension.LIBRARY_PATH)
    library.dpn_fast_gemm_impl.restype = ctypes.c_char_p
    library.dpn_fast_gemm_impl.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]
    return library.dpn_fast_gemm_impl(m, n, k, int(b_transposed)).decode()
