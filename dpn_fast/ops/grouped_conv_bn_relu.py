"""Grouped 3x3 convolution (padding 1) + BatchNorm + ReLU, fused.

    out = relu(batch_norm(conv2d(x, weight, stride=stride, padding=1, groups=groups)))

optionally preceded by the input's own BatchNorm + ReLU (`input_bn`): x -> relu(input_bn(x)).
In eval that prologue is applied while the kernel loads x (real pixels only; the conv's zero
padding pads the activated tensor), saving a read and a write of x.

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
from dpn_fast.ops._batch_norm_layer import bn_layer_relu, check_bn_layer
from dpn_fast.ops._checks import (check_channel_vectors, check_float, check_int,
                                  check_same_place, check_tensor)

OP = "grouped_conv_bn_relu"


def _input_bn_relu(x, input_bn, momentum, training):
    weight, bias, mean, var, epsilon = input_bn
    return F.relu(F.batch_norm(x, mean, var, weight=weight, bias=bias, training=training,
                               momentum=momentum, epsilon=epsilon))


def reference_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=1,
                                   groups=32, epsilon=1e-5, momentum=0.9, training=False,
                                   input_bn=None):
    """The plain-Paddle sequence the fused op replaces (the benchmarks' and tests' baseline)."""
    if input_bn is not None:
        x = _input_bn_relu(x, input_bn, momentum, training)
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


_BN_NAMES = ("bn_weight", "bn_bias", "bn_mean", "bn_var")


@paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
def _check_args(backend, x, weight, bn, stride, groups, epsilon, momentum, training):
    """All backends: the op's contract; the custom ops also need float32 BN parameters and, on
    CPU, float32 activations. Sizes of -1 (unknown under to_static) pass."""
    check_tensor(OP, "x", x, rank=4)
    check_tensor(OP, "weight", weight, rank=4)
    check_int(OP, "stride", stride, choices=(1, 2))
    check_int(OP, "groups", groups, minimum=1)
    check_float(OP, "epsilon", epsilon)
    check_float(OP, "momentum", momentum)
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    if c == 0 or c_out == 0:
        raise ValueError(f"{OP}: 'x' and 'weight' need channels, got shapes {list(x.shape)} and "
                         f"{list(weight.shape)}")
    if h == 0 or w == 0:
        raise ValueError(f"{OP}: 'x' has an empty image, shape {list(x.shape)}")
    if training and n == 0:
        raise ValueError(f"{OP}: training needs a non-empty batch (batch statistics of nothing "
                         f"are undefined), 'x' has shape {list(x.shape)}")
    if c > 0 and c % groups != 0:
        raise ValueError(f"{OP}: input channels {c} are not divisible by groups={groups}")
    expected = [c // groups if c > 0 else weight.shape[1], 3, 3]
    if list(weight.shape[1:]) != expected or (c_out > 0 and c_out % groups != 0):
        raise ValueError(f"{OP}: 'weight' must have shape [C_out, {expected[0]}, 3, 3] with C_out "
                         f"divisible by groups={groups}, got {list(weight.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{OP}: 'x' and 'weight' must have the same dtype, got {x.dtype} and "
                        f"{weight.dtype}")
    if backend == "cpu" and x.dtype != paddle.float32:
        raise TypeError(f"{OP}: the CPU kernels support float32 only, got 'x' {x.dtype}; cast "
                        "with .astype('float32') or use backend='reference'")
    check_same_place(OP, x, [("weight", weight)])
    check_channel_vectors(OP, x, c_out, zip(_BN_NAMES, bn),
                          None if backend == "reference" else paddle.float32)


def _fold_input_bn(input_bn):
    weight, bias, mean, var, epsilon = input_bn
    scale = weight / paddle.sqrt(var + epsilon)
    return scale, bias - mean * scale


@paddle.jit.not_to_static  # plain Python: unknown sizes read as -1
def _check_input_bn(backend, x, input_bn):
    if not isinstance(input_bn, (tuple, list)) or len(input_bn) != 5:
        raise ValueError(f"{OP}: input_bn must be (weight, bias, mean, variance, epsilon), got "
                         f"{input_bn!r:.80}")
    check_channel_vectors(OP, x, x.shape[1],
                          zip(("in_bn_weight", "in_bn_bias", "in_bn_mean", "in_bn_var"),
                              input_bn[:4]), None if backend == "reference" else paddle.float32)
    check_float(OP, "input_bn epsilon", input_bn[4])


def _triton_forward(x, weight_folded, bias, stride, groups, in_scale_shift=None):
    from dpn_fast.kernels.grouped_conv_bn_relu import grouped_conv_bias_relu_forward
    n, c, h, w = x.shape
    c_out = weight_folded.shape[0]
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = paddle.empty([n, c_out, h_out, w_out], dtype=x.dtype)
    in_scale = in_shift = None
    if in_scale_shift is not None:
        in_scale, in_shift = (triton_arg(t.astype("float32")) for t in in_scale_shift)
    grouped_conv_bias_relu_forward(triton_arg(x), triton_arg(weight_folded.astype("float32")),
                                   triton_arg(bias.astype("float32")), triton_arg(out),
                                   n, c, h, w, c_out, groups, stride, in_scale, in_shift)
    return out


def _prologue_infer(x, weight, input_bn, bn, stride, groups):
    """The eval custom op with the input's BN + ReLU as its prologue, unchecked. input_bn, bn:
    (weight, bias, mean, variance, epsilon); both are folded inside the op."""
    return _extension.run_op("dpn_fast_bn_relu_grouped_conv_bn_relu_infer", x, weight,
                             *input_bn[:4], *bn[:4], stride, groups, float(input_bn[4]),
                             float(bn[4]))[0]


def grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var, stride=1, groups=32,
                         epsilon=1e-5, momentum=0.9, training=False, backend="auto",
                         input_bn=None):
    """relu(batch_norm(conv2d(x', weight, stride, padding=1, groups))), fused.

    x: [N, C, H, W]; weight: [C_out, C / groups, 3, 3]; bn_*: [C_out] (float32). In training,
    bn_mean / bn_var are the BN's running statistics and are updated in place.
    input_bn: None (x' = x) or (weight, bias, mean, variance, epsilon) of a BatchNorm over x's C
    channels followed by ReLU: x' = relu(batch_norm(x)). Eval applies it inside the fused op;
    training runs it as Paddle's batch_norm (batch statistics, `momentum`) before the fused op.
    backend: "auto", "cpu", "cuda", "triton" (eval only) or "reference" (plain Paddle).
    """
    check_tensor(OP, "x", x)
    backend = resolve_backend(backend, x, OP)
    _check_args(backend, x, weight, (bn_weight, bn_bias, bn_mean, bn_var), stride, groups,
                epsilon, momentum, training)
    if input_bn is not None:
        _check_input_bn(backend, x, input_bn)
    if backend == "reference":
        return reference_grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, bn_mean, bn_var,
                                              stride, groups, epsilon, momentum, training,
                                              input_bn)
    if input_bn is not None:
        if training:
            x = _input_bn_relu(x, input_bn, momentum, training)
    if backend == "triton":
        if training:
            raise NotImplementedError(f"{OP}: backend='triton' implements eval only; use "
                                      "backend='cuda' or 'reference' for training")
        w_folded, bias = fold_bn_into_conv(weight, bn_weight, bn_bias, bn_mean, bn_var, epsilon)
        in_scale_shift = _fold_input_bn(input_bn) if input_bn is not None else None
        return _triton_forward(x, w_folded, bias, stride, groups, in_scale_shift)
    if training:
        # The op updates bn_mean / bn_var in place; Paddle then marks them as needing gradients,
        # which would forbid the next in-place update: restore their flags.
        stop_gradient = bn_mean.stop_gradient, bn_var.stop_gradient
        out = _extension.run_op("dpn_fast_grouped_conv_bn_relu_train", x, weight, bn_weight,
                                bn_bias, bn_mean, bn_var, stride, groups, float(epsilon),
                                float(momentum))[0]
        bn_mean.stop_gradient, bn_var.stop_gradient = stop_gradient
        return out
    if input_bn is not None:
        return _prologue_infer(x, weight, input_bn, (bn_weight, bn_bias, bn_mean, bn_var, epsilon),
                               stride, groups)
    return _extension.run_op("dpn_fast_grouped_conv_bn_relu_infer", x, weight, bn_weight, bn_bias,
                             bn_mean, bn_var, stride, groups, float(epsilon))[0]


def _signature(tensor):
    return id(tensor), tensor.data_ptr(), tensor._inplace_version(), tuple(tensor.shape)


class GroupedConvBNReLUFolder:
    """Runs a (paddle.nn.Conv2D, BN layer) pair as conv + BN + ReLU fused, optionally preceded by
    the input's BN layer + ReLU, `input_bn`. A BN layer is a paddle.nn.BatchNorm2D or a
    paddle.nn.BatchNorm with act None or "relu" (PaddleClas's); the ReLUs are the op's.

    Eval reuses BN-folded weights/bias cached across calls. Refolding happens when
      - any of the five source tensors is replaced or changed by an in-place Paddle op
        (tracked by identity, data pointer and _inplace_version()),
      - a training-mode call ran since the last fold (an optimizer step may follow it), or
      - refold() is called.
    Paddle does not bump _inplace_version() for optimizer.step(), set_value() or
    set_state_dict() (verified with paddle 3.3), so after loading new values into a model that
    has already run in eval mode, call refold(). Under paddle.jit.to_static the BN is folded
    inside the graph on every call (a saved program must not capture a stale fold).

    With `input_bn`, eval (both BNs in eval mode) runs one op that folds both BNs on every call
    (no cache, so new parameters are always seen) and applies relu(input_bn(x)) as x is loaded;
    otherwise input_bn(x) runs as the Paddle layer first (batch statistics in training) and the
    rest is as without it.
    """

    def __init__(self, conv, bn, input_bn=None):
        if not isinstance(conv, paddle.nn.Conv2D):
            raise TypeError(f"{OP}: conv must be a paddle.nn.Conv2D, got {type(conv).__name__}")
        stride = [int(v) for v in conv._stride]
        if (list(conv._kernel_size) != [3, 3] or list(conv._updated_padding) != [1, 1]
                or list(conv._dilation) != [1, 1] or stride[0] != stride[1]
                or conv._data_format != "NCHW" or conv.bias is not None):
            raise ValueError(f"{OP}: conv must be a 3x3 NCHW Conv2D with padding 1, dilation 1, "
                             f"equal strides and bias_attr=False, got kernel {conv._kernel_size}, "
                             f"padding {conv._updated_padding}, dilation {conv._dilation}, "
                             f"stride {conv._stride}, data_format {conv._data_format}")
        check_bn_layer(OP, bn)
        if input_bn is not None:
            check_bn_layer(OP, input_bn, "input_bn")
            if list(input_bn.weight.shape) != [conv._in_channels]:
                raise ValueError(f"{OP}: input_bn has {input_bn.weight.shape[0]} channels, the "
                                 f"conv takes {conv._in_channels}")
        self.conv, self.bn, self.input_bn = conv, bn, input_bn
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

    def _input_bn_params(self):
        ibn = self.input_bn
        return ibn.weight, ibn.bias, ibn._mean, ibn._variance, ibn._epsilon

    def __call__(self, x, backend="auto"):
        bn = self.bn
        training = bn.training
        input_bn = None
        if self.input_bn is not None:
            if self.input_bn.training or training or backend == "reference":
                x = bn_layer_relu(self.input_bn, x)
            else:
                input_bn = self._input_bn_params()
        if training or not paddle.in_dynamic_mode() or input_bn is not None:
            if training:
                self._folded = None
            return grouped_conv_bn_relu(x, self.conv.weight, bn.weight, bn.bias, bn._mean,
                                        bn._variance, self.stride, self.groups, bn._epsilon,
                                        bn._momentum, training, backend, input_bn)
        backend = resolve_backend(backend, x, OP)
        _check_args(backend, x, self.conv.weight, self._sources()[1:], self.stride, self.groups,
                    bn._epsilon, bn._momentum, training)
        if backend == "reference":
            return reference_grouped_conv_bn_relu(x, self.conv.weight, bn.weight, bn.bias,
                                                  bn._mean, bn._variance, self.stride,
                                                  self.groups, bn._epsilon)
        w_folded, bias = self._folded_params()
        if backend == "triton":
            return _triton_forward(x, w_folded, bias, self.stride, self.groups)
        return _extension.run_op("dpn_fast_grouped_conv_bias_relu", x, w_folded, bias,
                                 self.stride, self.groups)[0]
