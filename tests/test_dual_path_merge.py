"""dual_path_merge / concat_bn_relu / dual_path_merge_bn_relu against float64 references."""
import importlib
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

import dpn_fast.ops as ops
from dpn_fast.models.config import CONFIGS, block_shapes, final_channels
from utils import assert_matches_reference

merge_mod = importlib.import_module("dpn_fast.ops.dual_path_merge")  # the function shadows it
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Every distinct merge (resid, dense_before, inc, hw) of the five DPNs at 224x224.
MERGE_SHAPES = sorted({(b.resid, b.dense_before, b.inc, b.out_hw)
                       for m in CONFIGS for b in block_shapes(m)})
# DPN92's stage-3 and stage-4 merges (first "down" block and a normal one), always run.
DPN92_CORE = sorted({(b.resid, b.dense_before, b.inc, b.out_hw)
                     for b in block_shapes("DPN92") if b.stage >= 2 and b.index in (0, 1, 19)})
ODD_SHAPES = [(3, 5, 2, 7), (13, 11, 3, 9), (8, 0 + 1, 1, 1), (5, 3, 4, 15)]  # (R, D, inc, hw)


def rng_inputs(n, r, d, inc, h, w, seed=0, dtype="float32"):
    g = np.random.default_rng(seed)
    resid = g.standard_normal((n, r, h, w))
    dense = g.standard_normal((n, d, h, w))
    y = g.standard_normal((n, r + inc, h, w))
    return [a.astype(dtype) for a in (resid, dense, y)]


def rng_affine(channels, num_acts=None, seed=1):
    g = np.random.default_rng(seed)
    shape = (channels,) if num_acts is None else (num_acts, channels)
    return g.standard_normal(shape).astype("float32"), g.standard_normal(shape).astype("float32")


def ref64_merge(resid, dense, y, scale=None, shift=None):
    resid, dense, y = (np.asarray(a, np.float64) for a in (resid, dense, y))
    r = resid.shape[1]
    resid_out = resid + y[:, :r]
    dense_out = np.concatenate([dense, y[:, r:]], 1)
    if scale is None:
        return resid_out, dense_out
    return resid_out, dense_out, ref64_concat_bn_relu(resid_out, dense_out, scale, shift)


def ref64_concat_bn_relu(resid, dense, scale, shift):
    x = np.concatenate([np.asarray(resid, np.float64), np.asarray(dense, np.float64)], 1)
    s, t = np.asarray(scale, np.float64), np.asarray(shift, np.float64)
    if s.ndim == 1:
        return np.maximum(x * s[None, :, None, None] + t[None, :, None, None], 0)
    return np.maximum(x[None] * s[:, None, :, None, None] + t[:, None, :, None, None], 0)


def to_pd(*arrays, stop_gradient=True):
    return [paddle.to_tensor(a, stop_gradient=stop_gradient) for a in arrays]


def shape_id(shape):
    return "x".join(map(str, shape))


def check_forward(n, r, d, inc, hw_side, num_acts=None, seed=0):
    arrays = rng_inputs(n, r, d, inc, hw_side, hw_side, seed)
    scale, shift = rng_affine(r + d + inc, num_acts)
    ref64 = ref64_merge(*arrays, scale, shift)
    tensors = to_pd(*arrays, scale, shift)
    ref32 = merge_mod.reference_dual_path_merge(*tensors)
    fused = ops.dual_path_merge(*tensors, backend="cpu")
    for name, a, e64, e32 in zip(("resid_out", "dense_out", "act"), fused, ref64, ref32):
        assert_matches_reference(a.numpy(), e64, e32.numpy(), name=name)


# ---- forward, every DPN merge shape ----

@pytest.mark.parametrize("shape", DPN92_CORE, ids=shape_id)
@pytest.mark.parametrize("batch", [1, 3])
def test_dpn92_core_shapes(shape, batch):
    check_forward(batch, *shape)


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=shape_id)
def test_all_dpn_shapes_batch1(shape):
    check_forward(1, *shape)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=shape_id)
def test_all_dpn_shapes_batch3(shape):
    check_forward(3, *shape)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=shape_id)
@pytest.mark.parametrize("num_acts", [None, 1, 2])
def test_odd_shapes(shape, num_acts):
    r, d, inc, hw = shape
    arrays = rng_inputs(3, r, d, inc, hw, hw + 2)  # non-square, odd
    scale, shift = rng_affine(r + d + inc, num_acts)
    ref64 = ref64_merge(*arrays, scale, shift)
    tensors = to_pd(*arrays, scale, shift)
    ref32 = merge_mod.reference_dual_path_merge(*tensors)
    fused = ops.dual_path_merge(*tensors, backend="cpu")
    for a, e64, e32 in zip(fused, ref64, ref32):
        assert_matches_reference(a.numpy(), e64, e32.numpy())
    plain = ops.dual_path_merge(*tensors[:3])
    for a, e64 in zip(plain, ref64[:2]):
        np.testing.assert_array_equal(a.numpy(), e64.astype("float32"))


def test_down_block_two_bns_dpn92():
    """Projection block head: two BNs on the same concat -> act [2, N, C, H, W]."""
    shape = next(s for s in DPN92_CORE if s[3] == 7)
    check_forward(2, *shape, num_acts=2)


@pytest.mark.parametrize("model", ["DPN68", "DPN92"])
def test_concat_bn_relu_network_end(model):
    r, d = final_channels(model)
    g = np.random.default_rng(3)
    resid = g.standard_normal((2, r, 7, 7)).astype("f4")
    dense = g.standard_normal((2, d, 7, 7)).astype("f4")
    scale, shift = rng_affine(r + d)
    tensors = to_pd(resid, dense, scale, shift)
    fused = ops.concat_bn_relu(*tensors)
    assert_matches_reference(fused.numpy(), ref64_concat_bn_relu(resid, dense, scale, shift),
                             merge_mod.reference_concat_bn_relu(*tensors).numpy())


def poison_allocator(shapes):
    """Frees NaN-filled blocks of exactly these shapes: paddle's CPU allocator hands them to the
    next allocations of the same sizes, i.e. to the op's outputs."""
    blocks = [paddle.full(shape, float("nan")) for shape in shapes]
    del blocks


def test_outputs_fully_written():
    n, r, d, inc, hw = 2, 64, 40, 24, 14
    c = r + d + inc
    arrays = rng_inputs(n, r, d, inc, hw, hw)
    scale, shift = rng_affine(c, 2)
    tensors = to_pd(*arrays, scale, shift)
    out_shapes = [[n, r, hw, hw], [n, d + inc, hw, hw], [2, n, c, hw, hw]]
    poison_allocator(out_shapes[:1])
    # (malloc keeps its free-list links in a freed block's first bytes: "mostly NaN")
    if np.isnan(paddle.empty(out_shapes[0]).numpy()).mean() < 0.9:
        pytest.skip("this allocator does not hand freed blocks to the next allocation")
    for with_bn in (True, False):
        poison_allocator(out_shapes)
        outs = ops.dual_path_merge(*tensors if with_bn else tensors[:3])
        assert all(np.isfinite(o.numpy()).all() for o in outs)
        del outs
    poison_allocator([[n, c, hw, hw]])
    assert np.isfinite(ops.concat_bn_relu(tensors[0], paddle.concat(tensors[1:3], 1)[:, :d + inc],
                                          tensors[3][0], tensors[4][0]).numpy()).all()


# ---- backward ----

def _grads(fn, arrays, dtype, weights):
    tensors = [paddle.to_tensor(a.astype(dtype), stop_gradient=False) for a in arrays]
    outs = fn(*tensors)
    loss = sum((o * paddle.to_tensor(wt.astype(dtype))).sum() for o, wt in zip(outs, weights)
               if wt is not None)
    loss.backward()
    # An input whose outputs are all unused gets no gradient from paddle: zeros.
    return [t.grad.numpy() if t.grad is not None else np.zeros(t.shape, dtype) for t in tensors]


@pytest.mark.parametrize("num_acts", [None, 1, 2])
@pytest.mark.parametrize("used", ["all", "act_only", "resid_only"])
def test_backward_merge(num_acts, used):
    if num_acts is None and used == "act_only":
        pytest.skip("no act without BN")
    n, r, d, inc, hw = 2, 12, 7, 5, 6
    arrays = rng_inputs(n, r, d, inc, hw, hw + 1, seed=5)
    scale, shift = rng_affine(r + d + inc, num_acts)
    affine = [] if num_acts is None else [paddle.to_tensor(scale), paddle.to_tensor(shift)]
    g = np.random.default_rng(9)
    out_shapes = [(n, r, hw, hw + 1), (n, d + inc, hw, hw + 1)]
    if num_acts is not None:
        out_shapes.append((num_acts, n, r + d + inc, hw, hw + 1))
    weights = [g.standard_normal(s) for s in out_shapes]
    if used == "act_only":
        weights[0] = weights[1] = None
    elif used == "resid_only":
        weights[1:] = [None] * (len(weights) - 1)

    def cast_affine(dtype):
        return [paddle.to_tensor(np.asarray(a, dtype)) for a in (scale, shift)] if affine else []

    fused = _grads(lambda *t: ops.dual_path_merge(*t, *affine, backend="cpu"),
                   arrays, "float32", weights)
    ref32 = _grads(lambda *t: merge_mod.reference_dual_path_merge(*t, *cast_affine("float32")),
                   arrays, "float32", weights)
    ref64 = _grads(lambda *t: merge_mod.reference_dual_path_merge(*t, *cast_affine("float64")),
                   arrays, "float64", weights)
    for name, a, e64, e32 in zip(("resid", "dense", "y"), fused, ref64, ref32):
        assert_matches_reference(a, e64, e32, name=f"grad {name}")


@pytest.mark.parametrize("num_acts", [None, 2])
def test_backward_concat_bn_relu(num_acts):
    n, r, d, hw = 2, 10, 9, 5
    g = np.random.default_rng(4)
    arrays = [g.standard_normal((n, r, hw, hw)), g.standard_normal((n, d, hw, hw))]
    scale, shift = rng_affine(r + d, num_acts)
    weight = g.standard_normal(scale.shape[:-1] + (n, r + d, hw, hw) if num_acts
                               else (n, r + d, hw, hw))

    def run(fn, dtype):
        s, t = (paddle.to_tensor(np.asarray(a, dtype)) for a in (scale, shift))
        return _grads(lambda *x: (fn(*x, s, t),), arrays, dtype, [weight])

    fused = run(ops.concat_bn_relu, "float32")
    ref32 = run(merge_mod.reference_concat_bn_relu, "float32")
    ref64 = run(merge_mod.reference_concat_bn_relu, "float64")
    for a, e64, e32 in zip(fused, ref64, ref32):
        assert_matches_reference(a, e64, e32)


# ---- BatchNorm-layer forms: eval folding, training statistics ----

# The BN layers the ops take; the ReLU is the op's.
BN_LAYERS = {
    "BatchNorm2D": paddle.nn.BatchNorm2D,
    "BatchNorm": paddle.nn.BatchNorm,
    "BatchNorm(act=relu)": lambda c: paddle.nn.BatchNorm(c, act="relu"),
}


def make_bn(channels, seed, kind="BatchNorm(act=relu)"):
    g = np.random.default_rng(seed)
    bn = BN_LAYERS[kind](channels)
    bn.weight.set_value(g.standard_normal(channels).astype("f4"))
    bn.bias.set_value(g.standard_normal(channels).astype("f4"))
    bn._mean.set_value(g.standard_normal(channels).astype("f4"))
    bn._variance.set_value((g.random(channels) + 0.5).astype("f4"))
    return bn


def copy_bn(bn):
    other = paddle.nn.BatchNorm(bn.weight.shape[0], act="relu")
    other.set_state_dict(bn.state_dict())
    other.train() if bn.training else other.eval()
    return other


def fold64(bn):
    """(scale, shift) of an eval BN layer, in float64."""
    w, b, m, v = (t.numpy().astype(np.float64)
                  for t in (bn.weight, bn.bias, bn._mean, bn._variance))
    scale = w / np.sqrt(v + bn._epsilon)
    return scale, b - m * scale


@pytest.mark.parametrize("kind", list(BN_LAYERS))
@pytest.mark.parametrize("pair", [False, True])
def test_bn_layer_kinds_eval_match_float64(kind, pair):
    """Every form that takes BN layers, with each kind of layer, against float64."""
    n, r, d, inc, hw = 2, 16, 12, 8, 7
    arrays = rng_inputs(n, r, d, inc, hw, hw)
    tensors = to_pd(*arrays)
    layers = [make_bn(r + d + inc, s, kind) for s in (1, 2)][: 2 if pair else 1]
    for layer in layers:
        layer.eval()
    bn = tuple(layers) if pair else layers[0]
    folded = [fold64(layer) for layer in layers]
    scale64, shift64 = (np.stack(f) if pair else f[0] for f in zip(*folded))
    as_array = lambda act: np.stack([a.numpy() for a in act]) if pair else act.numpy()  # noqa: E731
    ref64 = ref64_merge(*arrays, scale64, shift64)
    ref_resid, ref_dense, ref_act = merge_mod.reference_dual_path_merge_bn_relu(*tensors, bn)
    ref32 = (ref_resid.numpy(), ref_dense.numpy(), as_array(ref_act))

    resid_out, dense_out, act = ops.dual_path_merge_bn_relu(*tensors, bn)
    for name, a, e64, e32 in zip(("resid_out", "dense_out", "act"),
                                 (resid_out.numpy(), dense_out.numpy(), as_array(act)),
                                 ref64, ref32):
        assert_matches_reference(a, e64, e32, name=name)
    head = ops.concat_bn_relu(resid_out, dense_out, bn=bn)
    assert_matches_reference(as_array(head), ref64[2], ref32[2], name="concat_bn_relu")
    buffer = paddle.concat([tensors[1], paddle.zeros([n, inc, hw, hw])], axis=1)
    with paddle.no_grad():
        into_act = ops.dual_path_merge_into(tensors[0], buffer, d, tensors[2], bn=bn)[2]
    assert_matches_reference(as_array(into_act), ref64[2], ref32[2], name="dual_path_merge_into")
    scale, shift = ops.fold_batch_norm(layers[0])
    np.testing.assert_allclose(scale.numpy(), folded[0][0], rtol=1e-6)
    np.testing.assert_allclose(shift.numpy(), folded[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:When training, we now always track")  # BatchNorm2D's
@pytest.mark.parametrize("kind", ["BatchNorm2D", "BatchNorm"])
def test_bn_layer_without_relu_training_matches_layer_then_relu(kind):
    """Training with an act-less layer: relu(layer(x)), running statistics as the layer's."""
    n, r, d, inc, hw = 3, 10, 6, 4, 5
    layer, twin = make_bn(r + d + inc, 1, kind), make_bn(r + d + inc, 1, kind)
    layer.train()
    twin.train()
    arrays = rng_inputs(n, r, d, inc, hw, hw, seed=10)
    act = ops.dual_path_merge_bn_relu(*to_pd(*arrays), layer)[2]
    resid_out, dense_out = ref64_merge(*arrays)
    x = np.concatenate([resid_out, dense_out], 1)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    w, b = (t.numpy().astype(np.float64) for t in (twin.weight, twin.bias))
    expected64 = np.maximum((x - mean[:, None, None]) / np.sqrt(var[:, None, None] + twin._epsilon)
                            * w[:, None, None] + b[:, None, None], 0)
    expected32 = paddle.nn.functional.relu(twin(paddle.to_tensor(x.astype("f4")))).numpy()
    assert_matches_reference(act.numpy(), expected64, expected32, name="act")
    np.testing.assert_allclose(layer._mean.numpy(), twin._mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer._variance.numpy(), twin._variance.numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pair", [False, True])
def test_bn_relu_eval_matches_layer(pair):
    n, r, d, inc, hw = 2, 16, 12, 8, 7
    tensors = to_pd(*rng_inputs(n, r, d, inc, hw, hw))
    layers = [make_bn(r + d + inc, s) for s in (1, 2)][: 2 if pair else 1]
    for layer in layers:
        layer.eval()
    bn = tuple(layers) if pair else layers[0]
    resid_out, dense_out, act = ops.dual_path_merge_bn_relu(*tensors, bn)
    ref = merge_mod.reference_dual_path_merge_bn_relu(*tensors, bn)
    np.testing.assert_allclose(resid_out.numpy(), ref[0].numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(dense_out.numpy(), ref[1].numpy(), rtol=0, atol=0)
    for a, e in zip(act if pair else [act], ref[2] if pair else [ref[2]]):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    head = ops.concat_bn_relu(resid_out, dense_out, bn=bn)
    for a, e in zip(head if pair else [head], ref[2] if pair else [ref[2]]):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)


def test_bn_relu_eval_sees_parameter_updates():
    """No stale folding: set_state_dict and an optimizer step change the fused output."""
    n, r, d, inc, hw = 2, 8, 6, 4, 5
    tensors = to_pd(*rng_inputs(n, r, d, inc, hw, hw))
    bn = make_bn(r + d + inc, 1)
    bn.eval()

    def check():
        act = ops.dual_path_merge_bn_relu(*tensors, bn)[2]
        ref = merge_mod.reference_dual_path_merge_bn_relu(*tensors, bn)[2]
        np.testing.assert_allclose(act.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
        return act.numpy()

    first = check()
    bn.set_state_dict(make_bn(r + d + inc, 7).state_dict())
    second = check()
    assert not np.allclose(first, second)
    opt = paddle.optimizer.SGD(0.5, parameters=bn.parameters())
    x = paddle.to_tensor(
        np.random.default_rng(0).standard_normal((4, r + d + inc, 3, 3)).astype("f4"))
    bn(x).sum().backward()
    opt.step()
    third = check()
    assert not np.allclose(second, third)


@pytest.mark.parametrize("form", ["bn_layer", "scale_shift", "head"])
def test_eval_head_parameter_gradients(form):
    """Eval BN with trainable weight/bias (frozen statistics), or trainable scale/shift: their
    gradients flow (the head then runs as paddle ops), and the inputs' gradients match."""
    n, r, d, inc, hw = 2, 6, 4, 3, 5
    arrays = rng_inputs(n, r, d, inc, hw, hw, seed=3)
    bn = make_bn(r + d + inc, 4)
    bn.eval()
    scale, shift = rng_affine(r + d + inc if form != "head" else r + r + inc)  # head: (resid, y)

    def run(fused):
        ts = to_pd(*arrays, stop_gradient=False)
        params = to_pd(scale, shift, stop_gradient=False)
        bn.clear_gradients()
        if form == "bn_layer":
            fn = (ops.dual_path_merge_bn_relu if fused
                  else merge_mod.reference_dual_path_merge_bn_relu)
            act = fn(*ts, bn)[2]
        elif form == "scale_shift":
            fn = ops.dual_path_merge if fused else merge_mod.reference_dual_path_merge
            act = fn(*ts, *params)[2]
        else:
            fn = ops.concat_bn_relu if fused else merge_mod.reference_concat_bn_relu
            act = fn(ts[0], ts[2], *params)
        upstream = np.random.default_rng(6).standard_normal(act.shape).astype("f4")
        (act * paddle.to_tensor(upstream)).sum().backward()
        grads = [t.grad.numpy() for t in (ts if form != "head" else ts[::2])]
        if form == "bn_layer":
            return grads + [bn.weight.grad.numpy(), bn.bias.grad.numpy()]
        return grads + [p.grad.numpy() for p in params]

    for a, e in zip(run(True), run(False)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", [False, True])
def test_bn_relu_training_matches_layer(pair):
    """Training: outputs, running mean/var (momentum, variance estimator) and parameter grads
    match paddle.nn.BatchNorm itself over two steps."""
    n, r, d, inc, hw = 3, 10, 6, 4, 5
    layers = [make_bn(r + d + inc, s) for s in (1, 2)][: 2 if pair else 1]
    twins = [copy_bn(layer) for layer in layers]
    for layer in layers + twins:
        layer.train()
    for step in range(2):
        arrays = rng_inputs(n, r, d, inc, hw, hw, seed=10 + step)
        ours = to_pd(*arrays, stop_gradient=False)
        theirs = to_pd(*arrays, stop_gradient=False)
        out = ops.dual_path_merge_bn_relu(*ours, tuple(layers) if pair else layers[0])
        ref = merge_mod.reference_dual_path_merge_bn_relu(*theirs,
                                                           tuple(twins) if pair else twins[0])
        acts, ref_acts = (out[2], ref[2]) if pair else ((out[2],), (ref[2],))
        for a, e in zip(acts, ref_acts):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
        sum(a.sum() * (i + 1) for i, a in enumerate(acts)).backward()
        sum(a.sum() * (i + 1) for i, a in enumerate(ref_acts)).backward()
        for layer, twin in zip(layers, twins):
            np.testing.assert_allclose(layer._mean.numpy(), twin._mean.numpy(),
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(layer._variance.numpy(), twin._variance.numpy(),
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(layer.weight.grad.numpy(), twin.weight.grad.numpy(),
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(layer.bias.grad.numpy(), twin.bias.grad.numpy(),
                                       rtol=1e-4, atol=1e-4)
        for a, e in zip(ours, theirs):
            np.testing.assert_allclose(a.grad.numpy(), e.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_training_running_variance_is_biased():
    """Pins what paddle.nn.BatchNorm does, and so what we reproduce: running = 0.9 * running +
    0.1 * batch, with the BIASED (population, /n) batch variance (PyTorch uses /(n-1))."""
    c = 4
    bn = paddle.nn.BatchNorm(c, act="relu")
    bn.train()
    x = np.random.default_rng(0).standard_normal((3, c, 2, 2)).astype("f4")
    ops.concat_bn_relu(paddle.to_tensor(x[:, :2]), paddle.to_tensor(x[:, 2:]), bn=bn)
    flat = x.transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
    np.testing.assert_allclose(bn._mean.numpy(), 0.1 * flat.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * flat.var(1), rtol=1e-6)
    assert not np.allclose(bn._variance.numpy(), 0.9 + 0.1 * flat.var(1, ddof=1), rtol=1e-5)


# ---- graph capture and saved models ----

class TinyDualPath(paddle.nn.Layer):
    def __init__(self, r, d, inc):
        super().__init__()
        c = r + d + inc
        self.y_conv = paddle.nn.Conv2D(r + d, r + inc, 1)
        self.bn = paddle.nn.BatchNorm(c, act="relu")
        self.bn_pair = (paddle.nn.BatchNorm(c, act="relu"), paddle.nn.BatchNorm(c, act="relu"))
        self.bn_w, self.bn_a = self.bn_pair
        self.r = r

    def forward(self, resid, dense):
        y = self.y_conv(paddle.concat([resid, dense], 1))
        resid_out, dense_out, act = ops.dual_path_merge_bn_relu(resid, dense, y, self.bn)
        act_w, act_a = ops.concat_bn_relu(resid_out, dense_out, bn=(self.bn_w, self.bn_a))
        return act + act_w * 2 + act_a, ops.dual_path_merge(resid, dense, y)[1]


def tiny_model():
    paddle.seed(0)
    model = TinyDualPath(6, 5, 3)
    for i, bn in enumerate([model.bn, model.bn_w, model.bn_a]):
        bn.set_state_dict(make_bn(14, 20 + i).state_dict())
    model.eval()
    g = np.random.default_rng(2)
    inputs = to_pd(g.standard_normal((2, 6, 5, 5)).astype("f4"),
                   g.standard_normal((2, 5, 5, 5)).astype("f4"))
    return model, inputs


def test_to_static():
    model, inputs = tiny_model()
    eager = [o.numpy() for o in model(*inputs)]
    static = paddle.jit.to_static(model, full_graph=True)
    for a, e in zip(static(*inputs), eager):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)


def test_to_static_scale_shift_forms():
    arrays = rng_inputs(2, 4, 3, 2, 3, 3)
    scale, shift = rng_affine(9, 2)
    tensors = to_pd(*arrays, scale, shift)

    def fn(resid, dense, y, scale, shift):
        resid_out, dense_out, act = ops.dual_path_merge(resid, dense, y, scale, shift)
        return act, ops.concat_bn_relu(resid_out, dense_out, scale[0], shift[0])

    eager = [o.numpy() for o in fn(*tensors)]
    for a, e in zip(paddle.jit.to_static(fn, full_graph=True)(*tensors), eager):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)


def test_to_static_training_step():
    """Training under to_static: outputs, gradients and running statistics as in eager mode."""
    results = []
    for static in (False, True):
        model, inputs = tiny_model()
        model.train()
        inputs = [paddle.to_tensor(t.numpy(), stop_gradient=False) for t in inputs]
        fn = paddle.jit.to_static(model, full_graph=True) if static else model
        out, dense = fn(*inputs)
        (out.sum() + (dense * dense).sum()).backward()
        results.append([out.numpy(), dense.numpy(), *(t.grad.numpy() for t in inputs),
                        model.y_conv.weight.grad.numpy(), model.bn.weight.grad.numpy(),
                        model.bn._mean.numpy(), model.bn_a._variance.numpy()])
    for a, e in zip(*results):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_jit_save_load(tmp_path):
    model, inputs = tiny_model()
    eager = [o.numpy() for o in model(*inputs)]
    spec = [paddle.static.InputSpec([None, 6, 5, 5], "float32", "resid"),
            paddle.static.InputSpec([None, 5, 5, 5], "float32", "dense")]
    path = str(tmp_path / "tiny")
    paddle.jit.save(model, path, input_spec=spec)
    loaded = paddle.jit.load(path)
    for a, e in zip(loaded(*inputs), eager):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)


# ---- bad input ----

def _bad_cases():
    r, d, inc, hw = 4, 3, 2, 5
    good = rng_inputs(2, r, d, inc, hw, hw)
    scale, shift = rng_affine(r + d + inc)
    t = lambda a: paddle.to_tensor(a)  # noqa: E731
    resid, dense, y = map(t, good)
    return [
        ("rank", lambda: ops.dual_path_merge(t(good[0][0]), dense, y), ValueError, "4-D"),
        ("y channels", lambda: ops.dual_path_merge(resid, dense, t(good[2][:, :r])),
         ValueError, "new dense"),
        ("batch", lambda: ops.dual_path_merge(resid, t(good[1][:1]), y),
         ValueError, "batch sizes differ"),
        ("spatial", lambda: ops.dual_path_merge(resid, dense, t(good[2][:, :, :4])),
         ValueError, "height"),
        ("dtype", lambda: ops.dual_path_merge(resid, dense, t(good[2].astype("f8"))),
         TypeError, "float32"),
        ("fp16 on cpu",
         lambda: ops.dual_path_merge(*(x.astype("float16") for x in (resid, dense, y))),
         TypeError, "float32 only"),
        ("not a tensor", lambda: ops.dual_path_merge(good[0], dense, y),
         TypeError, "paddle.Tensor"),
        ("scale length",
         lambda: ops.dual_path_merge(resid, dense, y, t(scale[:-1]), t(shift[:-1])),
         ValueError, "scale"),
        ("scale without shift", lambda: ops.dual_path_merge(resid, dense, y, t(scale)),
         ValueError, "both"),
        ("scale dtype",
         lambda: ops.dual_path_merge(resid, dense, y, t(scale.astype("f8")), t(shift)),
         TypeError, "float32"),
        ("three acts",
         lambda: ops.dual_path_merge(resid, dense, y, t(np.stack([scale] * 3)),
                                     t(np.stack([shift] * 3))),
         ValueError, "A <= 2"),
        ("backend", lambda: ops.dual_path_merge(resid, dense, y, backend="tpu"),
         ValueError, "backend"),
        ("cuda on cpu", lambda: ops.dual_path_merge(resid, dense, y, backend="cuda"),
         ValueError, "GPU"),
        ("bn channels",
         lambda: ops.dual_path_merge_bn_relu(resid, dense, y, paddle.nn.BatchNorm(5, act="relu")),
         ValueError, "channels"),
        ("bn act",
         lambda: ops.dual_path_merge_bn_relu(resid, dense, y,
                                             paddle.nn.BatchNorm(r + d + inc, act="sigmoid")),
         TypeError, "act='sigmoid'"),
        ("bn type",
         lambda: ops.dual_path_merge_bn_relu(resid, dense, y, paddle.nn.BatchNorm1D(r + d + inc)),
         TypeError, "BatchNorm2D"),
        ("fold type", lambda: ops.fold_batch_norm(paddle.nn.LayerNorm(r + d + inc)),
         TypeError, "BatchNorm2D"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_python(case):
    _, fn, error, match = case
    with pytest.raises(error, match=match):
        fn()


def test_bad_input_cpp_checks():
    """The ops check again when called directly (second line of defence)."""
    from dpn_fast._extension import run_op
    resid, dense, y = to_pd(*rng_inputs(2, 4, 3, 2, 5, 5))
    with pytest.raises(Exception, match="must have resid's 4 plus"):
        run_op("dpn_fast_dual_path_merge", resid, dense, resid)
    with pytest.raises(Exception, match="batch/spatial sizes differ"):
        run_op("dpn_fast_dual_path_merge", resid, dense[:1], y)
    with pytest.raises(Exception, match="scale/shift must be"):
        run_op("dpn_fast_dual_path_merge_bn_relu", resid, dense, y,
               [paddle.ones([3]), paddle.ones([3])], [])
    with pytest.raises(Exception, match="same dtype"):
        run_op("dpn_fast_dual_path_merge", resid, dense, y.astype("float64"))
    with pytest.raises(Exception, match="GPU only"):
        run_op("dpn_fast_dual_path_merge", *(t.astype("float16") for t in (resid, dense, y)))


def test_non_contiguous_inputs_are_handled():
    arrays = rng_inputs(2, 4, 3, 2, 5, 6)
    resid, dense, y = to_pd(*arrays)
    # Transposed views (strided): made contiguous by the API.
    views = [t.transpose([0, 1, 3, 2]) for t in (resid, dense, y)]
    assert not views[0].is_contiguous()
    out = ops.dual_path_merge(*views)
    ref = ref64_merge(*(a.transpose(0, 1, 3, 2) for a in arrays))
    for a, e in zip(out, ref):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)


# ---- Triton, under the CPU interpreter ----

@pytest.mark.skipif(INTERPRETED, reason="driver for the interpreted run")
def test_triton_interpreted():
    """Runs this module's triton tests in a subprocess with TRITON_INTERPRET=1 (set before
    import)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "triton_kernel or triton_api"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]


needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("with_y,num_acts",
                         [(True, 0), (True, 1), (True, 2), (False, 1), (False, 2)])
def test_triton_kernel(dtype, with_y, num_acts):
    from dpn_fast.kernels import dual_path_merge as kernels
    from dpn_fast.kernels._host import HostTensor
    n, r, d, inc, hw = 2, 5, 3, (2 if with_y else 0), 15
    c = r + d + inc
    g = np.random.default_rng(0)
    resid, dense, y = (g.standard_normal(s).astype(dtype)
                       for s in ((n, r, hw), (n, d, hw), (n, r + inc, hw)))
    scale, shift = (g.standard_normal((max(num_acts, 1), c)).astype("f4") for _ in range(2))
    nan = lambda *s: np.full(s, np.nan, dtype)  # noqa: E731
    resid_out, dense_out, act = nan(n, r, hw), nan(n, d + inc, hw), nan(max(num_acts, 1), n, c, hw)
    h = lambda a: HostTensor(a.ctypes.data, str(a.dtype), a)  # noqa: E731
    kernels.merge_forward(h(resid), h(dense), h(y) if with_y else None, h(scale), h(shift),
                          h(resid_out), h(dense_out), h(act), n, r, d, inc, hw, num_acts)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)
    if with_y:
        e_r, e_d = ref64_merge(resid, dense, y)
        np.testing.assert_allclose(resid_out.astype("f8"), e_r, **tol)
        np.testing.assert_allclose(dense_out.astype("f8"), e_d, **tol)
        x_r, x_d = resid_out, dense_out
    else:
        x_r, x_d = resid, dense
    if num_acts:
        e = ref64_concat_bn_relu(x_r[..., None], x_d[..., None], scale[:num_acts], shift[:num_acts])
        np.testing.assert_allclose(act[:num_acts].astype("f8"), e[..., 0], **tol)
    # Backward with NaN-poisoned gradients out.
    g_ro = g.standard_normal((n, r, hw)).astype(dtype)
    g_do = g.standard_normal((n, d + inc, hw)).astype(dtype)
    g_act = g.standard_normal((max(num_acts, 1), n, c, hw)).astype(dtype)
    g_r, g_d, g_y = nan(n, r, hw), nan(n, d, hw), nan(n, r + inc, hw)
    kernels.merge_backward(h(x_r), h(x_d), h(g_ro) if with_y else None, h(g_do) if with_y else None,
                           h(g_act), h(scale), h(shift), h(g_r), h(g_d), h(g_y) if with_y else None,
                           n, r, d, inc, hw, num_acts)
    x = np.concatenate([x_r, x_d], 1).astype("f8")
    gx = np.concatenate([g_ro, g_do], 1).astype("f8") if with_y else np.zeros_like(x)
    for a in range(num_acts):
        mask = x * scale[a][None, :, None] + shift[a][None, :, None] > 0
        gx += np.where(mask, g_act[a].astype("f8") * scale[a][None, :, None], 0)
    np.testing.assert_allclose(g_r.astype("f8"), gx[:, :r], **tol)
    np.testing.assert_allclose(g_d.astype("f8"), gx[:, r:r + d], **tol)
    if with_y:
        np.testing.assert_allclose(g_y.astype("f8"), np.concatenate([gx[:, :r], gx[:, r + d:]], 1),
                                   **tol)


@needs_interpreter
@pytest.mark.parametrize("num_acts", [None, 1, 2])
def test_triton_api_matches_cpu(num_acts):
    n, r, d, inc, hw = 2, 6, 4, 3, 5
    arrays = rng_inputs(n, r, d, inc, hw, hw)
    scale, shift = rng_affine(r + d + inc, num_acts)
    affine = [] if num_acts is None else [scale, shift]

    def run(backend):
        tensors = to_pd(*arrays, stop_gradient=False)
        outs = ops.dual_path_merge(*tensors, *to_pd(*affine), backend=backend)
        sum((o * (i + 1.5)).sum() for i, o in enumerate(outs)).backward()
        return [o.numpy() for o in outs] + [t.grad.numpy() for t in tensors]

    for a, e in zip(run("triton"), run("cpu")):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
    bn = make_bn(r + d + inc, 3)
    bn.eval()
    tensors = to_pd(*arrays)
    got = ops.dual_path_merge_bn_relu(*tensors, bn, backend="triton")[2]
    want = ops.dual_path_merge_bn_relu(*tensors, bn, backend="cpu")[2]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


# ---- inference form with a stage-wide dense buffer (dual_path_merge_into) ----

def run_stage(merge_into, n, r, inc, blocks, hw, seed=0):
    """A stage's chain of merges: first the projection's 2*inc dense channels, then `blocks`
    merges; returns every block's (resid_out, act) and the final dense part."""
    g = np.random.default_rng(seed)
    dense0 = paddle.to_tensor(g.standard_normal((n, 2 * inc, hw, hw)).astype("f4"))
    resid = paddle.to_tensor(g.standard_normal((n, r, hw, hw)).astype("f4"))
    ys = [paddle.to_tensor(g.standard_normal((n, r + inc, hw, hw)).astype("f4"))
          for _ in range(blocks)]
    bns = [make_bn(r + 2 * inc + (k + 1) * inc, 100 + k) for k in range(blocks)]
    for bn in bns:
        bn.eval()
    outs = []
    if merge_into:
        buffer = paddle.full([n, 2 * inc + blocks * inc, hw, hw], float("nan"))
        buffer[:, :2 * inc] = dense0
        channels = 2 * inc
        for y, bn in zip(ys, bns):
            resid, buffer, act = ops.dual_path_merge_into(resid, buffer, channels, y, bn=bn)
            channels += inc
            outs.append((resid.numpy(), act.numpy()))
        return outs, buffer.numpy()
    dense = dense0
    for y, bn in zip(ys, bns):
        resid, dense, act = ops.dual_path_merge_bn_relu(resid, dense, y, bn)
        outs.append((resid.numpy(), act.numpy()))
    return outs, dense.numpy()


@pytest.mark.parametrize("batch", [1, 3])
def test_merge_into_matches_concat_chain(batch):
    with paddle.no_grad():
        fused, dense = run_stage(True, batch, 64, 24, 4, 7)
        chain, dense_ref = run_stage(False, batch, 64, 24, 4, 7)
    np.testing.assert_array_equal(dense, dense_ref)
    for (r, a), (r_ref, a_ref) in zip(fused, chain):
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(a, a_ref)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_merge_into_two_bns_and_scale_shift(backend):
    n, r, d, inc, hw, cap = 2, 16, 8, 4, 5, 20
    arrays = rng_inputs(n, r, d, inc, hw, hw)
    resid, dense, y = to_pd(*arrays)
    layers = (make_bn(r + d + inc, 1), make_bn(r + d + inc, 2))
    for layer in layers:
        layer.eval()
    buffer = paddle.to_tensor(
        np.random.default_rng(5).standard_normal((n, cap, hw, hw)).astype("f4"))
    before = buffer.numpy()
    buffer[:, :d] = dense
    with paddle.no_grad():
        resid_out, _, (act_w, act_a) = ops.dual_path_merge_into(resid, buffer, d, y, bn=layers,
                                                                backend=backend)
        ref = merge_mod.reference_dual_path_merge_bn_relu(resid, dense, y, layers)
        np.testing.assert_allclose(resid_out.numpy(), ref[0].numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(buffer.numpy()[:, :d + inc], ref[1].numpy(), rtol=0, atol=0)
        np.testing.assert_array_equal(buffer.numpy()[:, d + inc:], before[:, d + inc:])
        for a, e in zip((act_w, act_a), ref[2]):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
        scale, shift = rng_affine(r + d + inc)
        act = ops.dual_path_merge_into(resid, buffer, d, y, *to_pd(scale, shift),
                                       backend=backend)[2]
        ref32 = merge_mod.reference_dual_path_merge(resid, dense, y, *to_pd(scale, shift))[2]
        assert_matches_reference(act.numpy(), ref64_merge(*arrays, scale, shift)[2],
                                 ref32.numpy())


def test_merge_into_bad_input():
    resid, dense, y = to_pd(*rng_inputs(2, 4, 3, 2, 5, 5))
    buffer = paddle.zeros([2, 6, 5, 5])
    scale, shift = to_pd(*rng_affine(9))
    with paddle.no_grad():
        with pytest.raises(ValueError, match="do not fit"):
            ops.dual_path_merge_into(resid, buffer, 5, y, scale, shift)
        with pytest.raises(ValueError, match="dense_channels"):
            ops.dual_path_merge_into(resid, buffer, -1, y, scale, shift)
        with pytest.raises(ValueError, match="scale"):
            ops.dual_path_merge_into(resid, buffer, 2, y, scale, shift)
    with paddle.no_grad(), pytest.raises(ValueError, match="contiguous"):
        ops.dual_path_merge_into(resid, paddle.zeros([2, 6, 5, 5]).transpose([0, 1, 3, 2]), 3, y,
                                 scale, shift)
    with paddle.no_grad(), pytest.raises(ValueError, match="[Tt]riton"):
        ops.dual_path_merge_into(resid, buffer, 3, y, scale, shift, backend="triton")
    y.stop_gradient = False
    with pytest.raises(ValueError, match="inference only"):
        ops.dual_path_merge_into(resid, buffer, 3, y, scale, shift)


class TinyStage(paddle.nn.Layer):
    """Two blocks' merges into one stage buffer, as an inference model would run them."""

    def __init__(self, r, inc):
        super().__init__()
        self.r, self.inc = r, inc
        self.convs = paddle.nn.LayerList([paddle.nn.Conv2D(r, r + inc, 1) for _ in range(2)])
        self.bns = paddle.nn.LayerList([paddle.nn.BatchNorm(r + (3 + k) * inc, act="relu")
                                        for k in range(2)])

    def forward(self, resid, dense):
        buffer = paddle.zeros([resid.shape[0], 4 * self.inc, resid.shape[2], resid.shape[3]])
        buffer[:, :2 * self.inc] = dense
        acts = []
        for k in range(2):
            resid, buffer, act = ops.dual_path_merge_into(resid, buffer, (2 + k) * self.inc,
                                                          self.convs[k](resid), bn=self.bns[k])
            acts.append(act)
        return acts[0].mean() + acts[1], buffer


def test_merge_into_to_static_and_jit_save(tmp_path):
    paddle.seed(1)
    model = TinyStage(6, 3)
    for k, bn in enumerate(model.bns):
        bn.set_state_dict(make_bn(6 + (3 + k) * 3, 40 + k).state_dict())
    model.eval()
    g = np.random.default_rng(1)
    inputs = to_pd(g.standard_normal((2, 6, 5, 5)).astype("f4"),
                   g.standard_normal((2, 6, 5, 5)).astype("f4"))
    with paddle.no_grad():
        eager = [o.numpy() for o in model(*inputs)]
        static = paddle.jit.to_static(model, full_graph=True)
        for a, e in zip(static(*inputs), eager):
            np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)
    path = str(tmp_path / "stage")
    spec = [paddle.static.InputSpec([None, 6, 5, 5], "float32", name)
            for name in ("resid", "dense")]
    paddle.jit.save(model, path, input_spec=spec)
    loaded = paddle.jit.load(path)
    with paddle.no_grad():
        for a, e in zip(loaded(*inputs), eager):
            np.testing.assert_allclose(a.numpy(), e, rtol=1e-6, atol=1e-6)
