"""dual_path_merge benchmarks: plain-Paddle reference vs each fused backend at DPN92's merges.

One group per (mode, stage, batch); modes:
  eval_bn  the whole block tail + next head in eval: split + add + concat, concat + BatchNorm(relu)
           (reference) vs dual_path_merge_bn_relu (BN folded in-kernel) and dual_path_merge with
           pre-folded scale/shift, and dual_path_merge_into (new dense channels written into a
           stage-wide buffer, inference);
  merge    the tail only: split + add + concat vs dual_path_merge.
Run: pytest benchmarks/bench_dual_path_merge.py --benchmark-only (CPU: batch 1 and 8).
"""
import importlib

import numpy as np
import paddle
import pytest

import dpn_fast.ops as ops
from dpn_fast.models.config import block_shapes

merge_mod = importlib.import_module("dpn_fast.ops.dual_path_merge")

# Per stage, DPN92's widest merge (last block: most dense channels).
STAGE_SHAPES = {b.stage: (b.resid, b.dense_before, b.inc, b.out_hw) for b in block_shapes("DPN92")}
BATCHES = (1, 8)
ON_GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
FUSED_BACKENDS = ("cuda", "triton") if ON_GPU else ("cpu",)


def make_case(stage, batch):
    r, d, inc, hw = STAGE_SHAPES[stage]
    g = np.random.default_rng(stage)
    resid, dense, y = (paddle.to_tensor(g.standard_normal((batch, c, hw, hw)).astype("f4"))
                       for c in (r, d, r + inc))
    bn = paddle.nn.BatchNorm(r + d + inc, act="relu")
    bn._mean.set_value(g.standard_normal(r + d + inc).astype("f4"))
    bn._variance.set_value((g.random(r + d + inc) + 0.5).astype("f4"))
    bn.eval()
    return resid, dense, y, bn


def run(benchmark, fn):
    for _ in range(3):
        fn()
    benchmark.pedantic(fn, rounds=30, iterations=5, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("impl", ("reference", "fused_bn", "fused_scale_shift", "fused_into"))
def test_eval_bn(benchmark, impl, stage, batch):
    benchmark.group = f"eval_bn DPN92 stage{stage + 1} {STAGE_SHAPES[stage]} batch {batch}"
    resid, dense, y, bn = make_case(stage, batch)
    with paddle.no_grad():
        if impl == "reference":
            run(benchmark, lambda: merge_mod.reference_dual_path_merge_bn_relu(resid, dense, y, bn))
        elif impl == "fused_bn":
            run(benchmark, lambda: ops.dual_path_merge_bn_relu(resid, dense, y, bn))
        elif impl == "fused_into":
            # Stage buffer: the old dense channels are already in place, only new ones written.
            r, d, inc, _ = STAGE_SHAPES[stage]
            buffer = paddle.concat([dense, y[:, r:]], axis=1)
            run(benchmark, lambda: ops.dual_path_merge_into(resid, buffer, d, y, bn=bn))
        else:
            scale, shift = ops.fold_batch_norm(bn)
            run(benchmark, lambda: ops.dual_path_merge(resid, dense, y, scale, shift))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("backend", ("reference",) + FUSED_BACKENDS)
def test_merge(benchmark, backend, stage, batch):
    benchmark.group = f"merge DPN92 stage{stage + 1} {STAGE_SHAPES[stage]} batch {batch}"
    resid, dense, y, _ = make_case(stage, batch)
    with paddle.no_grad():
        run(benchmark, lambda: ops.dual_path_merge(resid, dense, y, backend=backend))
