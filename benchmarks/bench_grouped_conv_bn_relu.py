"""Paddle conv2d + BatchNorm + ReLU vs the fused grouped_conv_bn_relu backends at DPN92's and
DPN68's shapes (3-24 and 4-32 channels per group; DPN98/107/131 have DPN68's widths per group).

    pytest benchmarks/bench_grouped_conv_bn_relu.py --benchmark-group-by=group

Threads: the fused CPU op uses Paddle's CPU thread setting (FLAGS_paddle_num_threads, default 1)
unless DPN_FAST_NUM_THREADS says otherwise, so by default both sides run on 1 thread.
"""
import numpy as np
import paddle
import pytest

from dpn_fast import _extension
from dpn_fast.models.config import block_shapes
from dpn_fast.ops import GroupedConvBNReLUFolder, grouped_conv_bn_relu
from dpn_fast.ops.grouped_conv_bn_relu import reference_grouped_conv_bn_relu


def grouped_conv_shapes(model):
    """(channels, groups, stride, in_hw) of a model's distinct grouped convs (stage order)."""
    seen = []
    for b in block_shapes(model):
        key = (b.bottleneck, b.groups, b.stride, b.in_hw)
        if key not in seen:
            seen.append(key)
    return seen


def fused_backends():
    backends = ["cpu"]
    if paddle.device.is_compiled_with_cuda() and _extension.BUILT_WITH_CUDA:
        backends.append("cuda")
    return backends


def make_layers(c, groups, stride, n, hw, training):
    rng = np.random.default_rng(0)
    conv = paddle.nn.Conv2D(c, c, 3, stride=stride, padding=1, groups=groups, bias_attr=False)
    bn = paddle.nn.BatchNorm(c, act="relu")
    with paddle.no_grad():
        bn._mean.set_value(0.1 * rng.standard_normal(c).astype("float32"))
        bn._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    bn.train() if training else bn.eval()
    x = paddle.to_tensor(rng.standard_normal((n, c, hw, hw)).astype("float32"))
    return conv, bn, x


CASES = [(n,) + shape for n in (1, 8) for model in ("DPN92", "DPN68")
         for shape in grouped_conv_shapes(model)]
IDS = [f"n{n}-c{c}-g{g}-s{s}-hw{hw}" for n, c, g, s, hw in CASES]


@pytest.mark.parametrize("impl", ["reference"] + fused_backends() + ["cpu-cached-fold"])
@pytest.mark.parametrize("n,c,groups,stride,hw", CASES, ids=IDS)
def test_eval(benchmark, n, c, groups, stride, hw, impl):
    conv, bn, x = make_layers(c, groups, stride, n, hw, training=False)
    args = (x, conv.weight, bn.weight, bn.bias, bn._mean, bn._variance)
    if impl == "reference":
        def fn():
            return reference_grouped_conv_bn_relu(*args, stride=stride, groups=groups)
    elif impl == "cpu-cached-fold":
        folder = GroupedConvBNReLUFolder(conv, bn)

        def fn():
            return folder(x)
    else:
        def fn():
            return grouped_conv_bn_relu(*args, stride=stride, groups=groups, backend=impl)
    benchmark.group = f"eval n={n} C={c} g={groups} stride={stride} {hw}x{hw}"
    with paddle.no_grad():
        benchmark.pedantic(fn, warmup_rounds=3, rounds=30, iterations=3)


def make_input_bn(c):
    rng = np.random.default_rng(1)
    input_bn = paddle.nn.BatchNorm(c, act="relu")
    with paddle.no_grad():
        input_bn.bias.set_value(0.2 * rng.standard_normal(c).astype("float32"))
        input_bn._mean.set_value(0.1 * rng.standard_normal(c).astype("float32"))
        input_bn._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    input_bn.eval()
    return input_bn


@pytest.mark.parametrize("impl", ["reference"] + fused_backends() + ["paddle-bn-then-cpu"])
@pytest.mark.parametrize("n,c,groups,stride,hw", CASES, ids=IDS)
def test_eval_with_input_bn(benchmark, n, c, groups, stride, hw, impl):
    """relu(bn(conv(relu(input_bn(x))))): Paddle's BN+ReLU, conv2d, BN, ReLU ("reference") vs the
    fused op with the input BN+ReLU as its prologue, and vs Paddle's BN+ReLU layer followed by
    the fused op without prologue (the DPN blocks before the prologue existed)."""
    conv, bn, x = make_layers(c, groups, stride, n, hw, training=False)
    input_bn = make_input_bn(c)
    args = (x, conv.weight, bn.weight, bn.bias, bn._mean, bn._variance)
    in_params = (input_bn.weight, input_bn.bias, input_bn._mean, input_bn._variance,
                 input_bn._epsilon)
    if impl == "paddle-bn-then-cpu":
        def fn():
            return grouped_conv_bn_relu(input_bn(x), *args[1:], stride=stride, groups=groups,
                                        backend="cpu")
    else:
        def fn():
            return grouped_conv_bn_relu(*args, stride=stride, groups=groups, backend=impl,
                                        input_bn=in_params)
    benchmark.group = f"eval+input_bn n={n} C={c} g={groups} stride={stride} {hw}x{hw}"
    with paddle.no_grad():
        benchmark.pedantic(fn, warmup_rounds=3, rounds=30, iterations=3)


@pytest.mark.parametrize("impl", ["reference"] + fused_backends())
@pytest.mark.parametrize("n,c,groups,stride,hw", CASES, ids=IDS)
def test_train_step(benchmark, n, c, groups, stride, hw, impl):
    """Forward + backward (x, weight, BN affine) with batch statistics."""
    conv, bn, x = make_layers(c, groups, stride, n, hw, training=True)
    x.stop_gradient = False
    args = (x, conv.weight, bn.weight, bn.bias, bn._mean, bn._variance)

    def fn():
        if impl == "reference":
            out = reference_grouped_conv_bn_relu(*args, stride=stride, groups=groups, training=True)
        else:
            out = grouped_conv_bn_relu(*args, stride=stride, groups=groups, training=True,
                                       backend=impl)
        out.sum().backward()

    benchmark.group = f"train n={n} C={c} g={groups} stride={stride} {hw}x{hw}"
    benchmark.pedantic(fn, warmup_rounds=2, rounds=10, iterations=1)
