"""Chooses the implementation of a fused op (`backend=` keyword) and adapts tensors for Triton."""
import os

import paddle

from dpn_fast import _extension
from dpn_fast.ops._checks import TENSOR_TYPES

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _on_gpu(tensor):
    if isinstance(tensor, paddle.pir.Value):  # paddle.jit.to_static: no place (asking warns)
        return paddle.device.get_device().startswith("gpu")
    return tensor.place.is_gpu_place()


def resolve_backend(backend, tensor, op):
    """Returns the concrete backend ("cpu", "cuda", "triton" or "reference") for `tensor`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(tensor, TENSOR_TYPES):
        raise TypeError(f"{op}: the input must be a paddle.Tensor, got {type(tensor).__name__}")
    on_gpu = _on_gpu(tensor)
    if backend == "auto":
        if not on_gpu:
            return "cpu"
        if _extension.BUILT_WITH_CUDA:
            return "cuda"
        return "triton" if _triton_importable() else "reference"
    if backend == "cpu" and on_gpu:
        raise ValueError(f"{op}: backend='cpu' got tensors on {tensor.place}")
    if backend == "cuda":
        if not on_gpu:
            raise ValueError(f"{op}: backend='cuda' needs GPU tensors, got {tensor.place}")
        if not _extension.BUILT_WITH_CUDA:
            raise RuntimeError(f"{op}: dpn_fast was built without CUDA (no nvcc at install time)")
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if not on_gpu and not triton_interpreted():
            raise ValueError(f"{op}: backend='triton' on CPU tensors runs only under "
                             "TRITON_INTERPRET=1 (set before importing triton)")
    return backend


_gpu_stream_hooked = False


def triton_arg(tensor):
    """A Paddle tensor as a Triton kernel argument (a pointer to its first element)."""
    if tensor.place.is_gpu_place():
        global _gpu_stream_hooked
        if not _gpu_stream_hooked:
            # Launch on Paddle's current stream, not stream 0 (Triton asks torch otherwise).
            from triton.runtime import driver
            driver.active.get_current_stream = (
                lambda device=None: paddle.device.current_stream().stream_base.cuda_stream)
            _gpu_stream_hooked = True
        return tensor
    from dpn_fast.kernels._host import HostTensor
    return HostTensor(tensor.data_ptr(), str(tensor.dtype).replace("paddle.", ""), tensor)
