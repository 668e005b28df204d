"""Grouped 3x3 convolution (padding 1) + BatchNorm + ReLU, fused.

    out = relu(batch_norm(conv2d(x, weight, stride=stride, padding=1, groups=groups)))

Eval folds the BN into the convolution (scaled weights + bias) and applies ReLU in the epilogue,
so the unnormalised conv output is never written. Training normalises with the batch statistics
(biased variance, over N, H, W) and updates the running statistics in place the way
paddle.nn.BatchNorm does: running = momentum * running + (1 - momentum) * batch.

CPU threads: Paddle's CPU thread setting (FLAGS_paddle_num_threads, default 1; Paddle Inference's
set_cpu_math_library_num_threads), or DPN_FAST_NUM_THREADS when set.
"""
import paddle
import paddle.nn.functional as F

from dpn_fast import _extension
from dpn_fast.ops._backend import resolve_backend, triton_arg

OP = "grouped_conv_bn_relu"


def reference_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=1,
                                   groups=32, epsilon=1e-5, momentum=0.9, training=False):
    """The plain-Paddle sequence the fused op replaces (the benchmarks' and tests' baseline)."""
    y = F.conv2d(x, weight, stride=stride, padding=1, groups=groups)
    y = F.batch_norm(y, bn_mean, bn_var, weight=bn_weight, bias=bn_bias, training=training,
                     momentum=momentum, epsilon=epsilon)
    return F.relu(y)


def fold_bn_into_conv(weight, bn_weight, bn_bias, bn_mean, bn_var, epsilon=1e-5):
    """(weight * scale, bn_bias - bn_mean * scale) with scale = bn_weight / sqrt(bn_var + eps).

    Computed in float32 (the BN tensors are float32 also in fp16/bf16 models); the folded weight
    keeps the weight's dtype, the bias stays float32.
    """
    scale = bn_weight / paddle.sqrt(bn_var + epsilon)
    w_folded = weight.astype("float32") * scale.reshape([-1, 1, 1, 1])
    return w_folded.astype(weight.dtype), bn_bias - bn_mean * scale


def _check_python_args(x, weight, stride, groups):
    # The custom op checks everything again; the Triton path has no C++ layer, so check here.
    if stride not in (1, 2):
        raise ValueError(f"{OP}: stride must be 1 or 2, got {stride}")
    if len(x.shape) != 4 or len(weight.shape) != 4:
        raise ValueError(f"{OP}: x and weight must have rank 4, got {list(x.shape)} and "
                         f"{list(weight.shape)}")
    c = x.shape[1]
    if c % groups != 0:
        raise ValueError(f"{OP}: input channels {c} are not divisible by groups={groups}")
    if list(weight.shape[1:]) != [c // groups, 3, 3] or weight.shape[0] % groups != 0:
        raise ValueError(f"{OP}: weight must have shape [C_out, {c // groups}, 3, 3] with C_out "
                         f"divisible by groups={groups}, got {list(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{OP}: x and weight must have the same dtype, got {x.dtype} and "
                         f"{weight.dtype}")


def _triton_forward(x, weight_folded, bias, stride, groups):
    from dpn_fast.kernels.grouped_conv_bn_relu import grouped_conv_bias_relu_forward
    n, c, h, w = x.shape
    c_out = weight_folded.shape[0]
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = paddle.empty([n, c_out, h_out, w_out], dtype=x.dtype)
    grouped_conv_bias_relu_forward(triton_arg(x), triton_arg(weight_folded.astype("float32")),
                                   triton_arg(bias.astype("float32")), triton_arg(out),
                                   n, c, h, w, c_out, groups, stride)
    return out


def grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=1, groups=32,
                         epsilon=1e-5, momentum=0.9, training=False, backend="auto"):
    """relu(batch_norm(conv2d(x, weight, stride, padding=1, groups))), fused.

    x: [N, C, H, W]; weight: [C_out, C / groups, 3, 3]; bn_*: [C_out] (float32). In training,
    bn_mean / bn_var are the BN's running statistics and are updated in place.
    backend: "auto", "cpu", "cuda", "triton" (eval only) or "reference" (plain Paddle).
    """
    backend = resolve_backend(backend, x, OP)
    if backend == "reference":
        return reference_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                                              stride, groups, epsilon, momentum, training)
    _check_python_args(x, weight, stride, groups)
    if backend == "triton":
        if training:
            raise NotImplementedError(f"{OP}: backend='triton' implements eval only; use "
                                      "backend='cuda' or 'reference' for training")
        w_folded, bias = fold_bn_into_conv(weight, bn_weight, bn_bias, bn_mean, bn_var, epsilon)
        return _triton_forward(x, w_folded, bias, stride, groups)
    if training:
        # The op updates bn_mean / bn_var in place; Paddle then marks them as needing gradients,
        # which would forbid the next in-place update: restore their flags.
        stop_gradient = bn_mean.stop_gradient, bn_var.stop_gradient
        out = _extension.run_op("dpn_fast_grouped_conv_bn_relu_train", x, weight, bn_weight,
                                bn_bias, bn_mean, bn_var, stride, groups, float(epsilon),
                                float(momentum))[0]
        bn_mean.stop_gradient, bn_var.stop_gradient = stop_gradient
        return out
    return _extension.run_op("dpn_fast_grouped_conv_bn_relu_infer", x, weight, bn_weight, bn_bias,
                             bn_mean, bn_var, stride, groups, float(epsilon))[0]


def _signature(tensor):
    return id(tensor), tensor.data_ptr(), tensor._inplace_version(), tuple(tensor.shape)


class GroupedConvBNReLUFolder:
    """Runs a PaddleClas-style (paddle.nn.Conv2D, paddle.nn.BatchNorm(act="relu")) pair fused.

    Eval reuses BN-folded weights/bias cached across calls. Refolding happens when
      - any of the five source tensors is replaced or changed by an in-place Paddle op
        (tracked by identity, data pointer and _inplace_version()),
      - a training-mode call ran since the last fold (an optimizer step may follow it), or
      - refold() is called.
    Paddle does not bump _inplace_version() for optimizer.step(), set_value() or
    set_state_dict() (verified with paddle 3.3), so after loading new values into a model that
    has already run in eval mode, call refold(). Under paddle.jit.to_static the BN is folded
    inside the graph on every call (a saved program must not capture a stale fold).
    """

    def __init__(self, conv, bn):
        stride = [int(v) for v in conv._stride]
        if (list(conv._kernel_size) != [3, 3] or list(conv._updated_padding) != [1, 1]
                or list(conv._dilation) != [1, 1] or stride[0] != stride[1]
                or conv._data_format != "NCHW" or conv.bias is not None):
            raise ValueError(f"{OP}: conv must be a 3x3 NCHW Conv2D with padding 1, dilation 1, "
                             f"equal strides and bias_attr=False, got kernel {conv._kernel_size}, "
                             f"padding {conv._updated_padding}, dilation {conv._dilation}, "
                             f"stride {conv._stride}, data_format {conv._data_format}")
        if getattr(bn, "_act", "relu") != "relu":
            raise ValueError(f"{OP}: bn must be BatchNorm(act='relu'), got act={bn._act!r}")
        self.conv, self.bn = conv, bn
        self.stride, self.groups = stride[0], int(conv._groups)
        self._folded = None
        self._folded_for = None

    def _sources(self):
        return (self.conv.weight, self.bn.weight, self.bn.bias, self.bn._mean, self.bn._variance)

    def refold(self):
        """Drops the cached fold; the next eval call folds the current parameters."""
        self._folded = None

    def _folded_params(self):
        signature = tuple(_signature(t) for t in self._sources())
        if self._folded is None or self._folded_for != signature:
            with paddle.no_grad():
                self._folded = fold_bn_into_conv(*self._sources(), epsilon=self.bn._epsilon)
            self._folded_for = signature
        return self._folded

    def __call__(self, x, backend="auto"):
        bn = self.bn
        training = bn.training
        if training or not paddle.in_dynamic_mode():
            if training:
                self._folded = None
            return grouped_conv_bn_relu(x, self.conv.weight, bn.weight, bn.bias, bn._mean,
                                        bn._variance, self.stride, self.groups, bn._epsilon,
                                        bn._momentum, training, backend)
        backend = resolve_backend(backend, x, OP)
        if backend == "reference":
            return reference_grouped_conv_bn_relu(x, self.conv.weight, bn.weight, bn.bias,
                                                  bn._mean, bn._variance, self.stride,
                                                  self.groups, bn._epsilon)
        w_folded, bias = self._folded_params()
        if backend == "triton":
            _check_python_args(x, w_folded, self.stride, self.groups)
            return _triton_forward(x, w_folded, bias, self.stride, self.groups)
        return _extension.run_op("dpn_fast_grouped_conv_bias_relu", x, w_folded, bias,
                                 self.stride, self.groups)[0]
