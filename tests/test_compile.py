"""dpn_fast.compile: the CPU inference object against the fused model and a float64 reference,
its ownership of what it prepared, its export and bad arguments (concurrent calls:
test_concurrency.py)."""
import re

import numpy as np
import paddle
import pytest
from test_fused_models import build_trio, images, random_state
from utils import assert_matches_reference

import dpn_fast
from dpn_fast.inference import create_predictor, export, run_predictor


def compiled_trio(name, seed):
    """(compiled, reference fp32, reference fp64) with the same random state."""
    reference, _, reference64 = build_trio(name, seed)
    for model in (reference, reference64):
        model.eval()
    return dpn_fast.compile(reference), reference, reference64


@pytest.mark.parametrize("name,shape", [("DPN68", (3, 3, 65, 57)), ("DPN92", (1, 3, 224, 224))])
def test_matches_float64_reference(name, shape):
    compiled, reference, reference64 = compiled_trio(name, seed=20)
    x = images(shape, seed=21)
    with paddle.no_grad():
        ref32 = reference(paddle.to_tensor(x)).numpy()
        ref64 = reference64(paddle.to_tensor(x.astype("float64"))).numpy()
    out = compiled(paddle.to_tensor(x)).numpy()
    assert out.shape == (shape[0], 1000)
    assert_matches_reference(out, ref64, ref32, name=f"compiled {name} logits")


def test_agrees_with_the_fused_model():
    """The same ops on the same folds; only the 1x1 weights' layout differs (packed for this CPU).
    Where oneDNN runs both layouts with one kernel (brg_matmul on AVX-512) the logits are bit
    for bit the fused model's; where it does not (gemm:jit on AVX2 CPUs: the plain weights are
    read transposed) they differ in the last bits of the accumulation. Compiling a fused model
    gives what compiling its reference gives."""
    reference, fused, _ = build_trio("DPN68", seed=22)
    fused.eval()
    x = paddle.to_tensor(images((2, 3, 49, 49), seed=23))
    with paddle.no_grad():
        expected = fused(x).numpy()
    from_reference = dpn_fast.compile(reference)(x).numpy()
    np.testing.assert_array_equal(dpn_fast.compile(fused)(x).numpy(), from_reference)
    np.testing.assert_allclose(from_reference, expected, rtol=0,
                               atol=1e-5 * float(np.abs(expected).max()))


def test_later_changes_to_the_model_do_not_reach_it():
    """It owns its copies: set_state_dict, in-place set_value and an optimizer step on the source
    model leave its logits bit for bit as they were."""
    compiled, reference, _ = compiled_trio("DPN68", seed=24)
    x = paddle.to_tensor(images((1, 3, 40, 40), seed=25))
    before = compiled(x).numpy()
    reference.set_state_dict(random_state(reference, seed=26))
    reference.out.weight.set_value(paddle.zeros_like(reference.out.weight))
    reference.train()
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=reference.parameters())
    reference(x).sum().backward()
    optimizer.step()
    np.testing.assert_array_equal(compiled(x).numpy(), before)


def test_runs_under_grad_mode_and_ignores_train():
    compiled, _, _ = compiled_trio("DPN68", seed=27)
    x = paddle.to_tensor(images((1, 3, 32, 32), seed=28))
    with paddle.no_grad():
        expected = compiled(x).numpy()
    compiled.train()
    np.testing.assert_array_equal(compiled(x).numpy(), expected)


@pytest.mark.parametrize("use_onednn", [True, False])
def test_export_runs_in_paddle_inference(tmp_path, use_onednn):
    """The export holds the prepared tensors: stem, stage and head ops and nothing else (no BN
    fold at run time), and gives the dynamic graph's logits."""
    compiled, _, _ = compiled_trio("DPN68", seed=31)
    prefix = export(compiled, str(tmp_path / "dpn68_compiled"), image_size=64)
    program = open(prefix + ".json").read()
    custom_ops = re.findall(r'"3\.(dpn_fast_[a-z_0-9]+)"', program)
    assert sorted(custom_ops) == sorted(["dpn_fast_stem_conv_bn_relu_pool"]
                                        + ["dpn_fast_dpn_stage"] * 4 + ["dpn_fast_dpn_head"])
    paddle_ops = [op for op in re.findall(r'"#":"1\.([a-z_0-9]+)"', program)
                  if not op.startswith("a_")]  # "1.a_*": attribute types
    assert paddle_ops == ["data", "fetch"]
    x = images((2, 3, 64, 64), seed=32)
    expected = compiled(paddle.to_tensor(x)).numpy()
    got = run_predictor(create_predictor(prefix, use_onednn=use_onednn), x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _foreign_layout(compiled):
    """Rewrites one packed 1x1 weight's header as if packed on a CPU whose oneDNN lays it out
    otherwise (a layout no oneDNN picks, so the test means the same on every CPU); returns that
    layout's name."""
    blob = compiled.stage0_weight0
    foreign = b"brg_matmul:foreign_isa BA8a24b"
    data = blob.numpy()
    header = data.reshape(-1)[:112]
    header[:] = 0
    header[:len(foreign)] = np.frombuffer(foreign, np.uint8)
    blob.set_value(data)
    return foreign.decode()


def grouped_conv_blobs(stage_weights):
    """Positions of the grouped convs' blobs in a compiled stage's weights: the first block's
    w_proj resid, dense, w_a, w_conv, w_c resid, dense, then w_a, w_conv, w_c resid, dense."""
    return [3] + list(range(7, len(stage_weights), 4))


def test_keeps_only_packed_weights():
    """Each 1x1 GEMM's weight is one uint8 blob (the projection's and 1x1c's split into their
    resid and dense GEMMs), each grouped conv's and the classifier's too; the plain float32
    copies are not kept beside them (only the stem's convolution stays float32)."""
    compiled, reference, _ = compiled_trio("DPN68", seed=34)
    weights, _, layout = compiled._stages[0]
    assert layout.packed_weights
    assert [w.dtype for w in weights] == [paddle.uint8] * len(weights)
    for w, conv in zip([weights[i] for i in grouped_conv_blobs(weights)],
                       [block.c3x3_b_func._conv.weight for block in reference.stages()[0]]):
        assert w.shape[0] == conv.shape[0]  # one row per output channel
    assert compiled._head[1].dtype == paddle.uint8
    float_buffers = [b for b in compiled.buffers() if b.dtype == paddle.float32]
    assert [b.shape for b in float_buffers if len(b.shape) == 4] == [
        reference.conv1_x_1_func._conv.weight.shape]


def test_refuses_grouped_conv_packed_for_other_kernels(monkeypatch):
    """A grouped conv blob laid out for another kernel variant (vector width) never runs: here one
    packed for the portable kernels (DPN_FAST_CPU_ISA=baseline) on a CPU that runs wider ones."""
    _, reference, _ = compiled_trio("DPN68", seed=37)
    monkeypatch.setenv("DPN_FAST_CPU_ISA", "baseline")
    foreign = dpn_fast.compile(reference)
    monkeypatch.delenv("DPN_FAST_CPU_ISA")
    x = paddle.to_tensor(images((1, 3, 32, 32), seed=38))
    with pytest.raises(OSError, match=r"'w_conv' does not fit this CPU: it was packed for the "
                                      r"baseline kernels, this CPU runs the avx(512|2) ones"):
        foreign(x)


def test_refuses_weights_packed_for_another_cpu(tmp_path):
    """A blob packed where oneDNN picks another layout never runs: the stage op refuses it,
    naming both layouts, in the dynamic graph and in an export run by Paddle Inference (which
    passes a custom op's error on as a bare 'std::exception')."""
    compiled, _, _ = compiled_trio("DPN68", seed=35)
    foreign = _foreign_layout(compiled)
    x = images((1, 3, 32, 32), seed=36)
    match = rf"packed for '{foreign}', this CPU's oneDNN lays this weight out as '"
    with pytest.raises(OSError, match=match):
        compiled(paddle.to_tensor(x))
    prefix = export(compiled, str(tmp_path / "dpn68_foreign"), image_size=32)
    with pytest.raises(Exception, match="std::exception"):
        run_predictor(create_predictor(prefix, use_onednn=False), x)


def test_empty_batch():
    compiled, _, _ = compiled_trio("DPN68", seed=33)
    assert compiled(paddle.zeros([0, 3, 32, 32])).shape == [0, 1000]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(precision="int8"), ValueError, r"precision must be one of \('fp32', 'bf16'\)"),
    (dict(device="tpu"), ValueError, r"device must be one of \('cpu', 'gpu'\), got 'tpu'"),
])
def test_bad_compile_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        dpn_fast.compile(dpn_fast.DPN68(), **kwargs)


def test_compile_refuses_other_models():
    with pytest.raises(TypeError, match="expected a dpn_fast DPN model, got Linear"):
        dpn_fast.compile(paddle.nn.Linear(2, 2))
    model = dpn_fast.DPN68()
    model.to(dtype="float64")
    with pytest.raises(TypeError, match=r"runs float32 models.*model.to\(dtype='float32'\)"):
        dpn_fast.compile(model)


@pytest.mark.parametrize("shape,dtype,error,match", [
    ((3, 32, 32), "float32", ValueError, r"\[N, 3, H, W\]"),
    ((1, 4, 32, 32), "float32", ValueError, r"\[N, 3, H, W\]"),
    ((1, 3, 0, 32), "float32", ValueError, "empty"),
    ((1, 3, 32, 32), "float64", TypeError, r"x.astype\('float32'\)"),
])
def test_bad_inputs_raise_clear_errors(shape, dtype, error, match):
    compiled = dpn_fast.compile(dpn_fast.DPN68())
    with pytest.raises(error, match=match):
        compiled(paddle.zeros(shape, dtype))
    with pytest.raises(TypeError, match="must be a paddle.Tensor"):
        compiled(np.zeros((1, 3, 32, 32), "float32"))
