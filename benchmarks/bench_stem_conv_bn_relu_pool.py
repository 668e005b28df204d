"""Paddle conv2d + BatchNorm + ReLU + max pool vs the fused stem_conv_bn_relu_pool (CPU), at the
five DPN stems on 224x224 images.

    pytest benchmarks/bench_stem_conv_bn_relu_pool.py --benchmark-group-by=group

Threads: the fused op uses Paddle's CPU thread setting (FLAGS_paddle_num_threads, default 1)
unless DPN_FAST_NUM_THREADS says otherwise, so by default both sides run on 1 thread.
"""
import numpy as np
import paddle
import pytest

from dpn_fast.models.config import CONFIGS
from dpn_fast.ops import stem_conv_bn_relu_pool
from dpn_fast.ops.stem_conv_bn_relu_pool import reference_stem_conv_bn_relu_pool

STEMS = sorted({(cfg.init_filters, cfg.stem_kernel) for cfg in CONFIGS.values()})


@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("c_out,kernel", STEMS, ids=[f"c{c}-k{k}" for c, k in STEMS])
def test_eval(benchmark, c_out, kernel, n, impl):
    rng = np.random.default_rng(0)
    args = [paddle.to_tensor(a.astype("float32")) for a in (
        rng.standard_normal((n, 3, 224, 224)),
        rng.standard_normal((c_out, 3, kernel, kernel)) / kernel,
        rng.uniform(0.5, 1.5, c_out), rng.standard_normal(c_out),
        rng.standard_normal(c_out), rng.uniform(0.5, 2.0, c_out))]
    fn = (reference_stem_conv_bn_relu_pool if impl == "reference" else stem_conv_bn_relu_pool)
    benchmark.group = f"stem n={n} C_out={c_out} {kernel}x{kernel}"
    with paddle.no_grad():
        benchmark.pedantic(fn, args=args, warmup_rounds=3, rounds=20, iterations=3)
