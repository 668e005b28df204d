"""dpn_fast.compile(precision="bf16"): its logits against a plain-Paddle emulation of its numerics
(the weights of every convolution and their inputs rounded to bf16, and the stage's dense
channels; everything else float32) and the same emulation in float64, against the
float32 model, its export and its packed weights; on a CPU without bf16 matmul kernels, its
error."""
import os
import re

import numpy as np
import paddle
import pytest
from test_compile import grouped_conv_blobs
from test_fused_models import build_trio, images
from utils import assert_matches_reference, max_abs_err, round_to_bf16, run_script

import dpn_fast
from dpn_fast.inference import create_predictor, export, run_predictor
from dpn_fast.ops.cpu_features import bf16_gemm_supported
from dpn_fast.ops.dpn_block import head_launch, stage_launch
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_launch

NO_BF16_REASON = "this CPU has no bf16 matmul kernels (AVX512_BF16 or AMX-BF16)"
needs_bf16 = pytest.mark.skipif(not bf16_gemm_supported(), reason=NO_BF16_REASON)

# A loose bound on |bf16 logits - float32 model's| / max |logit|: far above bf16's rounding
# noise, far below what a wrong operand, layout or weight gives.
MAX_REL_ERR_VS_FP32 = 2e-2


def bf16_layers(model):
    """The layers the bf16 engine runs on bf16 weights and inputs: the stem's convolution and each
    block's projection, 1x1a, grouped 3x3 and 1x1c (the classifier stays float32)."""
    layers = [model.conv1_x_1_func._conv]
    for block in model.blocks:
        layers += [block.c1x1_w_func._conv] if block.has_proj else []
        layers += [block.c1x1_a_func._conv, block.c3x3_b_func._conv, block.c1x1_c_func._conv]
    return layers


def round_tensor(x):
    return paddle.to_tensor(round_to_bf16(x.numpy()))


def emulate_bf16(model):
    """Turns `model` (float32 or float64) into the plain-Paddle emulation of the bf16 engine, in
    its own dtype: each bf16 layer's weight rounded to bf16 now, its input (the image or a BN +
    ReLU output) at every call, and each block's dense output (the stage's dense buffer; its
    residual stays unrounded)."""
    for layer in bf16_layers(model):
        layer.weight.set_value(round_to_bf16(layer.weight.numpy()))
        layer.register_forward_pre_hook(lambda layer, inputs: (round_tensor(inputs[0]),))
    for block in model.blocks:
        block.register_forward_post_hook(
            lambda block, inputs, outputs: [outputs[0], round_tensor(outputs[1])])


def bf16_logits(name, shape, seed):
    """(compiled bf16 logits, float32 emulation's, float64 emulation's, float32 model's) on
    random images of `shape`, one random state."""
    reference, _, reference64 = build_trio(name, seed)
    for model in (reference, reference64):
        model.eval()
    compiled = dpn_fast.compile(reference, precision="bf16")
    x = images(shape, seed=seed + 1)
    with paddle.no_grad():
        fp32 = reference(paddle.to_tensor(x)).numpy()
        for model in (reference, reference64):
            emulate_bf16(model)
        emulation32 = reference(paddle.to_tensor(x)).numpy()
        emulation64 = reference64(paddle.to_tensor(x.astype("float64"))).numpy()
    return compiled(paddle.to_tensor(x)).numpy(), emulation32, emulation64, fp32


def check_bf16_logits(name, shape, seed):
    out, emulation32, emulation64, fp32 = bf16_logits(name, shape, seed)
    assert out.shape == (shape[0], 1000) and out.dtype == np.float32
    rel_err_vs_fp32 = max_abs_err(out, fp32) / float(np.abs(fp32).max())
    rel_err_vs_emulation = max_abs_err(out, emulation64) / float(np.abs(emulation64).max())
    summary = (f"compiled bf16 {name}: max |bf16 - fp32 model| / max |logit| = "
               f"{rel_err_vs_fp32:.2e}, max |bf16 - float64 emulation| / max |logit| = "
               f"{rel_err_vs_emulation:.2e}")
    assert_matches_reference(out, emulation64, emulation32, dtype="bfloat16",
                             name=f"{summary}; logits vs the float64 emulation")
    assert rel_err_vs_fp32 < MAX_REL_ERR_VS_FP32, summary


def test_rounding_matches_paddles_cast():
    """round_to_bf16 rounds float32 as Paddle's cast to bfloat16 does (to nearest, ties to even),
    and float64 to the same bf16 values where they are float32 values."""
    x = np.concatenate([images((4096,), seed=40),
                        np.float32([1 + 2**-8, 1 + 3 * 2**-8, -1 - 2**-8, 1 + 2**-8 + 2**-20])])
    by_paddle = paddle.cast(paddle.cast(paddle.to_tensor(x), "bfloat16"), "float32").numpy()
    np.testing.assert_array_equal(round_to_bf16(x), by_paddle)
    np.testing.assert_array_equal(round_to_bf16(x.astype("float64")), by_paddle)
    assert list(round_to_bf16(x[-4:])) == [1.0, 1 + 2**-6, -1.0, 1 + 2**-7]


# Every block shape of the five models at 224x224 (batch 1) and at an odd size with batch 3; in
# CI DPN92 at 224 (its 3-channel groups run the float kernel on bf16 activations, the rest the
# bf16 pairs kernel) and DPN68 at the odd size.
EMULATION_CASES = [
    pytest.param(name, shape, marks=[] if (name, shape) in {
        ("DPN68", (3, 3, 65, 57)), ("DPN92", (1, 3, 224, 224))} else [pytest.mark.slow],
        id=f"{name}-{'x'.join(map(str, shape))}")
    for name in ("DPN68", "DPN92", "DPN98", "DPN107", "DPN131")
    for shape in ((1, 3, 224, 224), (3, 3, 65, 57))]


@needs_bf16
@pytest.mark.parametrize("name,shape", EMULATION_CASES)
def test_matches_the_emulation(name, shape):
    check_bf16_logits(name, shape, seed=50)


@needs_bf16
@pytest.mark.parametrize("use_onednn", [True, False])
def test_export_runs_in_paddle_inference(tmp_path, use_onednn):
    """The export carries the bf16 blobs and the stage ops' bf16 attribute: Paddle Inference gives
    the dynamic graph's logits."""
    reference, _, _ = build_trio("DPN68", seed=54)
    reference.eval()
    compiled = dpn_fast.compile(reference, precision="bf16")
    prefix = export(compiled, str(tmp_path / "dpn68_bf16"), image_size=64)
    assert len(re.findall(r'"3\.dpn_fast_dpn_stage"', open(prefix + ".json").read())) == 4
    x = images((2, 3, 64, 64), seed=55)
    expected = compiled(paddle.to_tensor(x)).numpy()
    got = run_predictor(create_predictor(prefix, use_onednn=use_onednn), x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def run_stage(compiled, index, resid, dense):
    """(resid, dense) after stage `index` of the compiled engine on its input (resid, dense)."""
    weights, scale_shift, layout = compiled._stages[index]
    return stage_launch(resid, dense, weights, scale_shift, layout.groups, layout.stride,
                        layout.dense_channels, layout.capacity, layout.packed_weights,
                        layout.bf16_stage)


def first_stage_output(compiled, x):
    """(resid, dense) after the compiled engine's stem and first stage."""
    return run_stage(compiled, 0, None, stem_launch(x, *compiled._stem))


@needs_bf16
def test_stage_buffers_carry_their_precision():
    """A bf16 stage hands on its dense buffer as bfloat16 and its residual as float32; a stage of
    the other precision refuses that buffer by name; the head reads either."""
    reference, _, _ = build_trio("DPN68", seed=57)
    reference.eval()
    fp32, bf16 = (dpn_fast.compile(reference, precision=p) for p in ("fp32", "bf16"))
    x = paddle.to_tensor(images((1, 3, 32, 32), seed=58))
    resid, dense = first_stage_output(bf16, x)
    assert (resid.dtype, dense.dtype) == (paddle.float32, paddle.bfloat16)
    assert first_stage_output(fp32, x)[1].dtype == paddle.float32
    for mixed, message in [
            (fp32, r"'dense' must be float32 \(only a bf16 stage reads a bfloat16 dense buffer\), "
                   r"got bfloat16"),
            (bf16, r"'dense' must be bfloat16 \(a bf16 stage reads the previous bf16 stage's "
                   r"dense buffer\), got float32")]:
        other = first_stage_output(fp32 if mixed is bf16 else bf16, x)
        with pytest.raises(OSError, match=message):
            run_stage(mixed, 1, *other)
    for compiled in (fp32, bf16):  # the stages after the first, then the head
        resid, dense = first_stage_output(compiled, x)
        for index in range(1, len(compiled._stages)):
            resid, dense = run_stage(compiled, index, resid, dense)
        np.testing.assert_array_equal(head_launch(resid, dense, *compiled._head).numpy(),
                                      compiled(x).numpy())


def runs_bf16_pairs():
    """Whether this CPU runs the grouped conv on pairs of bf16 channels: AVX512_BF16, and the
    AVX-512 kernels not held back by DPN_FAST_CPU_ISA."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    return "avx512_bf16" in flags and not os.environ.get("DPN_FAST_CPU_ISA")


@needs_bf16
def test_packed_weights_are_bf16():
    """The 1x1 GEMMs' blobs hold bf16 values: about half the float32 blobs' bytes in all (a
    small weight's blob is mostly header and oneDNN's padding, as large in either); the grouped
    convs' blobs hold bf16 weights too, laid out for vdpbf16ps (their header names the
    avx512_bf16 kernels) where the CPU has AVX512_BF16 and the groups whole pairs of channels."""
    reference, _, _ = build_trio("DPN68", seed=56)
    fp32, bf16 = (dpn_fast.compile(reference, precision=p) for p in ("fp32", "bf16"))
    fp32_bytes = bf16_bytes = 0
    for (fp32_weights, _, fp32_layout), (bf16_weights, _, bf16_layout) in zip(fp32._stages,
                                                                             bf16._stages):
        assert bf16_layout.bf16_stage and not fp32_layout.bf16_stage
        convs = grouped_conv_blobs(fp32_weights)
        for i, (fp32_weight, bf16_weight) in enumerate(zip(fp32_weights, bf16_weights)):
            if i in convs:
                kernels = bytes(bf16_weight.numpy().reshape(-1)[:16]).rstrip(b"\0").decode()
                assert kernels == ("avx512_bf16" if runs_bf16_pairs() else
                                   bytes(fp32_weight.numpy().reshape(-1)[:16]).rstrip(b"\0")
                                   .decode())
                assert not np.array_equal(bf16_weight.numpy(), fp32_weight.numpy())
            else:
                assert bf16_weight.size <= fp32_weight.size
                fp32_bytes += fp32_weight.size
                bf16_bytes += bf16_weight.size
    assert 0.45 < bf16_bytes / fp32_bytes < 0.55, f"bf16 blobs {bf16_bytes} B, fp32 {fp32_bytes} B"


@pytest.mark.skipif(bf16_gemm_supported(), reason="this CPU has bf16 matmul kernels")
def test_compile_refuses_bf16_without_bf16_kernels():
    with pytest.raises(RuntimeError, match=r"AVX512_BF16 or AMX-BF16.*this CPU has neither; use "
                                           r"precision='fp32'"):
        dpn_fast.compile(dpn_fast.DPN68(), precision="bf16")



def test_compile_refuses_bf16_where_onednn_is_held_below_bf16():
    """The same error on every CPU: oneDNN held to AVX-512 without bf16 (ONEDNN_MAX_CPU_ISA) has
    no bf16 matmul kernels to offer."""
    run_script("""
import dpn_fast
from dpn_fast.ops.cpu_features import bf16_gemm_supported
assert not bf16_gemm_supported()
try:
    dpn_fast.compile(dpn_fast.DPN68(), precision="bf16")
except RuntimeError as e:
    assert "this CPU has neither; use precision='fp32'" in str(e), e
    print("ok")
""", env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
