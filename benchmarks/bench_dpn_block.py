"""The whole-block op vs the plain-Paddle block (CPU inference), and where a fused model's block
time goes.

    pytest benchmarks/bench_dpn_block.py --benchmark-group-by=group
    python benchmarks/bench_dpn_block.py --model DPN92 --batch-size 1 --threads 2

The pytest groups put the reference block and the op side by side for the first and a normal
block of each DPN92 stage. The script runs the fused model and splits its blocks' time into input
BN + ReLU, projection, 1x1a, grouped conv and 1x1c (the op's own timers, which the script switches
on with DPN_FAST_PROFILE=1), and compares the 1x1 GEMMs' rate with this machine's GEMM peak: a
2048^3 oneDNN matmul through the same code.
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
from dpn_fast.models.config import CONFIGS, block_shapes
from dpn_fast.models.dpn import DualPathBlock
from dpn_fast.ops.dpn_block import (block_launch, reference_dpn_block, stage_launch,
                                    to_channels_last)
from dpn_fast.ops.stem_conv_bn_relu_pool import stem_launch

PARTS = ("input BN+ReLU", "projection 1x1", "1x1a", "grouped 3x3", "1x1c")
GEMM_PARTS = (1, 2, 4)
_library = ctypes.CDLL(_extension.LIBRARY_PATH)
_library.dpn_fast_dpn_block_profile.restype = ctypes.c_int
_library.dpn_fast_gemm_gflops.restype = ctypes.c_double
_library.dpn_fast_gemm_gflops.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]
_library.dpn_fast_gemm_impl.restype = ctypes.c_char_p
_library.dpn_fast_gemm_impl.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]


def block_profile(reset=True):
    """(seconds, flops) per part of the blocks since the last reset."""
    seconds, flops = (ctypes.c_double * len(PARTS))(), (ctypes.c_double * len(PARTS))()
    if not _library.dpn_fast_dpn_block_profile(seconds, flops, int(reset)):
        raise RuntimeError("the blocks' timers are off: set DPN_FAST_PROFILE=1 before importing "
                           "dpn_fast")
    return np.array(seconds), np.array(flops)


def gemm_peak(size=2048, iterations=5):
    """(GFLOP/s, oneDNN implementation) of a size^3 matmul on gemm_f32's path."""
    rate = _library.dpn_fast_gemm_gflops(size, size, size, iterations)
    return rate, _library.dpn_fast_gemm_impl(size, size, size, 0).decode()


def block_gemm_impl():
    """The oneDNN implementation of a block's 1x1 convolution (DPN92's first 1x1a: 56x56
    positions, 64 -> 96 channels, weights as given)."""
    return _library.dpn_fast_gemm_impl(56 * 56, 96, 64, 1).decode()


STAGE_BLOCKS = [shape for shape in block_shapes("DPN92") if shape.index in (0, 1)]


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("shape", STAGE_BLOCKS, ids=[f"{s.kind}-stage{s.stage}" for s in STAGE_BLOCKS])
def test_block(benchmark, shape, n, impl):
    paddle.seed(0)
    block = DualPathBlock(shape, fused=False)
    block.eval()
    rng = np.random.default_rng(0)
    hw = shape.in_hw
    resid = (None if shape.kind == "proj" else
             paddle.to_tensor(rng.standard_normal((n, shape.in_resid, hw, hw)), "float32"))
    capacity = shape.stage_dense if shape.kind == "normal" else shape.in_dense
    dense = paddle.to_tensor(rng.standard_normal((n, capacity, hw, hw)), "float32")
    benchmark.group = f"DPN92 {shape.kind} block, stage {shape.stage}, n={n}"
    fn = reference_dpn_block
    if impl == "cpu":  # the op on the stage buffers' own channels-last layout, as the model runs it
        fn = block_launch
        if resid is not None:
            resid, dense = to_channels_last(resid), to_channels_last(dense)
    with paddle.no_grad():
        # A normal block updates its buffers in place: rerunning it only changes their values.
        benchmark.pedantic(fn, args=(block, resid, dense, shape.in_dense), warmup_rounds=2,
                           rounds=10, iterations=2)


def fused_model_and_input(name, batch):
    """The fused model (seeded random weights, eval) and a random 224x224 batch."""
    paddle.seed(0)
    model = dpn_fast.create_model(name, fused=True)
    model.eval()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)), "float32")
    return model, x


def profile_model(name, batch, iterations=10):
    """Median forward time (s) of the fused model and its blocks' (seconds, flops) per part,
    per forward."""
    model, x = fused_model_and_input(name, batch)
    times = []
    with paddle.no_grad():
        for _ in range(3):
            model(x)
        block_profile(reset=True)
        for _ in range(iterations):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    seconds, flops = block_profile(reset=True)
    return float(np.median(times)), seconds / iterations, flops / iterations


def profile_stages(name, batch, iterations=10):
    """Per stage, its blocks' seconds per part and total, per run of the stage op; the stages run
    one after another on the outputs of the previous one, as in the model."""
    model, x = fused_model_and_input(name, batch)
    stem, bn = model.conv1_x_1_func._conv, model.conv1_x_1_func._batch_norm
    with paddle.no_grad():
        inputs, resid, dense = [], None, stem_launch(x, stem, bn)
        for blocks in model._stages():
            inputs.append((blocks, resid, dense))
            resid, dense = stage_launch(blocks, resid, dense, blocks[0].shape.in_dense)
        seconds = np.zeros((len(inputs), len(PARTS)))
        block_profile(reset=True)
        for _ in range(iterations):
            for i, (blocks, resid, dense) in enumerate(inputs):
                stage_launch(blocks, resid, dense, blocks[0].shape.in_dense)
                seconds[i] += block_profile(reset=True)[0]
    return seconds / iterations


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DPN92", choices=sorted(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-stage", action="store_true",
                        help="also split the blocks' time by stage")
    args = parser.parse_args()
    paddle.base.core.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    peak, impl = gemm_peak()
    total, seconds, flops = profile_model(args.model, args.batch_size)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), {cpu}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"forward {total * 1e3:.1f} ms, blocks {seconds.sum() * 1e3:.1f} ms")
    print("| part | ms | GFLOP/s |\n|---|---|---|")
    for part, s, f in zip(PARTS, seconds, flops):
        print(f"| {part} | {s * 1e3:.2f} | {f / s * 1e-9 if s else 0:.1f} |")
    gemm_s, gemm_f = seconds[list(GEMM_PARTS)].sum(), flops[list(GEMM_PARTS)].sum()
    rate = gemm_f / gemm_s * 1e-9
    print(f"1x1 GEMMs ({block_gemm_impl()}): {gemm_s * 1e3:.1f} ms, {rate:.1f} GFLOP/s = "
          f"{rate / peak:.0%} of the 2048^3 matmul's {peak:.1f} GFLOP/s ({impl})")
    if args.per_stage:
        print("| stage | " + " | ".join(PARTS) + " | all |\n|" + "---|" * (len(PARTS) + 2))
        for stage, row in enumerate(profile_stages(args.model, args.batch_size), start=1):
            print(f"| {stage} | " + " | ".join(f"{v * 1e3:.2f}" for v in row)
                  + f" | {row.sum() * 1e3:.2f} |")


if __name__ == "__main__":
    main()
