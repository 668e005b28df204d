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
