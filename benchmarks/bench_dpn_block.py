"""The whole-block op vs the plain-Paddle block (CPU inference), and where the CPU engine's block
time goes.

    pytest benchmarks/bench_dpn_block.py --benchmark-group-by=group
    python benchmarks/bench_dpn_block.py --model DPN92 --batch-size 1 --threads 2

The pytest groups put the plain-Paddle block and the op (its BNs folded beforehand, as the engine
does) side by side for the first and a normal block of each DPN92 stage. The script runs the
compiled model (dpn_fast.compile) and splits its blocks' time into input
BN + ReLU, projection, 1x1a, grouped conv and 1x1c (the op's own timers, which the script switches
on with DPN_FAST_PROFILE=1), and compares the 1x1 GEMMs' rate with this machine's GEMM peak: a
2048^3 oneDNN matmul through the same code, timed here, in the model's precision
(`--precision bf16`: the bf16 engine against a bf16 matmul on bf16-packed weights).
`--per-stage` splits the same parts by stage (the stage ops run one after another, as in the
model).
"""
import argparse
import ctypes
import os
import platform
import time

if __name__ == "__main__":
    # The blocks' timers: read once, when dpn_fast loads its library. The pytest benchmarks run
    # without them.
    os.environ["DPN_FAST_PROFILE"] = "1"

import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast import _extension
from dpn_fast.engines.cpu import PRECISIONS, stage_batch_norms, stage_layout, stage_weights
from dpn_fast.models.config import CONFIGS, block_shapes
from dpn_fast.models.dpn import DualPathBlock
from dpn_fast.ops.cpu_features import gemm_impl
from dpn_fast.ops.dpn_block import (fold_launch, pack_stage_launch, stage_launch,
                                    to_channels_last)
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_launch

PARTS = ("input BN+ReLU", "projection 1x1", "1x1a", "grouped 3x3", "1x1c")
GEMM_PARTS = (1, 2, 4)
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_library = ctypes.CDLL(_extension.LIBRARY_PATH)
_library.dpn_fast_dpn_block_profile.restype = ctypes.c_int
_library.dpn_fast_gemm_f32.restype = None
_library.dpn_fast_gemm_f32.argtypes = [ctypes.c_int64] * 3 + [_FLOAT_P] * 3
_library.dpn_fast_gemm_bf16_packed.restype = ctypes.c_char_p
_library.dpn_fast_gemm_bf16_packed.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3


def block_profile(reset=True):
    """(seconds, flops) per part of the blocks since the last reset."""
    seconds, flops = (ctypes.c_double * len(PARTS))(), (ctypes.c_double * len(PARTS))()
    if not _library.dpn_fast_dpn_block_profile(seconds, flops, int(reset)):
        raise RuntimeError("the blocks' timers are off: set DPN_FAST_PROFILE=1 before importing "
                           "dpn_fast")
    return np.array(seconds), np.array(flops)


def gemm_call(size, precision):
    """A call of a size^3 GEMM through the library's 1x1-convolution path (gemm_f32, or gemm_bf16
    on a bf16-packed weight), on random operands."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty((size, size), np.float32)
    if precision == "fp32":
        args = (size, size, size, *(x.ctypes.data_as(_FLOAT_P) for x in (a, b, c)))
        return lambda: _library.dpn_fast_gemm_f32(*args)
    a_bf16 = paddle.to_tensor(a).astype("bfloat16").view("uint16").numpy()
    weight = paddle.to_tensor(b.reshape(size, size, 1, 1))  # a 1x1 convolution's [n, k, 1, 1]
    blob = _extension.run_op("dpn_fast_pack_1x1_weight", weight, 0, size, True)[0].numpy()
    # data_as keeps each array alive with the pointer (ctypes.data is a bare address).
    args = (size, size, size, *(x.ctypes.data_as(ctypes.c_void_p) for x in (a_bf16, blob, c)))

    def call():
        error = _library.dpn_fast_gemm_bf16_packed(*args)
        if error:
            raise RuntimeError(error.decode())

    return call


def gemm_peak(precision, size=2048, warmup=2, repeats=5):
    """(GFLOP/s, oneDNN implementation) of a size^3 matmul in `precision` through the 1x1
    convolutions' path: the median of `repeats` timed calls after `warmup` untimed ones."""
    call = gemm_call(size, precision)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    rate = 2 * size**3 / float(np.median(times)) * 1e-9
    if precision == "fp32":
        return rate, gemm_impl(size, size, size, "plain")
    return rate, gemm_impl(size, size, size, "packed", bf16=True)


def model_gemm_impls(name, batch, precision):
    """{oneDNN implementation: count} over the compiled model's 1x1 GEMMs (packed weights, as it
    runs them; a batch's stage runs images_per_run images together, which the row counts here
    ignore: the choice depends on the weight, not the rows, for packed GEMMs)."""
    impls = {}
    for s in block_shapes(name):
        pixels, pixels_out = batch * s.in_hw**2, batch * s.out_hw**2
        cin = s.in_resid + s.in_dense
        gemms = [(pixels, s.bottleneck, cin), (pixels_out, s.resid, s.bottleneck),
                 (pixels_out, s.inc, s.bottleneck)]
        if s.kind != "normal":
            gemms += [(pixels_out, s.resid, cin), (pixels_out, 2 * s.inc, cin)]
        for m, n, k in gemms:
            impl = gemm_impl(m, n, k, "packed", bf16=precision == "bf16")
            impls[impl] = impls.get(impl, 0) + 1
    return impls


STAGE_BLOCKS = [shape for shape in block_shapes("DPN92") if shape.index in (0, 1)]


def block_layers(block):
    """The block's BN + conv layers in the ops' order (projection first)."""
    return ([block.c1x1_w_func] if block.has_proj else []) + [
        block.c1x1_a_func, block.c3x3_b_func, block.c1x1_c_func]


def block_launch(block, resid, dense, scale_shift):
    """The block's op on channels-last stage buffers (a projection block: the stage op with this
    block alone; resid None and the stem's NCHW output for the network's first)."""
    weights = [layer._conv.weight for layer in block_layers(block)]
    shape = block.shape
    if block.has_proj:
        return stage_launch(resid, dense, weights, scale_shift, shape.groups, shape.stride,
                            shape.in_dense, shape.stage_dense)
    return _extension.run_op("dpn_fast_dpn_block", resid, dense, *weights, scale_shift,
                             shape.groups, shape.in_dense)


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("shape", STAGE_BLOCKS,
                         ids=[f"{s.kind}-stage{s.stage}" for s in STAGE_BLOCKS])
def test_block(benchmark, shape, n, impl):
    paddle.seed(0)
    block = DualPathBlock(shape)
    block.eval()
    rng = np.random.default_rng(0)
    hw = shape.in_hw
    resid = (None if shape.kind == "proj" else
             paddle.to_tensor(rng.standard_normal((n, shape.in_resid, hw, hw)), "float32"))
    dense = paddle.to_tensor(rng.standard_normal((n, shape.in_dense, hw, hw)), "float32")
    benchmark.group = f"DPN92 {shape.kind} block, stage {shape.stage}, n={n}"
    if impl == "reference":
        fn, args = block, ([resid, dense] if resid is not None else dense,)
    else:  # the op on the stage buffers' own channels-last layout, as the engine runs it
        if resid is not None:
            resid, dense = to_channels_last(resid), to_channels_last(dense)
        if shape.kind == "normal":  # room in the stage's dense buffer for the blocks to come
            dense = paddle.concat([dense, paddle.zeros(dense.shape[:3] + [
                shape.stage_dense - shape.in_dense], "float32")], axis=3)
        scale_shift = fold_launch([layer._batch_norm for layer in block_layers(block)])
        fn, args = block_launch, (block, resid, dense, scale_shift)
    with paddle.no_grad():
        # A normal block updates its buffers in place: rerunning it only changes their values.
        benchmark.pedantic(fn, args=args, warmup_rounds=2, rounds=10, iterations=2)


def compiled_model_and_input(name, batch, precision="fp32"):
    """The model compiled for the CPU engine in `precision` (seeded random weights) and a random
    224x224 batch."""
    paddle.seed(0)
    model = dpn_fast.create_model(name)
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)), "float32")
    return model, dpn_fast.compile(model, precision=precision), x


def profile_model(name, batch, precision, iterations=10):
    """Median forward time (s) of the compiled model and its blocks' (seconds, flops) per part,
    per forward."""
    _, engine, x = compiled_model_and_input(name, batch, precision)
    times = []
    for _ in range(3):
        engine(x)
    block_profile(reset=True)
    for _ in range(iterations):
        start = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - start)
    seconds, flops = block_profile(reset=True)
    return float(np.median(times)), seconds / iterations, flops / iterations


def profile_stages(name, batch, precision, iterations=10):
    """Per stage, its blocks' seconds per part and total, per run of the stage op; the stages run
    one after another on the outputs of the previous one, as in the engine."""
    model, _, x = compiled_model_and_input(name, batch, precision)
    bf16 = precision == "bf16"
    conv, bn = model.conv1_x_1_func._conv, model.conv1_x_1_func._batch_norm
    with paddle.no_grad():
        dense = stem_launch(x, conv.weight, bn.weight, bn.bias, bn._mean, bn._variance,
                            conv._stride[0], bn._epsilon)
        stages, resid = [], None
        for blocks in model.stages():
            layout = stage_layout(blocks)
            # Packed weights, as the compiled model runs them.
            args = [pack_stage_launch(stage_weights(blocks), layout.groups, bf16),
                    fold_launch(stage_batch_norms(blocks)), layout.groups, layout.stride,
                    layout.dense_channels, layout.capacity, True, bf16]
            stages.append((resid, dense, args))
            resid, dense = stage_launch(resid, dense, *args)
        seconds = np.zeros((len(stages), len(PARTS)))
        block_profile(reset=True)
        for _ in range(iterations):
            for i, (resid, dense, args) in enumerate(stages):
                stage_launch(resid, dense, *args)
                seconds[i] += block_profile(reset=True)[0]
    return seconds / iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DPN92", choices=sorted(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--per-stage", action="store_true",
                        help="also split the blocks' time by stage")
    args = parser.parse_args()
    paddle.base.core.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    peak, impl = gemm_peak(args.precision)
    total, seconds, flops = profile_model(args.model, args.batch_size, args.precision)
    print(f"{args.model} {args.precision}, batch {args.batch_size}, {args.threads} thread(s), "
          f"{cpu}, {time.strftime('%Y-%m-%d')}")
    print(f"forward {total * 1e3:.1f} ms, blocks {seconds.sum() * 1e3:.1f} ms")
    print(f"| part | ms | GFLOP/s | of the {args.precision} matmul's |\n|---|---|---|---|")
    for i, (part, s, f) in enumerate(zip(PARTS, seconds, flops)):
        rate = f / s * 1e-9 if s else 0.0
        share = f"{rate / peak:.0%}" if i in GEMM_PARTS else ""
        print(f"| {part} | {s * 1e3:.2f} | {rate:.1f} | {share} |")
    gemm_s, gemm_f = seconds[list(GEMM_PARTS)].sum(), flops[list(GEMM_PARTS)].sum()
    rate = gemm_f / gemm_s * 1e-9
    impls = ", ".join(f"{name} x{count}" for name, count in
                      model_gemm_impls(args.model, args.batch_size, args.precision).items())
    print(f"1x1 GEMMs ({impls}): {gemm_s * 1e3:.1f} ms, {rate:.1f} GFLOP/s = "
          f"{rate / peak:.0%} of the 2048^3 {args.precision} matmul's {peak:.1f} GFLOP/s ({impl})")
    if args.per_stage:
        print("| stage | " + " | ".join(PARTS) + " | all |\n|" + "---|" * (len(PARTS) + 2))
        rows = profile_stages(args.model, args.batch_size, args.precision)
        for stage, row in enumerate(rows, start=1):
            print(f"| {stage} | " + " | ".join(f"{v * 1e3:.2f}" for v in row)
                  + f" | {row.sum() * 1e3:.2f} |")


if __name__ == "__main__":
    main()
