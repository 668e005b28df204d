"""grouped_conv_bn_relu vs a float64 reference: eval, training (outputs, running statistics,
gradients), the input BN+ReLU prologue (eval), the BN-folding cache, to_static, jit.save/load,
bad inputs and the Triton kernel."""
import os
import sys
import textwrap

import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast.models.config import CONFIGS, block_shapes
from dpn_fast.ops import GroupedConvBNReLUFolder, grouped_conv_bn_relu
from dpn_fast.ops.grouped_conv_bn_relu import reference_grouped_conv_bn_relu
from utils import ATOL, assert_matches_reference, max_abs_err, random_bn, run_script

sys.path.insert(0, os.path.dirname(__file__))


def dpn_conv_shapes():
    """(model, channels, groups, stride, in_hw) of every distinct grouped conv in the five DPNs."""
    seen = {}
    for model in CONFIGS:
        for b in block_shapes(model):
            seen.setdefault((b.bottleneck, b.groups, b.stride, b.in_hw), model)
    return [(model,) + key for key, model in seen.items()]


def dpn_cases():
    cases = []
    for model, c, groups, stride, hw in dpn_conv_shapes():
        for n in (1, 3):
            heavy = not (model == "DPN92" and n == 1)
            case = (n, c, c, hw, hw, groups, stride)
            cases.append(pytest.param(*case, marks=[pytest.mark.slow] if heavy else [],
                                      id=f"{model}-c{c}-g{groups}-s{stride}-hw{hw}-n{n}"))
    return cases


# (n, c, c_out, h, w, groups, stride): odd H/W, batch 3, 3 channels per group, channels per group
# not a multiple of 4 or 8, C_out != C, 1x1 and tiny planes.
ODD_CASES = [
    (3, 96, 96, 9, 11, 32, 1),
    (3, 96, 96, 9, 11, 32, 2),
    (3, 40, 40, 7, 5, 8, 2),
    (1, 15, 20, 6, 13, 5, 1),
    (2, 14, 14, 1, 1, 2, 1),
    (2, 14, 28, 2, 3, 2, 2),
    (1, 64, 64, 23, 17, 16, 2),
    (2, 12, 12, 5, 37, 4, 2),  # rows of several vectors with a partial one (AVX-512: 16 floats)
]


def make_inputs(rng, n, c, c_out, h, w, groups):
    fan_in = 9 * c // groups
    return {
        "x": rng.standard_normal((n, c, h, w)),
        "weight": rng.standard_normal((c_out, c // groups, 3, 3)) / np.sqrt(fan_in),
        **random_bn(rng, c_out),
    }


def as_tensors(arrays, dtype, requires_grad=False):
    tensors = {k: paddle.to_tensor(v.astype(dtype)) for k, v in arrays.items()}
    for k in ("x", "weight", "bn_weight", "bn_bias"):
        tensors[k].stop_gradient = not requires_grad
    return tensors


def poison_allocator(*shapes):
    """NaN-fills blocks that Paddle's allocator hands to the next allocations of these sizes
    (freed blocks are reused), so an output element a kernel fails to write shows up as NaN.
    The ops' own CPU outputs start as NaN anyway (DPN_FAST_POISON_OUTPUTS, tests/conftest.py)."""
    blocks = [paddle.full(shape, float("nan"), dtype="float32") for shape in shapes]
    del blocks


def run(arrays, dtype, stride, groups, training, backend, grad_out=None):
    """Output (and running stats, gradients when grad_out is given) as float64 numpy."""
    t = as_tensors(arrays, dtype, requires_grad=grad_out is not None)
    args = (t["x"], t["weight"], t["bn_weight"], t["bn_bias"], t["bn_mean"], t["bn_var"])
    n, _, h, w = arrays["x"].shape
    c_out = arrays["weight"].shape[0]
    out_shape = [n, c_out, (h - 1) // stride + 1, (w - 1) // stride + 1]
    poison_allocator(out_shape, out_shape, [c_out], [c_out])
    if backend == "reference":
        out = reference_grouped_conv_bn_relu(*args, stride=stride, groups=groups,
                                             training=training)
    else:
        out = grouped_conv_bn_relu(*args, stride=stride, groups=groups, training=training,
                                   backend=backend)
    result = {"out": out.numpy().astype(np.float64),
              "bn_mean": t["bn_mean"].numpy().astype(np.float64),
              "bn_var": t["bn_var"].numpy().astype(np.float64)}
    if grad_out is not None:
        names = ("x", "weight", "bn_weight", "bn_bias")
        poison_allocator(out_shape, arrays["x"].shape, arrays["weight"].shape, [c_out], [c_out])
        grads = paddle.grad(out, [t[k] for k in names], paddle.to_tensor(grad_out.astype(dtype)))
        result.update({"d" + k: g.numpy().astype(np.float64) for k, g in zip(names, grads)})
    return result


def check_against_reference(case, training, with_grads=False, seed=0):
    n, c, c_out, h, w, groups, stride = case
    rng = np.random.default_rng(seed)
    arrays = make_inputs(rng, n, c, c_out, h, w, groups)
    grad_out = None
    if with_grads:
        h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
        grad_out = rng.standard_normal((n, c_out, h_out, w_out))
    ref64 = run(arrays, "float64", stride, groups, training, "reference", grad_out)
    ref32 = run(arrays, "float32", stride, groups, training, "reference", grad_out)
    fused = run(arrays, "float32", stride, groups, training, "cpu", grad_out)
    for name in ref64:
        assert_matches_reference(fused[name], ref64[name], ref32[name], "float32", name=name)


@pytest.mark.parametrize("n,c,c_out,h,w,groups,stride", dpn_cases())
def test_eval_dpn_shapes(n, c, c_out, h, w, groups, stride):
    check_against_reference((n, c, c_out, h, w, groups, stride), training=False)


@pytest.mark.parametrize("case", ODD_CASES)
def test_eval_odd_shapes(case):
    check_against_reference(case, training=False)


@pytest.mark.parametrize("case", ODD_CASES)
def test_training_outputs_running_stats_and_grads(case):
    check_against_reference(case, training=True, with_grads=True)


def test_training_grads_of_near_constant_channels():
    """Two samples a channel, 100 +- 0.1: y = conv(x) = x exactly (centre tap 1, 1x1 image), but
    float32 cannot hold the batch mean. A backward centred on the rounded mean had 45x the atol
    in dx here, as has Paddle's float32 batch_norm, so the bound is the atol alone, not 2x
    Paddle's error (docs/pitfalls.md)."""
    rng = np.random.default_rng(12)
    c = 8
    base = np.float32(100) + rng.integers(0, 1000, c).astype(np.float32) * np.float32(2 ** -16)
    x = np.stack([base + np.float32(0.1), base - np.float32(0.1) + np.float32(2 ** -17)])
    mean = x.astype(np.float64).mean(0)
    assert (mean.astype(np.float32) != mean).all()
    weight = np.zeros((c, 1, 3, 3))
    weight[:, 0, 1, 1] = 1.0
    arrays = {"x": x.astype(np.float64).reshape(2, c, 1, 1), "weight": weight, **random_bn(rng, c)}
    grad_out = rng.standard_normal((2, c, 1, 1))
    ref64 = run(arrays, "float64", 1, c, True, "reference", grad_out)
    fused = run(arrays, "float32", 1, c, True, "cpu", grad_out)
    for name in ("dx", "dbn_weight"):
        bound = ATOL["float32"] * max(1.0, float(np.abs(ref64[name]).max()))
        assert max_abs_err(fused[name], ref64[name]) <= bound, name


@pytest.mark.parametrize("c,hw,stride", [(96, 56, 1), (384, 28, 2), (768, 7, 1)])
def test_training_dpn92_shapes(c, hw, stride):
    check_against_reference((1, c, c, hw, hw, 32, stride), training=True, with_grads=True)


@pytest.mark.slow
@pytest.mark.parametrize("c,hw,stride", [(192, 56, 2), (192, 28, 1), (384, 14, 1), (768, 14, 2)])
def test_training_dpn92_shapes_batch3(c, hw, stride):
    check_against_reference((3, c, c, hw, hw, 32, stride), training=True, with_grads=True)


def make_input_bn(rng, c):
    """Raw parameters of the input's BN; shifts mostly > 0, so a padding wrongly run through
    relu(x * scale + shift) would show."""
    return {"in_bn_weight": rng.uniform(0.5, 1.5, c),
            "in_bn_bias": 0.3 + 0.5 * rng.standard_normal(c),
            "in_bn_mean": 0.2 * rng.standard_normal(c),
            "in_bn_var": rng.uniform(0.5, 2.0, c)}


def run_prologue(arrays, dtype, stride, groups, backend):
    """Eval output of relu(bn(conv(relu(in_bn(x))))) as float64 numpy."""
    t = {k: paddle.to_tensor(v.astype(dtype)) for k, v in arrays.items()}
    input_bn = (t["in_bn_weight"], t["in_bn_bias"], t["in_bn_mean"], t["in_bn_var"], 1e-5)
    n, _, h, w = arrays["x"].shape
    out_shape = [n, arrays["weight"].shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1]
    poison_allocator(out_shape, out_shape, arrays["x"].shape)
    out = grouped_conv_bn_relu(t["x"], t["weight"], t["bn_weight"], t["bn_bias"], t["bn_mean"],
                               t["bn_var"], stride=stride, groups=groups, backend=backend,
                               input_bn=input_bn)
    return out.numpy().astype(np.float64)


def check_prologue_against_reference(case, seed=0):
    n, c, c_out, h, w, groups, stride = case
    rng = np.random.default_rng(seed)
    arrays = {**make_inputs(rng, n, c, c_out, h, w, groups), **make_input_bn(rng, c)}
    ref64 = run_prologue(arrays, "float64", stride, groups, "reference")
    ref32 = run_prologue(arrays, "float32", stride, groups, "reference")
    fused = run_prologue(arrays, "float32", stride, groups, "cpu")
    assert_matches_reference(fused, ref64, ref32, "float32")


@pytest.mark.parametrize("n,c,c_out,h,w,groups,stride", dpn_cases())
def test_prologue_eval_dpn_shapes(n, c, c_out, h, w, groups, stride):
    check_prologue_against_reference((n, c, c_out, h, w, groups, stride))


@pytest.mark.parametrize("case", ODD_CASES)
def test_prologue_eval_odd_shapes(case):
    check_prologue_against_reference(case)


def test_prologue_reference_is_the_paddle_sequence():
    """backend='reference' with input_bn = Paddle's eval BatchNorm(act='relu') layer first."""
    conv, bn = make_layers(32, 8, 1)
    _, input_bn = make_layers(32, 8, 1, seed=1)
    input_bn.eval()
    bn.eval()
    x = paddle.to_tensor(np.random.default_rng(8).standard_normal((2, 32, 6, 6)).astype("float32"))
    params = (input_bn.weight, input_bn.bias, input_bn._mean, input_bn._variance, 1e-5)
    out = grouped_conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn._mean, bn._variance,
                               groups=8, backend="reference", input_bn=params)
    np.testing.assert_allclose(out.numpy(), bn(conv(input_bn(x))).numpy(), rtol=1e-6, atol=1e-6)


def make_layers(c, groups, stride, seed=0):
    paddle.seed(seed)
    conv = paddle.nn.Conv2D(c, c, 3, stride=stride, padding=1, groups=groups, bias_attr=False)
    bn = paddle.nn.BatchNorm(c, act="relu")
    rng = np.random.default_rng(seed)
    with paddle.no_grad():
        bn.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
        bn.bias.set_value(0.5 * rng.standard_normal(c).astype("float32"))
        bn._mean.set_value(0.2 * rng.standard_normal(c).astype("float32"))
        bn._variance.set_value(rng.uniform(0.5, 2.0, c).astype("float32"))
    return conv, bn


def test_running_stats_follow_paddle_batchnorm():
    """Two training steps against paddle.nn.BatchNorm itself (biased batch variance, momentum)."""
    conv, bn = make_layers(64, 16, 2)
    conv2, bn2 = make_layers(64, 16, 2)
    folder = GroupedConvBNReLUFolder(conv2, bn2)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x = paddle.to_tensor(rng.standard_normal((3, 64, 9, 9)).astype("float32"))
        expected = bn(conv(x)).numpy()
        np.testing.assert_allclose(folder(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn2._mean.numpy(), bn._mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn2._variance.numpy(), bn._variance.numpy(), rtol=1e-6, atol=1e-6)


def eval_expected(conv, bn, x):
    bn.eval()
    return bn(conv(x)).numpy()


def test_folder_refolds_after_optimizer_step():
    conv, bn = make_layers(32, 8, 1)
    folder = GroupedConvBNReLUFolder(conv, bn)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((2, 32, 8, 8)).astype("float32"))
    bn.eval()
    before = folder(x).numpy()
    np.testing.assert_allclose(before, eval_expected(conv, bn, x), rtol=1e-5, atol=1e-5)
    opt = paddle.optimizer.Momentum(learning_rate=0.5,
                                    parameters=conv.parameters() + bn.parameters())
    bn.train()
    folder(x).square().mean().backward()
    opt.step()
    bn.eval()
    after = folder(x).numpy()
    np.testing.assert_allclose(after, eval_expected(conv, bn, x), rtol=1e-5, atol=1e-5)
    assert np.abs(after - before).max() > 1e-3


def test_folder_refolds_after_set_state_dict_and_inplace_edit():
    conv, bn = make_layers(32, 8, 2)
    folder = GroupedConvBNReLUFolder(conv, bn)
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((1, 32, 9, 9)).astype("float32"))
    bn.eval()
    cached = folder(x).numpy()
    np.testing.assert_allclose(folder(x).numpy(), cached)  # served from the cache
    new_conv, new_bn = make_layers(32, 8, 2, seed=7)
    conv.set_state_dict(new_conv.state_dict())
    bn.set_state_dict(new_bn.state_dict())
    folder.refold()  # set_state_dict changes no version counter (see GroupedConvBNReLUFolder)
    np.testing.assert_allclose(folder(x).numpy(), eval_expected(conv, bn, x), rtol=1e-5, atol=1e-5)
    with paddle.no_grad():
        bn.weight.scale_(-1.0)  # in-place Paddle op: bumps _inplace_version(), refolds by itself
    np.testing.assert_allclose(folder(x).numpy(), eval_expected(conv, bn, x), rtol=1e-5, atol=1e-5)


class Block(paddle.nn.Layer):
    def __init__(self, c, groups, stride):
        super().__init__()
        self.conv, self.bn = make_layers(c, groups, stride)
        self.fused = GroupedConvBNReLUFolder(self.conv, self.bn)

    def forward(self, x):
        return self.fused(x)


def check_to_static_tracks_eager(block_class, rng, bn_layers):
    """A to_static copy of block_class(32, 8, 2) matches the eager one across train/eval switches:
    outputs, and the running statistics of `bn_layers`."""
    x = paddle.to_tensor(rng.standard_normal((2, 32, 10, 10)).astype("float32"))
    eager, static = block_class(32, 8, 2), block_class(32, 8, 2)
    static.set_state_dict(eager.state_dict())
    static = paddle.jit.to_static(static, full_graph=True)
    for mode in ("train", "eval", "train", "eval"):
        getattr(eager, mode)()
        getattr(static, mode)()
        np.testing.assert_allclose(static(x).numpy(), eager(x).numpy(), rtol=1e-5, atol=1e-5)
    for layer in bn_layers:
        for stat in ("_mean", "_variance"):
            np.testing.assert_allclose(getattr(getattr(static, layer), stat).numpy(),
                                       getattr(getattr(eager, layer), stat).numpy(),
                                       rtol=1e-6, atol=1e-6)


def test_to_static_eval_and_train():
    check_to_static_tracks_eager(Block, np.random.default_rng(4), ["bn"])


def check_saved_block(block, x, expected, path, op=None):
    """jit.save + jit.load, and Paddle Inference with oneDNN on (its CPU default) and off."""
    from dpn_fast.inference import create_predictor
    spec = paddle.static.InputSpec([None] + list(x.shape[1:]), "float32")
    paddle.jit.save(block, path, input_spec=[spec])
    if op:
        assert op in open(path + ".json").read()
    loaded = paddle.jit.load(path)
    loaded.eval()
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    for onednn in (True, False):
        # The predictor's own handles: run_predictor takes a DPN's images, not a layer's input.
        predictor = create_predictor(path, use_onednn=onednn)
        predictor.get_input_handle(predictor.get_input_names()[0]).copy_from_cpu(x.numpy())
        predictor.run()
        out = predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_jit_save_load(tmp_path):
    block = Block(32, 8, 1)
    block.eval()
    x = paddle.to_tensor(np.random.default_rng(5).standard_normal((1, 32, 7, 7)).astype("float32"))
    expected = eval_expected(block.conv, block.bn, x)
    check_saved_block(block, x, expected, str(tmp_path / "block"))


def bad_call(**overrides):
    rng = np.random.default_rng(6)
    t = as_tensors(make_inputs(rng, 1, 64, 64, 8, 8, 32), "float32")
    t.update(overrides.pop("tensors", {}))
    kwargs = {"stride": 1, "groups": 32, "backend": "cpu"}
    kwargs.update(overrides)
    return grouped_conv_bn_relu(t["x"], t["weight"], t["bn_weight"], t["bn_bias"], t["bn_mean"],
                                t["bn_var"], **kwargs)


@pytest.mark.parametrize("overrides,error,message", [
    ({"groups": 24}, ValueError, "not divisible by groups"),
    ({"groups": 0}, ValueError, "'groups' must be >= 1"),
    ({"groups": 2.5}, TypeError, "'groups' must be an int"),
    ({"stride": 3}, ValueError, "'stride' must be one of (1, 2)"),
    ({"stride": "1"}, TypeError, "'stride' must be an int"),
    ({"epsilon": "1e-5"}, TypeError, "'epsilon' must be a number"),
    ({"tensors": {"weight": paddle.randn([64, 4, 3, 3])}}, ValueError, "'weight' must have shape"),
    ({"tensors": {"weight": paddle.randn([64, 2, 5, 5])}}, ValueError, "'weight' must have shape"),
    ({"tensors": {"weight": paddle.randn([0, 2, 3, 3])}}, ValueError, "need channels"),
    ({"tensors": {"x": paddle.randn([1, 64, 8, 8]).astype("float64")}}, TypeError, "same dtype"),
    ({"tensors": {"x": paddle.randn([1, 64, 8, 8]).astype("float16"),
                  "weight": paddle.randn([64, 2, 3, 3]).astype("float16")}}, TypeError,
     "float32 only"),
    ({"tensors": {"x": paddle.randn([1, 64, 8, 8]).astype("float64"),
                  "weight": paddle.randn([64, 2, 3, 3]).astype("float64")}}, TypeError,
     "backend='reference'"),
    ({"tensors": {"x": np.zeros((1, 64, 8, 8), "float32")}}, TypeError,
     "'x' must be a paddle.Tensor"),
    ({"tensors": {"bn_mean": paddle.randn([32])}}, ValueError, "bn_mean' must have shape [64]"),
    ({"tensors": {"bn_var": paddle.rand([64, 1])}}, ValueError, "bn_var' must have shape [64]"),
    ({"tensors": {"bn_var": paddle.rand([64]).astype("float64")}}, TypeError, "'bn_var' must be"),
    ({"tensors": {"x": paddle.randn([64, 8, 8])}}, ValueError, "'x' must have rank 4"),
    ({"tensors": {"x": paddle.randn([1, 64, 0, 8])}}, ValueError, "empty image"),
    ({"backend": "cuda"}, ValueError, "needs GPU tensors"),
])
@pytest.mark.parametrize("training", [False, True])
def test_bad_inputs(overrides, error, message, training):
    with pytest.raises(error) as info:
        bad_call(training=training, **overrides)
    assert message in str(info.value) and "grouped_conv_bn_relu" in str(info.value)


def test_empty_batch():
    """Eval: a batch of no images gives an empty output (the CPU core is not called: it splits
    work by batch x groups). Training: a clear error (batch statistics of nothing)."""
    x = paddle.zeros([0, 64, 8, 8])
    out = bad_call(tensors={"x": x}, stride=2)
    assert out.shape == [0, 64, 4, 4]
    with pytest.raises(ValueError, match="non-empty batch"):
        bad_call(tensors={"x": x}, training=True)
    t = as_tensors(make_inputs(np.random.default_rng(7), 1, 64, 64, 8, 8, 32), "float32")
    out = dpn_fast._extension.run_op("dpn_fast_grouped_conv_bn_relu_infer", x, t["weight"],
                                     t["bn_weight"], t["bn_bias"], t["bn_mean"], t["bn_var"], 1,
                                     32, 1e-5)[0]
    assert out.shape == [0, 64, 8, 8]


def test_strided_views_are_handled():
    """Non-contiguous views (a transpose, a channel slice) give the result of their copies."""
    rng = np.random.default_rng(8)
    t = as_tensors(make_inputs(rng, 2, 64, 64, 9, 7, 32), "float32")
    wide = paddle.to_tensor(rng.standard_normal((2, 96, 7, 9)).astype("float32"))
    for view in (t["x"].transpose([0, 1, 3, 2]), wide[:, 16:80]):
        assert not view.is_contiguous()
        out = bad_call(tensors={"x": view})
        expected = bad_call(tensors={"x": view.contiguous()})
        np.testing.assert_array_equal(out.numpy(), expected.numpy())


def test_bad_kernel_size_in_op():
    """The C++ checks too (the Python checks are skipped by a direct op call)."""
    t = as_tensors(make_inputs(np.random.default_rng(7), 1, 64, 64, 8, 8, 32), "float32")
    with pytest.raises((ValueError, RuntimeError, OSError), match="kernel must be 3x3"):
        dpn_fast._extension.run_op("dpn_fast_grouped_conv_bn_relu_infer", t["x"],
                                   paddle.randn([64, 2, 5, 5]), t["bn_weight"], t["bn_bias"],
                                   t["bn_mean"], t["bn_var"], 1, 32, 1e-5)


def test_folder_rejects_unsupported_layers():
    with pytest.raises(ValueError, match="3x3 NCHW Conv2D"):
        GroupedConvBNReLUFolder(paddle.nn.Conv2D(8, 8, 3, padding=2, groups=2, bias_attr=False),
                                paddle.nn.BatchNorm(8, act="relu"))
    with pytest.raises(TypeError, match="act='sigmoid'"):
        GroupedConvBNReLUFolder(paddle.nn.Conv2D(8, 8, 3, padding=1, groups=2, bias_attr=False),
                                paddle.nn.BatchNorm(8, act="sigmoid"))


@pytest.mark.filterwarnings("ignore:When training, we now always track")  # BatchNorm2D's
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("with_input_bn", [False, True])
def test_folder_takes_batchnorm2d(training, with_input_bn):
    """BatchNorm2D layers (no act: the ReLUs are the op's), against float64."""
    c, groups, stride = 32, 8, 2
    conv, bn = make_layers(c, groups, stride)
    input_bn = make_layers(c, groups, stride, seed=1)[1]
    x = np.random.default_rng(12).standard_normal((2, c, 9, 9))

    def reference(dtype):
        t = lambda a: paddle.to_tensor(np.asarray(a, dtype))  # noqa: E731

        def params(layer):
            return [t(p.numpy()) for p in (layer.weight, layer.bias, layer._mean, layer._variance)]

        return reference_grouped_conv_bn_relu(
            t(x), t(conv.weight.numpy()), *params(bn), stride=stride, groups=groups,
            training=training, input_bn=(*params(input_bn), 1e-5) if with_input_bn else None
        ).numpy()

    ref64, ref32 = reference("float64"), reference("float32")
    bn2d, input_bn2d = paddle.nn.BatchNorm2D(c), paddle.nn.BatchNorm2D(c)
    bn2d.set_state_dict(bn.state_dict())
    input_bn2d.set_state_dict(input_bn.state_dict())
    for layer in (bn2d, input_bn2d):
        layer.train() if training else layer.eval()
    folder = GroupedConvBNReLUFolder(conv, bn2d, input_bn=input_bn2d if with_input_bn else None)
    out = folder(paddle.to_tensor(x.astype("float32")))
    assert_matches_reference(out.numpy(), ref64, ref32)


class PrologueBlock(paddle.nn.Layer):
    """input BN(act='relu') -> grouped conv -> BN(act='relu'), run through the Folder."""

    def __init__(self, c, groups, stride, seed=0):
        super().__init__()
        _, self.input_bn = make_layers(c, groups, stride, seed=seed + 1)
        self.conv, self.bn = make_layers(c, groups, stride, seed=seed)
        self.fused = GroupedConvBNReLUFolder(self.conv, self.bn, input_bn=self.input_bn)

    def forward(self, x):
        return self.fused(x)

    def unfused(self, x):
        return self.bn(self.conv(self.input_bn(x)))


def test_prologue_folder_eval_follows_new_parameters_and_training_is_unchanged():
    rng = np.random.default_rng(9)
    x = paddle.to_tensor(rng.standard_normal((2, 32, 9, 9)).astype("float32"))
    block, twin = PrologueBlock(32, 8, 2), PrologueBlock(32, 8, 2)
    block.eval()
    np.testing.assert_allclose(block(x).numpy(), block.unfused(x).numpy(), rtol=1e-5, atol=1e-5)
    # Both BNs are folded on every call: set_state_dict needs no refold().
    block.set_state_dict(PrologueBlock(32, 8, 2, seed=5).state_dict())
    np.testing.assert_allclose(block(x).numpy(), block.unfused(x).numpy(), rtol=1e-5, atol=1e-5)
    # Training: Paddle's BN layer (batch statistics) then the fused training op, as before.
    block.set_state_dict(twin.state_dict())
    block.train()
    twin.train()
    np.testing.assert_array_equal(
        block(x).numpy(), GroupedConvBNReLUFolder(twin.conv, twin.bn)(twin.input_bn(x)).numpy())
    for name in ("_mean", "_variance"):
        for layer in ("input_bn", "bn"):
            np.testing.assert_array_equal(getattr(getattr(block, layer), name).numpy(),
                                          getattr(getattr(twin, layer), name).numpy())


def test_prologue_to_static_and_jit_save(tmp_path):
    rng = np.random.default_rng(10)
    check_to_static_tracks_eager(PrologueBlock, rng, ["input_bn", "bn"])

    block = PrologueBlock(32, 8, 1)
    block.eval()
    x = paddle.to_tensor(rng.standard_normal((1, 32, 7, 7)).astype("float32"))
    expected = block.unfused(x).numpy()
    check_saved_block(block, x, expected, str(tmp_path / "block"),
                      op="dpn_fast_bn_relu_grouped_conv_bn_relu_infer")


def input_bn_tensors(c, **overrides):
    t = {k: paddle.to_tensor(v.astype("float32"))
         for k, v in make_input_bn(np.random.default_rng(11), c).items()}
    t.update(overrides)
    return t["in_bn_weight"], t["in_bn_bias"], t["in_bn_mean"], t["in_bn_var"]


@pytest.mark.parametrize("overrides,message", [
    ({"in_bn_mean": paddle.randn([32])}, "in_bn_mean' must have shape [64]"),
    ({"in_bn_weight": paddle.randn([128])}, "in_bn_weight' must have shape [64]"),
    ({"in_bn_var": paddle.randn([64, 1])}, "in_bn_var' must have shape [64]"),
])
def test_prologue_bad_input_bn(overrides, message):
    params = input_bn_tensors(64, **overrides)
    with pytest.raises((ValueError, RuntimeError, OSError)) as info:
        bad_call(input_bn=params + (1e-5,))
    assert message in str(info.value)
    # The C++ op checks too (the Python checks are skipped by a direct op call).
    t = as_tensors(make_inputs(np.random.default_rng(7), 1, 64, 64, 8, 8, 32), "float32")
    with pytest.raises((ValueError, RuntimeError, OSError)) as info:
        dpn_fast._extension.run_op("dpn_fast_bn_relu_grouped_conv_bn_relu_infer", t["x"],
                                   t["weight"], *params, t["bn_weight"], t["bn_bias"],
                                   t["bn_mean"], t["bn_var"], 1, 32, 1e-5, 1e-5)
    assert message in str(info.value)


def test_prologue_bad_input_bn_tuple_and_layers():
    with pytest.raises(ValueError, match="input_bn must be"):
        bad_call(input_bn=input_bn_tensors(64))  # epsilon missing
    conv = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=2, bias_attr=False)
    with pytest.raises(TypeError, match="'input_bn' must be a paddle.nn.BatchNorm2D"):
        GroupedConvBNReLUFolder(conv, paddle.nn.BatchNorm(8, act="relu"),
                                input_bn=paddle.nn.LayerNorm(8))
    with pytest.raises(ValueError, match="input_bn has 16 channels"):
        GroupedConvBNReLUFolder(conv, paddle.nn.BatchNorm(8, act="relu"),
                                input_bn=paddle.nn.BatchNorm(16, act="relu"))


ISA_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests_dir!r})
    from test_grouped_conv_bn_relu import (ODD_CASES, check_against_reference,
                                           check_prologue_against_reference)
    for case in ODD_CASES + [(1, 192, 192, 14, 14, 32, 2), (2, 384, 384, 7, 7, 32, 1)]:
        check_against_reference(case, training=False)
        check_against_reference(case, training=True, with_grads=True)
        check_prologue_against_reference(case)
    print("ok")
""")


@pytest.mark.parametrize("variable,value", [
    ("DPN_FAST_CPU_ISA", "avx2"), ("DPN_FAST_CPU_ISA", "baseline"),  # this machine: AVX-512
    ("DPN_FAST_NUM_THREADS", "3"),  # several threads: output rows split into blocks
])
def test_cpu_core_variants(variable, value):
    """The AVX2 and SSE variants of the CPU core, and its multi-threaded task split."""
    env = dict(os.environ, **{variable: value})
    script = ISA_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    run_script(script, env)


TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, {tests_dir!r})
    import numpy as np, paddle
    from dpn_fast.ops import grouped_conv_bn_relu
    from dpn_fast.ops.grouped_conv_bn_relu import fold_bn_into_conv, reference_grouped_conv_bn_relu
    from dpn_fast.ops._backend import triton_arg
    from dpn_fast.kernels.grouped_conv_bn_relu import grouped_conv_bias_relu_forward
    from test_grouped_conv_bn_relu import as_tensors, make_input_bn, make_inputs
    from utils import assert_matches_reference, random_bn, run_script
    # 3-6 input channels a group: the FMA kernel; 12 and 24 in float16: the tl.dot kernel.
    for n, c, c_out, h, w, groups, stride in [(2, 12, 12, 5, 7, 4, 1), (1, 24, 16, 7, 6, 4, 2),
                                              (1, 96, 96, 4, 4, 32, 2), (2, 24, 24, 5, 7, 2, 1),
                                              (1, 48, 96, 6, 5, 2, 2)]:
        rng = np.random.default_rng(0)
        arrays = make_inputs(rng, n, c, c_out, h, w, groups)
        in_arrays = make_input_bn(rng, c)
        ref = {{}}
        for dt in ("float64", "float32"):
            t = as_tensors(arrays, dt)
            ref[dt] = reference_grouped_conv_bn_relu(*t.values(), stride=stride,
                                                     groups=groups).numpy()
        for dtype in ("float32", "float16"):
            t = as_tensors(arrays, "float32")
            w_folded, bias = fold_bn_into_conv(*list(t.values())[1:])
            x = t["x"].astype(dtype)
            out = paddle.full(ref["float64"].shape, float("nan"), dtype=dtype)
            grouped_conv_bias_relu_forward(triton_arg(x), triton_arg(w_folded), triton_arg(bias),
                                           triton_arg(out), n, c, h, w, c_out, groups, stride)
            assert_matches_reference(out.astype("float32").numpy(), ref["float64"], ref["float32"],
                                     dtype)
        t = as_tensors(arrays, "float32")
        out = grouped_conv_bn_relu(*t.values(), stride=stride, groups=groups, backend="triton")
        assert_matches_reference(out.numpy(), ref["float64"], ref["float32"])

        # Input BN + ReLU prologue: relu(x * in_scale + in_shift) on loaded pixels only.
        def as_input_bn(dt):
            return {{k: paddle.to_tensor(v.astype(dt)) for k, v in in_arrays.items()}}
        for dt in ("float64", "float32"):
            t, ti = as_tensors(arrays, dt), as_input_bn(dt)
            ref[dt] = reference_grouped_conv_bn_relu(*t.values(), stride=stride, groups=groups,
                                                     input_bn=(*ti.values(), 1e-5)).numpy()
        t, ti = as_tensors(arrays, "float32"), as_input_bn("float32")
        in_scale = ti["in_bn_weight"] / paddle.sqrt(ti["in_bn_var"] + 1e-5)
        in_shift = ti["in_bn_bias"] - ti["in_bn_mean"] * in_scale
        w_folded, bias = fold_bn_into_conv(*list(t.values())[1:])
        for dtype in ("float32", "float16"):
            out = paddle.full(ref["float64"].shape, float("nan"), dtype=dtype)
            grouped_conv_bias_relu_forward(triton_arg(t["x"].astype(dtype)), triton_arg(w_folded),
                                           triton_arg(bias), triton_arg(out), n, c, h, w, c_out,
                                           groups, stride, triton_arg(in_scale),
                                           triton_arg(in_shift))
            assert_matches_reference(out.astype("float32").numpy(), ref["float64"], ref["float32"],
                                     dtype)
        out = grouped_conv_bn_relu(*t.values(), stride=stride, groups=groups, backend="triton",
                                   input_bn=(*ti.values(), 1e-5))
        assert_matches_reference(out.numpy(), ref["float64"], ref["float32"])
    print("ok")
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = TRITON_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    run_script(script, env)




