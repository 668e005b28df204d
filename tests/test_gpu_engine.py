"""The Paddle GPU engine (`dpn_fast.compile(model, device="gpu")`, dpn_fast/engines/gpu.py),
checked without a GPU (Paddle GPU runs on none of this project's machines):

- its stage weights are the torch host's: prepared from a Paddle DPN68 by
  dpn_fast/kernels/_stage_weights.py, they equal bit for bit those prepared from timm's dpn68
  holding the same parameters;
- its stem and head (Paddle ops, here on CPU) around its stage plans run under Triton's
  interpreter on those weights, bound as the torch host binds them, give the Paddle reference's
  stem, stage and logits outputs at an odd size, against float64 (tests/utils.py's rule);
- the stage op's attributes encoding its plans decode to the plans' launches, each a variant
  the op library embeds, and the weights hold what the op checks they hold;
- compile(device="gpu") refuses here with GpuUnavailableError naming what is missing.
Needs torch, timm and triton (skipped where one is missing), as tests/test_torch_fuse.py.
"""
import numpy as np
import paddle
import pytest

import dpn_fast
from dpn_fast import _extension
from _interpreter import INTERPRETED, needs_interpreter, run_module_interpreted
from test_fused_models import random_state
from test_torch_fuse import requirements
from utils import assert_matches_reference

pytest.importorskip("triton")

from dpn_fast.engines import gpu  # noqa: E402

CLASSES = 10


@pytest.mark.skipif(INTERPRETED, reason="the driver of the interpreted run")
def test_under_interpreter():
    requirements()
    run_module_interpreted(__file__)


def paddle_dpn68(dtype="float32"):
    """PaddleClas's DPN68 with random weights and BN statistics (the same every call)."""
    model = dpn_fast.DPN68(class_num=CLASSES)
    model.set_state_dict(random_state(model, 7))
    model.to(dtype=dtype)
    model.eval()
    return model


def timm_twin(torch, timm, model):
    """timm's dpn68 holding the parameters of `model` (a Paddle DPN68), with its BN epsilon."""
    twin = timm.create_model("dpn68", num_classes=CLASSES).eval()

    def copy(bn_act_conv, layer):
        bn, source = bn_act_conv.bn, layer._batch_norm
        for target, value in ((bn.weight, source.weight), (bn.bias, source.bias),
                              (bn.running_mean, source._mean), (bn.running_var, source._variance),
                              (bn_act_conv.conv.weight, layer._conv.weight)):
            assert tuple(target.shape) == tuple(value.shape)
            target.data.copy_(torch.from_numpy(value.numpy()))
        bn.eps = float(source._epsilon)

    blocks = [m for m in twin.features if hasattr(m, "c1x1_a")]
    assert len(blocks) == len(model.blocks)
    with torch.no_grad():
        for theirs, ours in zip(blocks, model.blocks):
            if ours.has_proj:
                copy(theirs.c1x1_w_s1 if theirs.c1x1_w_s1 is not None else theirs.c1x1_w_s2,
                     ours.c1x1_w_func)
            copy(theirs.c1x1_a, ours.c1x1_a_func)
            copy(theirs.c3x3_b, ours.c3x3_b_func)
            copy(theirs.c1x1_c, ours.c1x1_c_func)
    return twin, blocks


def test_paddle_and_timm_prepare_the_same_stage_weights():
    torch, timm, _ = requirements()
    from dpn_fast.engines.torch_host import _block_parameters
    from dpn_fast.kernels._stage_weights import prepare_block
    model = paddle_dpn68()
    ours = [block for stage in gpu.prepare_stages(model) for block in stage]
    _, blocks = timm_twin(torch, timm, model)
    theirs = [prepare_block(_block_parameters(block, f"block {i}"), f"block {i}")
              for i, block in enumerate(blocks)]
    assert [b.shape for b in ours] == [b.shape for b in theirs]
    assert sum(b.has_projection for b in ours) == 4
    for i, (mine, twin) in enumerate(zip(ours, theirs)):
        assert len(mine.weights) == len(twin.weights)
        for name, a, b in zip(mine.named(0), mine.weights, twin.weights):
            assert a.dtype == b.dtype and a.shape == b.shape, (i, name)
            assert np.array_equal(a, b), (i, name)


def stage_outputs(model, x):
    """The Paddle model's stem output and each stage's output (resid | dense), as numpy."""
    h = model.pool2d_max(model.conv1_x_1_func(x))
    stem, stages = h.numpy(), []
    for blocks in model.stages():
        for block in blocks:
            h = block(h)
        stages.append(paddle.concat(h, axis=1).numpy())
    return stem, stages, model(x).numpy()


@needs_interpreter
def test_engine_stem_stages_and_head_match_the_paddle_reference():
    """The engine's pieces on CPU: run_stem and run_head (Paddle ops), and between them its stage
    plans (plan_forward) launched under the interpreter on its prepared weights as torch
    tensors (the torch host's to_torch and binding), every buffer NaN-filled first."""
    from functools import partial

    torch, _, _ = requirements()
    from dpn_fast.engines.torch_host import _bound, to_torch
    model32, model64 = paddle_dpn68(), paddle_dpn68("float64")
    x = np.random.default_rng(8).standard_normal((2, 3, 21, 19)).astype("float32")
    with paddle.no_grad():
        ref32 = stage_outputs(model32, paddle.to_tensor(x))
        ref64 = stage_outputs(model64, paddle.to_tensor(x.astype("float64")))
    as_paddle = lambda arrays: type(arrays)(*(paddle.to_tensor(a.astype("float32"))  # noqa: E731
                                              if isinstance(a, np.ndarray) else a
                                              for a in arrays))

    rows, (n, h, w) = gpu.run_stem(paddle.to_tensor(x), as_paddle(gpu.prepare_stem(model32)),
                                   "float32")
    stem = rows.numpy().reshape(n, h, w, -1).transpose(0, 3, 1, 2)
    assert_matches_reference(stem, ref64[0], ref32[0], "float32", "stem")

    stages = [[to_torch(block, torch.float32, "cpu") for block in stage]
              for stage in gpu.prepare_stages(model32)]
    source = torch.from_numpy(rows.numpy())
    plans = gpu.plan_forward(stages, n, h, w, source.shape[1], "float32", None)
    for i, (stage, (plan, _)) in enumerate(zip(stages, plans)):
        nan = lambda size: torch.full((size,), float("nan"))  # noqa: E731
        out = nan(plan.sizes["stage"])
        memory = {"input": source, "stage": out, "bottleneck": nan(plan.sizes["bottleneck"]),
                  "grouped": nan(plan.sizes["grouped"])}
        for index, block in enumerate(stage):
            memory.update(block.named(index))
        for launch in plan.launches:
            launch.bind(partial(_bound, memory))()
        result = out.view(n, plan.h, plan.w, plan.row_stride)[..., :plan.width]
        assert_matches_reference(result.permute(0, 3, 1, 2).double().numpy(), ref64[1][i],
                                 ref32[1][i], "float32", f"stage {i}")
        source = out

    head = as_paddle(gpu.prepare_head(model32))
    logits = gpu.run_head(paddle.to_tensor(source.numpy()), plans[-1][0], head).numpy()
    assert logits.shape == (n, CLASSES)
    assert_matches_reference(logits, ref64[2], ref32[2], "float32", "logits")


@pytest.mark.skipif(INTERPRETED, reason="plans the GPU's tiles")
def test_uninterpreted_plans_encode_embedded_launches_for_the_stage_op():
    """plan_forward's encodings of DPN68's stages (224x224, batch 1 and 64, each precision,
    sm_80 and sm_90) decode to the plans' launches (tests/test_aot_kernels.py's decoder), each a
    variant the op library embeds for that arch; the prepared weights hold at least what the op
    checks they hold, in the dtype each launch reads."""
    from test_aot_kernels import assert_encodes

    from dpn_fast.kernels._embedded import variants
    embedded = {(v.name, v.dtype, v.key, v.arch) for v in variants()}
    stages = gpu.prepare_stages(paddle_dpn68())
    checked = 0
    for dtype in gpu.PRECISIONS.values():
        for arch in (80, 90):
            for n in (1, 64):
                for stage, (plan, encoded) in zip(stages, gpu.plan_forward(stages, n, 56, 56, 10,
                                                                           dtype, arch)):
                    order = gpu.stage_weight_order(stage)
                    decoded = assert_encodes(plan, order, encoded, dtype)
                    assert {(name, dt, variant, arch) for name, dt, variant, _, _ in decoded} <= \
                        embedded
                    named = {k: v for i, b in enumerate(stage) for k, v in b.named(i).items()}
                    assert all(named[name].size >= size
                               for name, size in zip(order, encoded[2][5:]))
                    # float32 arrays are bound as they are, the others in the activations' dtype
                    assert all(region.dtype == ("float32" if named[region.name].dtype ==
                                                np.float32 else dtype)
                               for launch in plan.launches for region in launch.args
                               if getattr(region, "name", None) in named)
                    checked += len(decoded)
    assert checked == 3 * 2 * 2 * (4 + 22 * 3)  # DPN68: 4 projections, 22 blocks x 3


def test_compile_for_gpu_refuses_here_naming_what_is_missing():
    model = dpn_fast.DPN68(class_num=CLASSES)
    missing = ("built without CUDA" if not _extension.BUILT_WITH_CUDA else
               "Paddle imported .* is built without CUDA")
    with pytest.raises(gpu.GpuUnavailableError, match=missing):
        dpn_fast.compile(model, device="gpu", precision="fp16")
    with pytest.raises(ValueError, match=r"precision must be one of \('fp16', 'bf16', 'fp32'\) "
                                         "on GPU, got 'int8'"):
        dpn_fast.compile(model, device="gpu", precision="int8")
    with pytest.raises(TypeError, match="expected a dpn_fast DPN model, got Linear"):
        dpn_fast.compile(paddle.nn.Linear(2, 2), device="gpu")
    with pytest.raises(ValueError, match=r"runs on the GPU, the input is on Place\(cpu\); move "
                                         r"it with x.cuda\(\)"):
        gpu.check_gpu_images("compiled DPN68 (GPU)", paddle.zeros([1, 3, 8, 8]), 0)
    with pytest.raises(TypeError, match=r"float32, got paddle.float64"):
        gpu.check_gpu_images("compiled DPN68 (GPU)", paddle.zeros([1, 3, 8, 8], "float64"), 0)
