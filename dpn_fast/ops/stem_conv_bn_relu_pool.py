"""The DPN stem for inference, fused:

    out = max_pool2d(relu(batch_norm(conv2d(x, weight, stride, padding=K // 2))), 3, 2, 1)

with eval BatchNorm (running statistics) folded into the weights per call. CPU only, float32,
no gradient: it serves the fused model's inference path. Paddle runs the stem as three ops, and
its convolution writes (and page-faults) a fresh im2col buffer on every call: 4.2 ms for DPN92's
7x7 stem on 2 threads, of which the GEMM is 0.9 ms. On GPU cuDNN serves the stem well, and this
function runs the reference there.
"""
import paddle
import paddle.nn.functional as F

from dpn_fast import _extension
from dpn_fast.ops._backend import resolve_backend
from dpn_fast.ops._checks import (check_channel_vectors, check_dtype, check_float, check_int,
                                  check_same_place, check_tensor)

OP = "stem_conv_bn_relu_pool"
MAX_KERNEL = 11  # kMaxStemKernel, csrc/stem_conv_bn_relu_pool.h


def reference_stem_conv_bn_relu_pool(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=2,
                                     epsilon=1e-5):
    """The plain-Paddle sequence the fused op replaces (the benchmarks' and tests' baseline)."""
    y = F.conv2d(x, weight, stride=stride, padding=weight.shape[2] // 2)
    y = F.batch_norm(y, bn_mean, bn_var, weight=bn_weight, bias=bn_bias, training=False,
                     epsilon=epsilon)
    return F.max_pool2d(F.relu(y), kernel_size=3, stride=2, padding=1)


def stem_launch(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride, epsilon, bf16=False):
    """The op, unchecked (the CPU engine's path; the op checks shapes itself). `bf16`: the
    convolution on the image and weights rounded to bf16, with float32 sums (pairs of taps on
    vdpbf16ps where the CPU has AVX512_BF16); float32 in and out either way."""
    return _extension.run_op(f"dpn_fast_{OP}", x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                             int(stride), float(epsilon), bool(bf16))[0]


@paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
def _check_args(backend, x, weight, bn, stride, epsilon):
    """The op's contract on every backend; the CPU op also needs float32 throughout."""
    check_tensor(OP, "x", x, rank=4)
    check_tensor(OP, "weight", weight, rank=4)
    check_int(OP, "stride", stride, minimum=1)
    check_float(OP, "epsilon", epsilon)
    c_out, c, kernel, kernel_w = weight.shape
    if kernel != kernel_w or kernel % 2 != 1 or kernel > MAX_KERNEL:
        raise ValueError(f"{OP}: the kernel must be square and odd, at most {MAX_KERNEL}, "
                         f"'weight' has shape {list(weight.shape)}")
    if c != x.shape[1]:
        raise ValueError(f"{OP}: 'weight' has shape {list(weight.shape)} for {c} input channels, "
                         f"'x' has shape {list(x.shape)}")
    if stride > kernel:
        raise ValueError(f"{OP}: 'stride' must be in [1, {kernel}] (the kernel size), got {stride}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{OP}: 'x' has an empty image, shape {list(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{OP}: 'x' and 'weight' must have the same dtype, got {x.dtype} and "
                        f"{weight.dtype}")
    if backend == "cpu":
        check_dtype(OP, "x", x, paddle.float32, " (the fused stem runs float32 only; use "
                    "backend='reference' for other dtypes)")
    check_same_place(OP, x, [("weight", weight)])
    check_channel_vectors(OP, x, c_out, zip(("bn_weight", "bn_bias", "bn_mean", "bn_var"), bn),
                          paddle.float32 if backend == "cpu" else None)


def stem_conv_bn_relu_pool(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=2,
                           epsilon=1e-5, backend="auto"):
    """The fused stem; `backend`: "auto" (the op on CPU, the reference on GPU), "cpu" or
    "reference". Has no backward: call it under paddle.no_grad() (or in a saved model)."""
    if backend not in ("auto", "cpu", "reference"):
        raise ValueError(f"{OP}: backend must be 'auto', 'cpu' or 'reference', got {backend!r}")
    check_tensor(OP, "x", x)
    if backend != "reference":
        backend = resolve_backend(backend, x, OP)  # "cpu" with GPU tensors raises
    _check_args(backend, x, weight, (bn_weight, bn_bias, bn_mean, bn_var), stride, epsilon)
    if backend != "cpu":
        return reference_stem_conv_bn_relu_pool(x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                                                stride, epsilon)
    if paddle.in_dynamic_mode() and paddle.is_grad_enabled() and not all(
            t.stop_gradient for t in (x, weight, bn_weight, bn_bias)):
        raise RuntimeError(f"{OP}: the fused stem has no backward; call it under "
                           "paddle.no_grad() or use backend='reference' for training")
    return stem_launch(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride, epsilon)
