"""dpn_block / dpn_head (whole-block and head ops, CPU inference) vs a float64 reference: every
block shape of the five DPNs, odd image sizes and batch 3, thread counts, the stage op against
the block ops, and bad inputs. The compiled engine and the fused model's inference path, to_static
and Paddle Inference round trips run in test_compile.py and test_fused_models.py."""
import dataclasses
import os
import textwrap

import numpy as np
import paddle
import pytest

from dpn_fast import _extension, create_model
from dpn_fast.engines.cpu import stage_batch_norms, stage_layout, stage_weights
from dpn_fast.models.config import CONFIGS, block_shapes, final_channels
from dpn_fast.models.dpn import DualPathBlock, _batch_norm
from dpn_fast.ops import dpn_block, dpn_head, fold_batch_norms
from dpn_fast.ops.cpu_features import gemm_impl
from dpn_fast.ops.dpn_block import stage_launch, to_channels_first
from utils import assert_matches_reference, run_script


def block_cases(models, batches, image_size=224, slow_unless=lambda model, n: False):
    cases = []
    for model in models:
        for shape in block_shapes(model, image_size):
            for n in batches:
                marks = [] if slow_unless(model, n) else [pytest.mark.slow]
                cases.append(pytest.param(shape, n, marks=marks,
                                          id=f"{model}-{image_size}-b{shape.stage}.{shape.index}-n{n}"))
    return cases


def grouping_cases():
    """DPN68's first normal block and first stride-2 block at an odd size, with a bottleneck of
    120 channels (not a multiple of 16: a part-filled last vector) in groups of 3, 12, 24 and 40
    channels: the channels-last grouped conv's shuffle of a window, its broadcast within one
    group, and its broadcast over several groups too wide to shuffle."""
    shapes = block_shapes("DPN68", 97)
    bases = [shapes[1], next(s for s in shapes if s.kind == "down")]
    return [pytest.param(dataclasses.replace(base, bottleneck=120, groups=120 // per_group), 3,
                         id=f"DPN68-97-{base.kind}-120ch-{per_group}per-group-n3")
            for base in bases for per_group in (3, 12, 24, 40)]


def one_channel_cases():
    """GEMMs with a single input channel, which oneDNN's matmul once misread (a weight's stride
    along a dimension of size 1): a bottleneck of one channel (1x1c's input), and a network's
    first block on a one-channel stem output (the projection's and 1x1a's input)."""
    shapes = block_shapes("DPN68", 33)
    return [pytest.param(dataclasses.replace(shapes[1], bottleneck=1, groups=1), 2,
                         id="DPN68-33-normal-bottleneck1-n2"),
            pytest.param(dataclasses.replace(shapes[0], in_dense=1), 2,
                         id="DPN68-33-proj-stem1-n2")]


# CI: every block of DPN92 at batch 1, DPN68 at an odd image size with batch 3, DPN92's 14x14
# blocks at batch 5 (runs of 4 images and 1), and odd groupings; the other models and batches
# under -m slow.
CASES = (block_cases(CONFIGS, (1, 3), slow_unless=lambda model, n: model == "DPN92" and n == 1)
         + block_cases(["DPN68"], (3,), image_size=97, slow_unless=lambda model, n: True)
         + [case for case in block_cases(["DPN92"], (5,), slow_unless=lambda model, n: True)
            if case.values[0].stage == 2 and case.values[0].index < 2]
         + grouping_cases() + one_channel_cases())


def random_state(layer, rng):
    state = {}
    for key, value in layer.state_dict().items():
        shape = value.shape
        if key.endswith("_mean"):
            state[key] = 0.2 * rng.standard_normal(shape)
        elif key.endswith("_variance"):
            state[key] = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("_batch_norm.weight") or (key.endswith("weight") and len(shape) == 1):
            state[key] = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bias"):
            state[key] = 0.5 * rng.standard_normal(shape)
        else:
            state[key] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    return state


def pair(make, rng):
    """The same random layer in float32 and float64, in eval mode."""
    layers = {}
    state = None
    for dtype in ("float32", "float64"):
        layer = make()
        if state is None:
            state = random_state(layer, rng)
        layer.to(dtype=dtype)
        layer.set_state_dict({k: v.astype(dtype) for k, v in state.items()})
        layer.eval()
        layers[dtype] = layer
    return layers


def block_inputs(shape, n, rng):
    """(resid or None, dense): the stem's output for the network's first block."""
    resid = None if shape.kind == "proj" else rng.standard_normal(
        (n, shape.in_resid, shape.in_hw, shape.in_hw))
    return resid, rng.standard_normal((n, shape.in_dense, shape.in_hw, shape.in_hw))


def to_tensor(array, dtype):
    return None if array is None else paddle.to_tensor(array.astype(dtype))


def block_arguments(block):
    """dpn_block's (weights, scale_shift) for a DualPathBlock: its conv weights and their input
    BNs folded."""
    layers = ([block.c1x1_w_func] if block.has_proj else []) + [
        block.c1x1_a_func, block.c3x3_b_func, block.c1x1_c_func]
    return ([layer._conv.weight for layer in layers],
            fold_batch_norms([layer._batch_norm for layer in layers]))


def run_block(block, resid, dense):
    weights, scale_shift = block_arguments(block)
    return dpn_block(resid, dense, weights, scale_shift, block.shape.groups, block.shape.stride)


@pytest.mark.parametrize("shape,n", CASES)
def test_block_matches_float64_reference(shape, n):
    rng = np.random.default_rng(shape.stage * 100 + shape.index)
    blocks = pair(lambda: DualPathBlock(shape), rng)
    resid, dense = block_inputs(shape, n, rng)
    with paddle.no_grad():
        refs = {}
        for dtype in ("float32", "float64"):
            x = to_tensor(dense, dtype) if resid is None else [to_tensor(resid, dtype),
                                                              to_tensor(dense, dtype)]
            refs[dtype] = [t.numpy().astype(np.float64) for t in blocks[dtype](x)]
        resid_out, dense_out = run_block(blocks["float32"], to_tensor(resid, "float32"),
                                         to_tensor(dense, "float32"))
    assert_matches_reference(resid_out.numpy(), refs["float64"][0], refs["float32"][0],
                             name="resid")
    assert_matches_reference(dense_out.numpy(), refs["float64"][1], refs["float32"][1],
                             name="dense")
    if shape.kind == "normal":  # the input's dense channels come back as they went in
        np.testing.assert_array_equal(dense_out.numpy()[:, :shape.in_dense],
                                      dense.astype("float32"))


HEAD_CASES = [pytest.param(model, n, hw, marks=[] if model == "DPN92" and n == 1 else
                           [pytest.mark.slow], id=f"{model}-n{n}-hw{hw}")
              for model in CONFIGS for n, hw in ((1, 7), (3, 4))]


@pytest.mark.parametrize("model,n,hw", HEAD_CASES + [("DPN68", 3, 3)])
def test_head_matches_float64_reference(model, n, hw):
    rng = np.random.default_rng(7)
    resid_channels, dense_channels = final_channels(model)
    channels = resid_channels + dense_channels
    bns = pair(lambda: _batch_norm(channels), rng)
    fcs = pair(lambda: paddle.nn.Linear(channels, 1000), rng)
    resid = rng.standard_normal((n, resid_channels, hw, hw))
    dense = rng.standard_normal((n, dense_channels, hw, hw))
    with paddle.no_grad():
        refs = {}
        for dtype in ("float32", "float64"):
            x = bns[dtype](paddle.concat([to_tensor(resid, dtype), to_tensor(dense, dtype)], 1))
            refs[dtype] = fcs[dtype](paddle.mean(x, axis=[2, 3])).numpy()
        fc = fcs["float32"]
        out = dpn_head(to_tensor(resid, "float32"), to_tensor(dense, "float32"),
                       fold_batch_norms([bns["float32"]]), fc.weight, fc.bias).numpy()
    assert_matches_reference(out, refs["float64"], refs["float32"], name="logits")


THREADS_SCRIPT = textwrap.dedent("""
    import numpy as np, paddle, dpn_fast
    paddle.seed(0)
    model = dpn_fast.DPN68(fused=True)
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 97, 97)).astype("float32"))
    with paddle.no_grad():
        np.save({path!r}, model(x).numpy())
    print("ok")
""")


def test_thread_counts_agree(tmp_path):
    """The model's inference path on 1 and 3 threads (oneDNN sizes its split per count)."""
    outputs = []
    for threads in ("1", "3"):
        path = str(tmp_path / f"logits{threads}.npy")
        run_script(THREADS_SCRIPT.format(path=path), dict(os.environ, DPN_FAST_NUM_THREADS=threads))
        outputs.append(np.load(path))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def normal_block_args(n=1, hw=5):
    """Arguments of dpn_fast_dpn_block for a small valid normal block (R 8, inc 4, 8 groups), its
    buffers channels-last, its BNs folded ([2, 20 + 16 + 16])."""
    rng = np.random.default_rng(0)

    def t(*shape):
        return paddle.to_tensor(rng.standard_normal(shape).astype("float32"))

    return dict(resid=t(n, hw, hw, 8), dense=t(n, hw, hw, 20), w_a=t(16, 20, 1, 1),
                w_conv=t(16, 2, 3, 3), w_c=t(12, 16, 1, 1), scale_shift=t(2, 52), groups=8,
                dense_channels=12)


def run_block_op(args):
    order = ("resid", "dense", "w_a", "w_conv", "w_c", "scale_shift", "groups", "dense_channels")
    return _extension.run_op("dpn_fast_dpn_block", *(args[k] for k in order))


def test_block_op_appends_in_place():
    """The normal block op writes resid and the dense buffer's channels [12, 16) in place, and
    leaves the others as they were."""
    args = normal_block_args()
    resid, dense = args["resid"].numpy(), args["dense"].numpy()
    with paddle.no_grad():
        resid_out, dense_out = run_block_op(args)
    assert not np.array_equal(resid_out.numpy(), resid)
    np.testing.assert_array_equal(dense_out.numpy()[..., :12], dense[..., :12])
    np.testing.assert_array_equal(dense_out.numpy()[..., 16:], dense[..., 16:])
    assert np.isfinite(dense_out.numpy()[..., 12:16]).all()
    assert not np.array_equal(dense_out.numpy()[..., 12:16], dense[..., 12:16])


@pytest.mark.parametrize("change,match", [
    (dict(dense_channels=0), "dense_channels must be in"),
    (dict(dense=(1, 5, 5, 15)), "do not fit"),
    (dict(groups=3), "groups must be > 0 and divide"),
    (dict(w_a="float64"), "float32 only"),
    (dict(w_conv=(16, 4, 3, 3)), "'w_conv' must have shape"),
    (dict(w_c=(8, 16, 1, 1)), "at least one dense channel"),
    (dict(w_a=(16, 19, 1, 1)), "'w_a' must have shape"),
    (dict(resid=(2, 5, 5, 8)), "'resid' must have shape"),
    (dict(resid=(1, 8, 5, 5)), "'resid' must have shape"),  # NCHW
    (dict(scale_shift=(2, 51)), "scale_shift"),
    (dict(scale_shift=(52,)), "scale_shift"),
])
def test_bad_block_inputs_raise_clear_errors(change, match):
    args = normal_block_args()
    for key, value in change.items():
        if value == "float64":
            value = args[key].astype("float64")
        elif isinstance(value, tuple):
            value = paddle.zeros(value, "float32")
        args[key] = value
    with paddle.no_grad(), pytest.raises(Exception, match=match):
        run_block_op(args)


def python_block_args():
    shape = block_shapes("DPN68", 64)[1]  # a normal block
    block = DualPathBlock(shape)
    block.eval()
    hw = shape.in_hw
    weights, scale_shift = block_arguments(block)
    return dict(resid=paddle.randn([1, shape.in_resid, hw, hw]),
                dense=paddle.randn([1, shape.in_dense, hw, hw]), weights=weights,
                scale_shift=scale_shift, groups=shape.groups)


def test_block_with_gradients_wanted_is_refused():
    args = python_block_args()
    args["dense"].stop_gradient = False
    with pytest.raises(RuntimeError, match="no backward"):
        dpn_block(**args)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(weights=a["weights"][:2]), TypeError, r"\(w_a, w_conv, w_c\)"),
    (lambda a: a.update(resid=None), ValueError, "goes to a projection block"),
    (lambda a: a.update(groups=2.0), TypeError, "must be an int"),
    (lambda a: a.update(stride=2), ValueError, "'stride' must be one of"),
    (lambda a: a.update(dense=a["dense"][:, 1:]), ValueError, "'w_a' has shape"),
    (lambda a: a.update(scale_shift=a["scale_shift"][:, 1:]), ValueError, "'scale_shift' must"),
    (lambda a: a.update(dense=a["dense"].astype("float64"), resid=a["resid"].astype("float64")),
     TypeError, "float32 only"),
    (lambda a: a.update(resid=a["resid"][:, :, :-1]), ValueError, "share batch and image size"),
    (lambda a: a.update(dense=a["dense"][0]), ValueError, "rank 4"),
])
def test_bad_python_arguments_raise_typed_errors(change, error, match):
    args = python_block_args()
    change(args)
    with paddle.no_grad(), pytest.raises(error, match=match):
        dpn_block(**args)


def test_head_bad_arguments_raise_typed_errors():
    resid, dense = paddle.randn([1, 8, 3, 3]), paddle.randn([1, 6, 3, 3])
    bn, fc = _batch_norm(14), paddle.nn.Linear(14, 5)
    with paddle.no_grad():
        scale_shift = fold_batch_norms([bn])
        assert dpn_head(resid, dense, scale_shift, fc.weight, fc.bias).shape == [1, 5]
        with pytest.raises(ValueError, match=r"'scale_shift' must have shape \[2, 13\]"):
            dpn_head(resid, dense[:, 1:], scale_shift, fc.weight, fc.bias)
        with pytest.raises(ValueError, match="'fc_weight' must be"):
            dpn_head(resid, dense, scale_shift, fc.weight.T, fc.bias)
        with pytest.raises(TypeError, match="'resid' must be a paddle.Tensor"):
            dpn_head(None, dense, scale_shift, fc.weight, fc.bias)
        with pytest.raises(TypeError, match="BatchNorm2D or paddle.nn.BatchNorm"):
            fold_batch_norms([fc])


def stage_model(model, rng):
    """A model with random parameters and BN statistics, in eval mode."""
    net = create_model(model)
    net.set_state_dict({k: v.astype("float32") for k, v in random_state(net, rng).items()})
    net.eval()
    return net


def run_stage(blocks, resid, dense):
    """The stage op on channels-last buffers (resid None: dense is the stem's NCHW output)."""
    layout = stage_layout(blocks)
    return stage_launch(resid, dense, stage_weights(blocks),
                        fold_batch_norms(stage_batch_norms(blocks)), layout.groups,
                        layout.stride, layout.dense_channels, layout.capacity)


@pytest.mark.parametrize("model,n,hw", [
    ("DPN92", 1, 56), ("DPN68", 3, 25),
    *[pytest.param(m, 1, 56, marks=pytest.mark.slow) for m in ("DPN98", "DPN107", "DPN131")]])
def test_stage_op_equals_block_ops(model, n, hw):
    """The engine's one op per stage gives, bit for bit, what dpn_block gives block by block (the
    same cores on the same data)."""
    rng = np.random.default_rng(7)
    net = stage_model(model, rng)
    first = net.blocks[0].shape
    dense = paddle.to_tensor(rng.standard_normal((n, first.in_dense, hw, hw)).astype("float32"))
    by_stage = by_block = (None, dense)
    with paddle.no_grad():
        for blocks in net.stages():
            by_stage = run_stage(blocks, *by_stage)
            for block in blocks:
                by_block = run_block(block, *by_block)
            last = blocks[-1].shape
            valid = last.dense_before + last.inc
            np.testing.assert_array_equal(to_channels_first(by_stage[0]).numpy(),
                                          by_block[0].numpy())
            np.testing.assert_array_equal(to_channels_first(by_stage[1]).numpy()[:, :valid],
                                          by_block[1].numpy())
            assert np.isfinite(by_block[1].numpy()).all()


def gemm_rows_are_independent():
    """Whether oneDNN's matmul here gives each output row the same bits whatever the number of
    rows: brg_matmul (AVX-512 CPUs) does; gemm:jit (its choice on AVX2 CPUs) splits K by the
    problem's size, so a row's last bits depend on how many images run together."""
    return gemm_impl(441, 128, 160, "transposed").startswith("brg_matmul")


def test_stage_op_runs_images_like_single_images():
    """A stage of several images runs a few images at a time, each run through all its blocks
    (here one image at 41x41, then two at 21x21 after a stride-2 projection): what each image
    gives alone, bit for bit where oneDNN's rows are independent of the run's size."""
    rng = np.random.default_rng(11)
    net = stage_model("DPN68", rng)
    first = net.blocks[0].shape
    dense = paddle.to_tensor(rng.standard_normal((3, first.in_dense, 41, 41)).astype("float32"))
    batch = (None, dense)
    images = [(None, dense[i:i + 1]) for i in range(3)]
    if gemm_rows_are_independent():
        assert_equal = np.testing.assert_array_equal
    else:
        def assert_equal(actual, desired):
            np.testing.assert_allclose(actual, desired, rtol=0,
                                       atol=1e-6 * float(np.abs(desired).max()))
    with paddle.no_grad():
        for blocks in net.stages()[:2]:
            batch = run_stage(blocks, *batch)
            images = [run_stage(blocks, *image) for image in images]
            last = blocks[-1].shape
            valid = last.dense_before + last.inc
            for i, (resid, dense_out) in enumerate(images):
                assert_equal(batch[0].numpy()[i:i + 1], resid.numpy())
                assert_equal(batch[1].numpy()[i:i + 1, ..., :valid], dense_out.numpy()[..., :valid])


@pytest.mark.parametrize("change,match", [
    (lambda a: a[2].pop(), "'weights' must hold 4 tensors for the stage's first block"),
    (lambda a: a.__setitem__(3, a[3][:, 1:]), "scale_shift"),
    (lambda a: a[2].__setitem__(4, paddle.zeros([8, 3, 1, 1])),
     r"dpn_fast_dpn_stage \(block 1\): 'w_a' must have shape"),
    (lambda a: a[2].__setitem__(0, paddle.zeros([8, 3, 1, 1])), "'w_proj' must have shape"),
])
def test_bad_stage_inputs_raise_clear_errors(change, match):
    net = create_model("DPN68")
    net.eval()
    blocks = net.stages()[0][:3]  # a projection block and two normal ones
    layout = stage_layout(blocks)
    with paddle.no_grad():
        args = [None, paddle.randn([1, blocks[0].shape.in_dense, 5, 5]), stage_weights(blocks),
                fold_batch_norms(stage_batch_norms(blocks)), layout.groups, layout.stride,
                layout.dense_channels, layout.capacity]
        assert all(np.isfinite(t.numpy()).all() for t in stage_launch(*args))
        change(args)
        with pytest.raises(Exception, match=match):
            stage_launch(*args)
