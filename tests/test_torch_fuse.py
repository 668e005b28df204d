"""dpn_fast.torch: the channels-last fused forward of timm's DPNs, on CPU under Triton's
interpreter (needs torch, triton and timm, which .ci/run installs; skipped where one is missing),
against timm in float64 with the project's rule: error <= 2x timm eager's error at that dtype +
atol (tests/utils.py).

The quick cases use a small timm DPN (every block kind: projection, stride-2 down, normal; b and
not b) at an odd, non-square input; the slow ones timm's real DPNs.
"""
import copy
import hashlib
import importlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from _interpreter import INTERPRETED, REPO, needs_interpreter, run_module_interpreted
from utils import assert_matches_reference


def requirements():
    """(torch, timm, dpn_fast.torch), or a skip."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed")
    from dpn_fast.torch import import_timm
    return torch, import_timm(), importlib.import_module("dpn_fast.torch")


@pytest.mark.skipif(INTERPRETED, reason="the driver of the interpreted run")
def test_under_interpreter():
    requirements()
    run_module_interpreted(__file__)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the driver of the interpreted run")
def test_under_interpreter_slow():
    requirements()
    run_module_interpreted(__file__, markers="slow")


def test_imports_without_paddle():
    """`import dpn_fast` without Paddle: dpn_fast.kernels and dpn_fast.torch usable, the Paddle
    parts a clear error."""
    script = f"""
import importlib.util, sys
sys.modules["paddle"] = None  # as if Paddle were not installed
sys.path.insert(0, {str(REPO)!r})
import dpn_fast
try:
    dpn_fast.create_model
except ImportError as e:
    assert "needs Paddle" in str(e), e
else:
    raise AssertionError("dpn_fast.create_model without Paddle")
if importlib.util.find_spec("triton") is not None:
    from dpn_fast.kernels import nhwc_conv1x1, nhwc_grouped_conv3x3
if importlib.util.find_spec("torch") is not None:
    from dpn_fast.torch import fuse
    assert fuse.__module__ == "dpn_fast.engines.torch_host", fuse.__module__
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def randomize_batch_norms(torch, model, seed):
    """Running statistics and affine parameters away from identity, so folding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


def small_dpn(torch, timm, b):
    """timm's DPN with one block per stage but two in stage 1 (projection, down, normal blocks),
    4 channels a group in stage 0 up to 32 in stage 3; b: dpn68b's split c1x1_c."""
    from timm.models.dpn import DPN
    torch.manual_seed(0)
    return randomize_batch_norms(torch, DPN(k_sec=(1, 2, 1, 1), inc_sec=(8, 8, 8, 16), k_r=32,
                                            groups=8, small=True, num_init_features=10, b=b,
                                            num_classes=10), 1)


def numpy_parameters(torch, model, seed):
    """`model` with every float parameter and BN statistic drawn from numpy's seeded generator
    (the same values whatever the torch and timm versions)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.dtype.is_floating_point:
                shape = tuple(tensor.shape)
                values = rng.uniform(0.5, 1.5, shape) if name.endswith("running_var") else \
                    0.5 * rng.standard_normal(shape)
                tensor.copy_(torch.from_numpy(values))
    return model.eval()


def prepared_digest(torch, fused):
    """sha256 of every prepared weight of `fused`: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for blk in fused.blocks:
        for name, tensor in blk.named(0).items():
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# prepared_digest of the small DPNs with numpy_parameters(seed 5): the weights the torch host
# binds, pinned bit for bit (the folding in float64, then one rounding to the kernels' dtypes).
# b's split c1x1_c draws the values of the whole one, so both give the same weights.
DIGESTS = {"float32": "6fb7870c2d0a7a12823e856873c6c79255ee7bfcfe969c6ed64e49e15b23de5d",
           "float16": "eb875d0cb0b6ff39417f0ef6fb45df6fdf72c900d6ff0c73a765da4f69ad628b",
           "bfloat16": "98ab0ea7cb18fed426db3834798fa2b67173c8157af184803136912b2923e098"}


@pytest.mark.parametrize("b", [False, True])
@pytest.mark.parametrize("dtype", sorted(DIGESTS))
def test_prepared_weights_are_pinned(b, dtype):
    torch, timm, fused_module = requirements()
    model = numpy_parameters(torch, small_dpn(torch, timm, b), 5).to(getattr(torch, dtype))
    assert prepared_digest(torch, fused_module.fuse(model)) == DIGESTS[dtype]


def check_fused_matches_timm(torch, fused_module, model, x, dtype):
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        plain = copy.deepcopy(model).to(dtype)(x.to(dtype))
    fused = fused_module.fuse(copy.deepcopy(model).to(dtype))
    out = fused(x.to(dtype))
    assert out.dtype == dtype and out.shape == ref64.shape
    assert_matches_reference(out.double().numpy(), ref64.numpy(), plain.double().numpy(),
                             str(dtype).replace("torch.", ""), "logits")
    return fused, out


@needs_interpreter
@pytest.mark.parametrize("b,n,dtype", [(False, 2, "float32"), (True, 1, "float32"),
                                       (False, 2, "float16")])
def test_small_dpn_matches_timm(b, n, dtype):
    torch, timm, fused_module = requirements()
    model = small_dpn(torch, timm, b)
    x = torch.randn(n, 3, 27, 23, generator=torch.Generator().manual_seed(2))
    fused, out = check_fused_matches_timm(torch, fused_module, model, x, getattr(torch, dtype))
    # A second call at the same shape reuses the plan and its workspace (nothing allocated,
    # nothing checked again) and gives the same logits (no state left behind in the buffers).
    (key,) = fused._plans
    plan = fused._plans[key]
    again = fused(x.to(out.dtype))
    assert list(fused._plans) == [key] and fused._plans[key] is plan
    assert torch.equal(again, out)


class ReplayByRerun:
    """Stands in for a CUDA graph on CPU: capture runs fn and keeps its output; replay runs fn
    again and writes the result into that output, as a replay rewrites the captured memory."""

    def capture(self, fn):
        self.fn, self.calls = fn, 1
        self.out = fn()
        return self.out

    def replay(self):
        self.calls += 1
        self.out.copy_(self.fn())


@needs_interpreter
def test_graphed_forward_and_bounded_plans():
    """cuda_graph: the whole forward captured with its own plan; calls copy their images into
    the captured input and return the captured output (here with a stand-in for the graph).
    The plans of other shapes are bounded by max_plans, least recently used dropped."""
    torch, timm, fused_module = requirements()
    model = small_dpn(torch, timm, False)
    fused = fused_module.fuse(model, max_plans=1)
    gen = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(1, 3, 19, 21, generator=gen) for _ in range(2))
    graph = ReplayByRerun()
    graphed = fused.cuda_graph(x1, graph=graph)
    assert not fused._plans  # the graph's plan is its own
    out = graphed(x2)
    assert out is graphed.static_out and graph.calls == 2
    assert torch.equal(out, fused(x2))  # the replay read x2, copied into the captured input
    (old_key,) = fused._plans
    fused(torch.randn(1, 3, 25, 17, generator=gen))  # another shape replaces it (max_plans=1)
    (new_key,) = fused._plans
    assert new_key != old_key
    with pytest.raises(ValueError, match=r"captured for images \(1, 3, 19, 21\)"):
        graphed(torch.zeros(2, 3, 19, 21))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        fused.cuda_graph(x1)


@needs_interpreter
@pytest.mark.slow
def test_dpn68_matches_timm():
    torch, timm, fused_module = requirements()
    torch.manual_seed(0)
    model = randomize_batch_norms(torch, timm.create_model("dpn68", num_classes=10), 1)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    check_fused_matches_timm(torch, fused_module, model, x, torch.float32)


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpn68b", "dpn92", "dpn98", "dpn107", "dpn131"])
def test_every_timm_dpn_folds(name):
    """The other timm DPNs fold (their modules are what fuse expects, their groups fit the conv's
    lanes) into stages whose last buffer is as wide as timm's final BN; dpn68 runs end to end."""
    torch, timm, fused_module = requirements()
    model = timm.create_model(name).eval()
    fused = fused_module.fuse(model)
    assert len(fused.stages) == 4
    assert sum(len(stage) for stage in fused.stages) == len(fused.blocks)
    from dpn_fast.kernels._stage import stage_width
    assert stage_width([blk.shape for blk in fused.stages[-1]]) == \
        model.features.conv5_bn_ac.bn.num_features


@needs_interpreter
def test_bad_models_and_inputs_raise_typed_errors():
    torch, timm, fused_module = requirements()
    model = small_dpn(torch, timm, False)
    with pytest.raises(TypeError, match="expected a timm DPN"):
        fused_module.fuse(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training mode"):
        fused_module.fuse(copy.deepcopy(model).train())
    with pytest.raises(TypeError, match="model dtype"):
        fused_module.fuse(copy.deepcopy(model).double())
    with pytest.raises(ValueError, match="max_plans must be a positive int"):
        fused_module.fuse(model, max_plans=0)
    fused = fused_module.fuse(model)
    with pytest.raises(ValueError, match=r"expected images \[n, 3, H, W\]"):
        fused(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="input is torch.float16"):
        fused(torch.zeros(1, 3, 8, 8, dtype=torch.float16))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        fused([[0.0]])


@pytest.mark.skipif(INTERPRETED, reason="needs the kernels compiled, not interpreted")
def test_uninterpreted_cpu_model_is_refused():
    torch, timm, fused_module = requirements()
    fused = fused_module.fuse(small_dpn(torch, timm, False))
    with pytest.raises(ValueError, match="kernels run on CUDA"):
        fused(torch.zeros(1, 3, 16, 16))


@needs_interpreter
def test_launchers_refuse_tensors_that_are_not_rows():
    """With torch tensors the launchers check the layout they index: unit channel stride and the
    row stride given."""
    torch, _, _ = requirements()
    from dpn_fast.kernels import nhwc_conv1x1 as gemm, nhwc_grouped_conv3x3 as grouped
    a, w, out = torch.zeros(6, 8), torch.zeros(8, 4), torch.zeros(6, 4)
    with pytest.raises(ValueError, match=r"a must be rows .* row stride 8, got strides \(1, 6\)"):
        gemm.conv1x1_forward(a.t().contiguous().t(), w, out, rows=6, k=8, n=4, lda=8, ldo=4)
    with pytest.raises(ValueError, match="out must be rows .* row stride 5"):
        gemm.conv1x1_forward(a, w, out, rows=6, k=8, n=4, lda=8, ldo=5)
    tiles = grouped.choose_tiles(3, 4, half=False, interpret=True)
    x = torch.zeros(4, 16)  # 6 channels of 3 a group: one 16-channel slot
    with pytest.raises(ValueError, match="packed_w must be rows"):
        grouped.grouped_conv3x3_forward(x, torch.zeros(1, 9, 16, 16).transpose(2, 3),
                                        torch.zeros(16), x, images=1, h=2, w=2, c=6, groups=2,
                                        stride=1, ldx=16, ldo=16, tiles=tiles)
