"""stem_conv_bn_relu_pool vs a float64 reference: the five DPN stems, odd shapes, thread counts
and ISA variants, in float32 and in bf16 (the compiled engine's: against the reference on the image
and weights rounded to bf16), to_static + jit.save + Paddle Inference (oneDNN on and off), and bad
inputs."""
import os
import sys
import textwrap

import numpy as np
import paddle
import pytest

from dpn_fast.models.config import CONFIGS
from dpn_fast.ops import stem_conv_bn_relu_pool
from dpn_fast.ops.stem_conv_bn_relu_pool import reference_stem_conv_bn_relu_pool, stem_launch
from utils import assert_matches_reference, random_bn, round_to_bf16

sys.path.insert(0, os.path.dirname(__file__))

NAMES = ("x", "weight", "bn_weight", "bn_bias", "bn_mean", "bn_var")


def dpn_stems():
    """(c_out, kernel) of the five models' stems (stride 2, 3 input channels)."""
    return sorted({(cfg.init_filters, cfg.stem_kernel) for cfg in CONFIGS.values()})


# (n, c, h, w, c_out, kernel, stride): odd and tiny images, batch 3, output channels not a
# multiple of the 8-channel register tile, a 5x5 kernel, stride 1 and 3, 4 input channels.
ODD_CASES = [
    (3, 3, 17, 23, 10, 3, 2),
    (2, 3, 9, 8, 64, 7, 2),
    (1, 3, 1, 1, 12, 7, 2),
    (1, 4, 12, 13, 13, 5, 1),
    (2, 3, 31, 40, 20, 7, 3),
    (1, 3, 225, 225, 96, 7, 2),
]


def make_inputs(rng, n, c, h, w, c_out, kernel):
    return {
        "x": rng.standard_normal((n, c, h, w)),
        "weight": rng.standard_normal((c_out, c, kernel, kernel)) / np.sqrt(c * kernel * kernel),
        **random_bn(rng, c_out),
    }


def as_tensors(arrays, dtype):
    return [paddle.to_tensor(arrays[k].astype(dtype)) for k in NAMES]


def check_against_reference(case, seed=0):
    n, c, h, w, c_out, kernel, stride = case
    arrays = make_inputs(np.random.default_rng(seed), n, c, h, w, c_out, kernel)
    ref64 = reference_stem_conv_bn_relu_pool(*as_tensors(arrays, "float64"), stride=stride)
    ref32 = reference_stem_conv_bn_relu_pool(*as_tensors(arrays, "float32"), stride=stride)
    with paddle.no_grad():
        fused = stem_conv_bn_relu_pool(*as_tensors(arrays, "float32"), stride=stride,
                                       backend="cpu")
    assert_matches_reference(fused.numpy(), ref64.numpy(), ref32.numpy(), name=f"stem {case}")


def check_bf16_against_reference(case, seed=0):
    """The bf16 stem against the reference on the image and weights rounded to bf16 (so both sum
    the same products), held to float32's bound: only the order of the sums may differ."""
    n, c, h, w, c_out, kernel, stride = case
    arrays = make_inputs(np.random.default_rng(seed), n, c, h, w, c_out, kernel)
    for name in ("x", "weight"):
        arrays[name] = round_to_bf16(arrays[name].astype("float32"))
    ref64 = reference_stem_conv_bn_relu_pool(*as_tensors(arrays, "float64"), stride=stride)
    ref32 = reference_stem_conv_bn_relu_pool(*as_tensors(arrays, "float32"), stride=stride)
    # The op rounds its float32 inputs itself: give it values that are not bf16 already.
    unrounded = make_inputs(np.random.default_rng(seed), n, c, h, w, c_out, kernel)
    tensors = as_tensors({**arrays, "x": unrounded["x"], "weight": unrounded["weight"]},
                         "float32")
    fused = stem_launch(*tensors, stride, 1e-5, bf16=True)
    assert_matches_reference(fused.numpy(), ref64.numpy(), ref32.numpy(),
                             name=f"bf16 stem {case}")


@pytest.mark.parametrize("check", [check_against_reference, check_bf16_against_reference],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("c_out,kernel", dpn_stems())
@pytest.mark.parametrize("n", [1, 3])
def test_dpn_stems(n, c_out, kernel, check):
    check((n, 3, 224, 224, c_out, kernel, 2))


@pytest.mark.parametrize("check", [check_against_reference, check_bf16_against_reference],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ODD_CASES)
def test_odd_shapes(case, check):
    check(case)


@pytest.mark.parametrize("variable,value", [
    ("DPN_FAST_NUM_THREADS", "1"), ("DPN_FAST_NUM_THREADS", "3"),
    ("DPN_FAST_CPU_ISA", "avx2"), ("DPN_FAST_CPU_ISA", "baseline"),  # this machine: AVX-512
])
def test_cpu_core_variants(variable, value):
    """Thread counts (rows and channel blocks split over threads) and the AVX2 and SSE tiles
    (8-channel tiles: other weight layouts and channel padding), which run bf16 as float32 on
    rounded values."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_stem_conv_bn_relu_pool import (ODD_CASES, check_against_reference,
                                                 check_bf16_against_reference)
        for case in ODD_CASES + [(1, 3, 224, 224, 64, 7, 2)]:
            check_against_reference(case)
            check_bf16_against_reference(case)
        print("ok")
    """)
    from test_grouped_conv_bn_relu import run_script
    run_script(script, dict(os.environ, **{variable: value}))


def test_reference_backend_is_the_paddle_sequence():
    arrays = make_inputs(np.random.default_rng(1), 1, 3, 20, 20, 16, 7)
    tensors = as_tensors(arrays, "float32")
    np.testing.assert_array_equal(
        stem_conv_bn_relu_pool(*tensors, backend="reference").numpy(),
        reference_stem_conv_bn_relu_pool(*tensors).numpy())


class Stem(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 16, 7, stride=2, padding=3, bias_attr=False)
        self.bn = paddle.nn.BatchNorm(16, act="relu")

    def forward(self, x):
        return stem_conv_bn_relu_pool(x, self.conv.weight, self.bn.weight, self.bn.bias,
                                      self.bn._mean, self.bn._variance)


def test_to_static_jit_save_and_predictor(tmp_path):
    from test_grouped_conv_bn_relu import check_saved_block
    stem = Stem()
    rng = np.random.default_rng(2)
    stem.bn._mean.set_value(rng.standard_normal(16).astype("float32"))
    stem.bn._variance.set_value(rng.uniform(0.5, 2, 16).astype("float32"))
    stem.eval()
    x = paddle.to_tensor(rng.standard_normal((2, 3, 29, 30)).astype("float32"))
    expected = reference_stem_conv_bn_relu_pool(x, stem.conv.weight, stem.bn.weight,
                                                stem.bn.bias, stem.bn._mean,
                                                stem.bn._variance).numpy()
    with paddle.no_grad():
        np.testing.assert_allclose(paddle.jit.to_static(stem, full_graph=True)(x).numpy(), expected,
                                   rtol=1e-5, atol=1e-5)
    check_saved_block(stem, x, expected, str(tmp_path / "stem"),
                      op="dpn_fast_stem_conv_bn_relu_pool")


def test_saved_with_dynamic_image_size(tmp_path):
    stem = Stem()
    stem.eval()
    path = str(tmp_path / "stem_dynamic")
    paddle.jit.save(stem, path, input_spec=[paddle.static.InputSpec([None, 3, None, None],
                                                                    "float32")])
    loaded = paddle.jit.load(path)
    rng = np.random.default_rng(6)
    for shape in [(1, 3, 33, 20), (2, 3, 64, 64)]:
        x = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
        expected = reference_stem_conv_bn_relu_pool(x, stem.conv.weight, stem.bn.weight,
                                                    stem.bn.bias, stem.bn._mean,
                                                    stem.bn._variance).numpy()
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def bad_call(backend="cpu", stride=2, **tensors):
    arrays = make_inputs(np.random.default_rng(3), 1, 3, 16, 16, 8, 7)
    args = dict(zip(NAMES, as_tensors(arrays, "float32")))
    args.update(tensors)
    with paddle.no_grad():
        return stem_conv_bn_relu_pool(*(args[k] for k in NAMES), stride=stride, backend=backend)


@pytest.mark.parametrize("overrides,error,message", [
    ({"x": paddle.randn([1, 4, 16, 16])}, ValueError,
     "for 3 input channels, 'x' has shape [1, 4, 16, 16]"),
    ({"x": paddle.randn([3, 16, 16])}, ValueError, "'x' must have rank 4"),
    ({"x": paddle.zeros([1, 3, 0, 16])}, ValueError, "empty image"),
    ({"x": np.zeros((1, 3, 16, 16), "float32")}, TypeError, "'x' must be a paddle.Tensor"),
    ({"weight": paddle.randn([8, 3, 6, 6])}, ValueError, "square and odd"),
    ({"weight": paddle.randn([8, 3, 7, 5])}, ValueError, "square and odd"),
    ({"weight": paddle.randn([8, 3, 13, 13])}, ValueError, "at most 11"),
    ({"x": paddle.randn([1, 3, 16, 16]).astype("float64"),
      "weight": paddle.randn([8, 3, 7, 7]).astype("float64")}, TypeError, "float32 only"),
    ({"weight": paddle.randn([8, 3, 7, 7]).astype("float64")}, TypeError, "same dtype"),
    ({"bn_var": paddle.rand([4])}, ValueError, "'bn_var' must have shape [8]"),
    ({"bn_var": paddle.rand([8]).astype("float64")}, TypeError, "'bn_var' must be"),
    ({"stride": 0}, ValueError, "'stride' must be >= 1"),
    ({"stride": 9}, ValueError, "'stride' must be in [1, 7]"),
    ({"stride": 2.5}, TypeError, "'stride' must be an int"),
    ({"backend": "triton"}, ValueError, "backend must be"),
])
def test_bad_inputs(overrides, error, message):
    with pytest.raises(error) as info:
        bad_call(**overrides)
    assert message in str(info.value) and "stem_conv_bn_relu_pool" in str(info.value)


def test_strided_views_and_empty_batch():
    """Non-contiguous views give the result of their copies; a batch of no images, an empty
    output."""
    arrays = make_inputs(np.random.default_rng(5), 2, 3, 17, 15, 8, 7)
    args = dict(zip(NAMES, as_tensors(arrays, "float32")))
    view = args["x"].transpose([0, 1, 3, 2])
    assert not view.is_contiguous()
    expected = bad_call(x=view.contiguous(), weight=args["weight"], bn_weight=args["bn_weight"],
                        bn_bias=args["bn_bias"], bn_mean=args["bn_mean"], bn_var=args["bn_var"])
    out = bad_call(x=view, weight=args["weight"], bn_weight=args["bn_weight"],
                   bn_bias=args["bn_bias"], bn_mean=args["bn_mean"], bn_var=args["bn_var"])
    np.testing.assert_array_equal(out.numpy(), expected.numpy())
    assert bad_call(x=paddle.zeros([0, 3, 16, 16])).shape == [0, 8, 4, 4]


def test_no_backward_is_a_clear_error():
    arrays = make_inputs(np.random.default_rng(4), 1, 3, 16, 16, 8, 7)
    tensors = as_tensors(arrays, "float32")
    tensors[1].stop_gradient = False
    with pytest.raises(RuntimeError, match="no backward"):
        stem_conv_bn_relu_pool(*tensors)
