"""The channels-last Triton kernels compiled ahead of time into a CUDA build of the op library
(build_backend/aot_cubins.py) and its C ABI (csrc/aot_kernels.h, dpn_fast/kernels/_abi.py),
checked without a GPU:

- the library lists every kernel x arch x dtype x tile entry x form x alignment that tiles.json
  and the launchers' variant sets call for, no more; each embedded image is one cubin for its
  arch whose kernel symbol and parameter list (cuobjdump) are what the ABI launches with;
- without a CUDA driver a launch fails with NoCudaDriverError, after the checks that need no
  driver (unknown variant, argument count, misaligned pointer) have their own errors;
- every launch of the torch host's plan of DPN92 (224x224, batch 1 and 64, each dtype, sm_80
  and sm_90) finds its variant embedded, with arguments of the count and kinds it takes, and
  the embedded cubin has the SASS of the JIT's own compile of that launch;
- the Paddle stage op's attributes encode the stage plans.

Skipped for a CPU-only build (no nvcc when it was built, or DPN_FAST_CPU_ONLY=1).
"""
import ctypes
import importlib.util
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _interpreter import INTERPRETED
from dpn_fast import _extension

triton = pytest.importorskip("triton")

from dpn_fast.kernels import _abi, nhwc_conv1x1, nhwc_grouped_conv3x3  # noqa: E402
from dpn_fast.kernels._tiles import TABLE  # noqa: E402

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@pytest.fixture(scope="module")
def embedded():
    try:
        return _abi.EmbeddedKernels(_extension.LIBRARY_PATH)
    except OSError as e:
        pytest.skip(f"CPU-only build of the op library (built without nvcc, or with "
                    f"DPN_FAST_CPU_ONLY=1): {e}")


@pytest.fixture(scope="module")
def listed(embedded):
    return [embedded[i] for i in range(len(embedded))]


def key(options):
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                    for k, v in sorted(options.items()))


def expected_variants():
    """{(name, dtype, arch, variant)}, built from tiles.json itself: conv1x1 in each of its four
    block forms at ALIGN 1 and 8 per tile entry; the grouped conv at stride 1 and 2 per chunk
    geometry of the embedded group widths, with the entry its lane count selects, ALIGN 8."""
    table = json.loads(TABLE.read_text())
    out = set()
    for dtype in TRITON_DTYPES:
        dclass = "fp32" if dtype == "float32" else "half"
        precision = "ieee" if dtype == "float32" else "tf32"
        for arch_key, classes in table["conv1x1"].items():
            if not arch_key.startswith("sm_"):
                continue
            for entry in classes[dclass]:
                bm, bn, bk, gm, warps, stages = entry["tiles"]
                for stride, affine, bias, relu, add in nhwc_conv1x1.BLOCK_FORMS:
                    for align in (1, 8):
                        out.add(("_conv1x1_kernel", dtype, int(arch_key[3:]), key(dict(
                            STRIDE=stride, IN_AFFINE=affine, HAS_BIAS=bias, RELU=relu,
                            ADD_TO_OUT=add, PRECISION=precision, ALIGN=align, BLOCK_M=bm,
                            BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps,
                            num_stages=stages))))
        for arch_key, classes in table["grouped_conv3x3"].items():
            if not arch_key.startswith("sm_"):
                continue
            for width in nhwc_grouped_conv3x3.EMBEDDED_GROUP_WIDTHS:
                lanes, per_program = nhwc_grouped_conv3x3.chunk_lanes(width)
                entry = next(e for e in classes[dclass] if lanes <= e.get("max_lanes", lanes))
                block_p, warps, stages = entry["tiles"]
                for stride in (1, 2):
                    out.add(("_grouped_conv3x3_kernel", dtype, int(arch_key[3:]), key(dict(
                        STRIDE=stride, SLOT=-(-per_program * width // 8) * 8,
                        PRECISION=precision, ALIGN=8, BLOCK_P=block_p, BLOCK_C=lanes,
                        num_warps=warps, num_stages=stages))))
    return out


def test_library_lists_every_variant_the_tile_table_calls_for(listed):
    found = [(k.name, k.dtype, k.arch, k.variant) for k in listed]
    assert len(found) == len(set(found)), "a variant is embedded twice"
    expected = expected_variants()
    assert set(found) == expected, (sorted(expected - set(found))[:5],
                                    sorted(set(found) - expected)[:5])
    # One cubin per arch for each (kernel, dtype, variant), for sm_80 and sm_90.
    archs = {}
    for k in listed:
        archs.setdefault((k.name, k.dtype, k.variant), set()).add(k.arch)
    assert set(map(frozenset, archs.values())) == {frozenset({80, 90})}
    for k in listed:
        kinds = nhwc_conv1x1.triton_signature if k.name == "_conv1x1_kernel" else \
            nhwc_grouped_conv3x3.triton_signature
        assert k.params == tuple(t for t in kinds(TRITON_DTYPES[k.dtype]).values()
                                 if t != "constexpr")
        assert k.num_warps == int(re.search(r"num_warps=(\d+)", k.variant).group(1))


def cuobjdump():
    tool = shutil.which("cuobjdump")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool or (str(bundled) if bundled.exists() else None)


def test_each_embedded_image_is_a_cubin_of_its_arch_and_parameters(listed, tmp_path):
    """cuobjdump on each image: one ELF for sm_<arch> (sm_90: its sm_90a form), the kernel's
    symbol an entry function, and its parameter sizes (EIATTR_KPARAM_INFO by ordinal) those of
    the params the ABI passes: 8 bytes a pointer, 4 an i32, then the hidden scratch pointers."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in triton's nvidia backend)")

    def inspect(index):
        k = listed[index]
        path = tmp_path / f"kernel_{index}.cubin"
        path.write_bytes(k.cubin)
        run = lambda *flags: subprocess.run([tool, *flags, str(path)], capture_output=True,  # noqa: E731
                                            text=True, check=True).stdout
        return k, run("-lelf"), run("-symbols"), run("-elf")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(inspect, range(len(listed))))
    for k, elves, symbols, elf in results:
        label = f"{k.name} {k.dtype} sm_{k.arch} [{k.variant}]"
        assert re.findall(r"ELF file\s+\d+: \S+\.(sm_\d+a?)\.cubin", elves) in (
            [f"sm_{k.arch}"], [f"sm_{k.arch}a"]), (label, elves)
        assert re.search(rf"STT_FUNC\s+STB_GLOBAL\s+STO_ENTRY\s+{k.name}$", symbols, re.M), \
            (label, symbols)
        params = {int(o, 16): int(s, 16) for o, s in re.findall(
            r"Ordinal : (0x[0-9a-f]+)\s+Offset\s+: 0x[0-9a-f]+\s+Size\s+: (0x[0-9a-f]+)", elf)}
        expected = [8 if p.startswith("*") else 4 for p in k.params] + [8] * k.hidden_params
        assert [params.get(i) for i in range(len(params))] == expected, (label, params)


def libcuda_present():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def test_launch_without_a_driver_is_an_error_not_a_crash(embedded, listed):
    if libcuda_present():
        pytest.skip("this machine has a CUDA driver (libcuda.so.1)")
    k = next(k for k in listed if k.name == "_conv1x1_kernel")
    args = [16 * (i + 1) if p.startswith("*") else 7 for i, p in enumerate(k.params)]
    with pytest.raises(_abi.NoCudaDriverError, match=r"no CUDA driver.*libcuda\.so\.1"):
        embedded.launch(k.name, k.dtype, k.variant, (3,), 0, args)
    # The checks that need no driver come first, each with its own error.
    with pytest.raises(_abi.UnknownKernelError, match=r"no embedded kernel _conv1x1_kernel "
                       r"float16 \[ALIGN=3\]"):
        embedded.launch(k.name, "float16", "ALIGN=3", (3,), 0, args)
    with pytest.raises(_abi.LaunchArgumentsError, match=rf"takes {len(k.params)} arguments .* "
                       r"got 2"):
        embedded.launch(k.name, k.dtype, k.variant, (3,), 0, args[:2])
    with pytest.raises(_abi.LaunchArgumentsError, match=r"argument 1 .* not 16-byte aligned"):
        embedded.launch(k.name, k.dtype, k.variant, (3,), 0, [args[0], 24, *args[2:]])
    with pytest.raises(TypeError, match=r"argument 6 must be an int32"):
        embedded.launch(k.name, k.dtype, k.variant, (3,), 0, [*args[:6], 2**31, *args[7:]])
    with pytest.raises(_abi.AotKernelError, match=r"kernel index -1 outside"):
        embedded[-1]


def dpn92_plans(dtypes=TRITON_DTYPES, archs=(80, 90), batches=(1, 64)):
    """(dtype, arch, batch, plan) of the torch host's DPN92 forward at 224x224, planned on CPU."""
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed")
    from dpn_fast.engines.torch_host import _Plan, fuse, import_timm
    torch.manual_seed(0)
    model = import_timm().create_model("dpn92", pretrained=False).eval()
    for dtype in dtypes:
        fused = fuse(model.to(getattr(torch, dtype)))
        for arch in archs:
            for n in batches:
                yield dtype, arch, n, _Plan(fused, n, 56, 56, arch)


def sass(tool, cubin, path):
    path.write_bytes(cubin)
    return subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout


def assert_embedded_code_is_the_jits(listed, plans, distinct, tmp_path):
    """For each planned launch, first of its `distinct(launch)` key: the JIT's own compile of it
    (tests/_triton_ptx.jit_compile: Triton's binder specialises it from the real arguments, as a
    launch on a GPU does) has the SASS of the embedded cubin of its variant and arch."""
    if INTERPRETED:
        pytest.skip("compiles for a GPU: TRITON_INTERPRET must be unset when triton is imported")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (neither on PATH nor in triton's nvidia backend)")
    from _triton_ptx import jit_compile
    images = {(k.name, k.dtype, k.variant, k.arch): k.cubin for k in listed}
    seen = set()
    for dtype, arch, n, plan in plans:
        for launch in plan.launches:
            name = launch.kernel.fn.__name__
            if (arch, distinct(launch)) in seen:
                continue
            seen.add((arch, distinct(launch)))
            compiled, _, _ = jit_compile(launch, arch)
            assert sass(tool, compiled.asm["cubin"], tmp_path / "jit.cubin") == \
                sass(tool, images[(name, dtype, launch.variant, arch)], tmp_path / "aot.cubin"), \
                (name, dtype, arch, n, launch.variant)
    assert seen


def test_embedded_code_is_what_the_jit_runs(listed, tmp_path):
    """One DPN92 fp16 launch of each kernel form and chunk geometry on sm_90 (the cubins differ
    from the JIT's only in debug info, such as the source path: the SASS is compared)."""
    form = lambda launch: (launch.kernel.fn.__name__, *(launch.options.get(flag) for flag in (  # noqa: E731
        "STRIDE", "IN_AFFINE", "HAS_BIAS", "ADD_TO_OUT", "BLOCK_C")))
    assert_embedded_code_is_the_jits(listed, dpn92_plans(("float16",), (90,), (1,)), form,
                                     tmp_path)


@pytest.mark.slow
def test_embedded_code_is_what_the_jit_runs_everywhere(listed, tmp_path):
    """Every distinct DPN92 launch variant, each dtype, sm_80 and sm_90, batch 1 and 64."""
    assert_embedded_code_is_the_jits(listed, dpn92_plans(), lambda launch: (
        launch.kernel.fn.__name__, launch.dtype, launch.variant), tmp_path)


# Pointer parameters read only when a flag is on; the launcher passes another tensor otherwise.
UNREAD_UNLESS = {("_conv1x1_kernel", "in_scale_ptr"): "IN_AFFINE",
                 ("_conv1x1_kernel", "in_shift_ptr"): "IN_AFFINE",
                 ("_conv1x1_kernel", "bias_ptr"): "HAS_BIAS"}


def test_dpn92_launches_map_onto_embedded_kernels(embedded, listed):
    archs = {(k.name, k.dtype, k.variant): set() for k in listed}
    for k in listed:
        archs[(k.name, k.dtype, k.variant)].add(k.arch)
    checked = 0
    for dtype, arch, n, plan in dpn92_plans():
        for i, launch in enumerate(plan.launches):
            label = f"{dtype} sm_{arch} n={n} launch {i}"
            name = launch.kernel.fn.__name__
            params = embedded.params(name, dtype, launch.variant)
            assert params is not None, f"{label}: {name} [{launch.variant}] is not embedded"
            assert arch in archs[(name, dtype, launch.variant)], label
            assert len(launch.args) == len(params), label
            names = list(launch.kernel.arg_names)
            for arg_name, arg, kind in zip(names, launch.args, params):
                if kind.startswith("*"):
                    flag = UNREAD_UNLESS.get((name, arg_name))
                    if flag is None or launch.options[flag]:  # a placeholder is never read
                        assert TRITON_DTYPES[str(arg.dtype).replace("torch.", "")] == kind[1:], \
                            (label, arg_name, kind, arg.dtype)
                    assert arg.data_ptr() % 16 == 0, label
                else:
                    assert kind == "i32" and isinstance(arg, int) and 0 <= arg < 2**31, \
                        (label, arg)
            checked += 1
    assert checked == 3 * 2 * 2 * (4 + 30 * 3), checked  # DPN92: 4 projections, 30 blocks x 3


def dpn92_stages():
    """DPN92's four stages as StageBlocks (from dpn_fast.models.config, no timm) with their
    input sizes at 224x224: (blocks, h, w, in_width)."""
    from dpn_fast.kernels._stage import StageBlock, stage_width
    from dpn_fast.models.config import CONFIGS
    cfg = CONFIGS["DPN92"]
    hw, width, stages = 56, cfg.init_filters, []
    for s, count in enumerate(cfg.blocks):
        r = cfg.bottleneck(s)
        chunks = nhwc_grouped_conv3x3.chunk_lanes(r // cfg.groups)
        _, slot_width = nhwc_grouped_conv3x3.slot_layout(r, cfg.groups, chunks)
        blocks = [StageBlock(2 if s and not i else 1, cfg.residual[s], cfg.dense_inc[s], r,
                             cfg.groups, slot_width) for i in range(count)]
        stages.append((blocks, hw, hw, width))
        hw, width = (hw - 1) // blocks[0].stride + 1, stage_width(blocks)
    return stages


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_embedded_kernels_accept_every_planned_dpn92_stage_launch(embedded, dtype):
    """The stage plans as data (dpn_fast/kernels/_stage.py) for DPN92 at batch 1 and 64 on
    sm_80 and sm_90, bound to stand-in device addresses, launched through the C ABI: each
    launch passes the library's checks (variant embedded, argument count, pointer alignment) and
    fails only for want of a driver."""
    if libcuda_present():
        pytest.skip("this machine has a CUDA driver (libcuda.so.1)")
    from dpn_fast.kernels._stage import plan_stage
    launched = 0
    for arch in (80, 90):
        for n in (1, 64):
            ld = None
            for blocks, h, w, in_width in dpn92_stages():
                plan = plan_stage(blocks, n, h, w, in_width, ld or in_width, dtype, arch)
                ld = plan.row_stride
                names = sorted({a.name for launch in plan.launches for a in launch.args
                                if hasattr(a, "name")})
                address = {name: (i + 1) << 32 for i, name in enumerate(names)}
                assert set(plan.sizes) <= set(names)
                for launch in plan.launches:
                    with pytest.raises(_abi.NoCudaDriverError):
                        embedded.launch_planned(launch.bind(lambda r: address[r.name]), 0)  # noqa: B023
                    launched += 1
    assert launched == 2 * 2 * (4 + 30 * 3)


def decode(kernels, launches):
    """The launches of dpn_fast_aot_stage's attributes, read as csrc/aot_stage_gpu.cc reads
    them: [(name, dtype, variant, grid, [(kind, value), ...])]."""
    out, at = [], 0
    for i in range(len(kernels) // 3):
        grid, count = tuple(launches[at:at + 3]), launches[at + 3]
        pairs = [tuple(launches[at + 4 + 2 * j:at + 6 + 2 * j]) for j in range(count)]
        at += 4 + 2 * count
        out.append((*kernels[3 * i:3 * i + 3], grid, pairs))
    assert at == len(launches)
    return out


def assert_encodes(plan, order, encoded, dtype):
    """`encoded`, encode_stage's attributes of `plan` with its weights in `order`, decoded as the
    op reads them: every launch's kernel, dtype, variant, grid and arguments; buffers and weights
    as operand indices; the sizes the op allocates and checks. Returns the decoded launches."""
    from dpn_fast.ops.aot_stage import FIXED_OPERANDS
    kernels, launches, sizes = encoded
    operands = list(FIXED_OPERANDS) + list(order)
    decoded = decode(kernels, launches)
    assert len(decoded) == len(plan.launches)
    for (name, launch_dtype, variant, grid, pairs), launch in zip(decoded, plan.launches):
        assert (name, launch_dtype, variant) == (launch.kernel.fn.__name__, dtype, launch.variant)
        assert grid == (*launch.grid, 1, 1)[:3]
        assert [operands[v] if k == 1 else v for k, v in pairs] == \
            [a.name if hasattr(a, "name") else a for a in launch.args]
    ld = plan.row_stride
    assert sizes[:4] == [plan.sizes["stage"] // ld, ld, plan.sizes["bottleneck"],
                         plan.sizes["grouped"]]
    assert sizes[4] == plan.sizes["input"] and len(sizes) == 5 + len(order)
    return decoded


def test_paddle_stage_op_attributes_encode_each_dpn92_stage(embedded):
    """encode_stage (dpn_fast/ops/aot_stage.py) of each DPN92 stage plan decodes to the plan
    (assert_encodes), every launch a variant the library embeds. The op itself, in this CUDA
    build, refuses CPU tensors with a clear error (it cannot run without a GPU)."""
    import paddle

    from dpn_fast.kernels._stage import plan_stage, weight_names
    from dpn_fast.ops.aot_stage import OP, aot_stage, encode_stage
    ld = None
    for blocks, h, w, in_width in dpn92_stages():
        plan = plan_stage(blocks, 1, h, w, in_width, ld or in_width, "float16", 90)
        ld = plan.row_stride
        order = [n for i in range(len(blocks)) for n in weight_names(i, i == 0)]
        decoded = assert_encodes(plan, order, encode_stage(plan, order), "float16")
        assert len(decoded) == 1 + 3 * len(blocks)
        for name, dtype, variant, _, _ in decoded:
            assert embedded.params(name, dtype, variant) is not None
    x = paddle.zeros([8], dtype="float16")
    with pytest.raises(OSError, match=rf"{OP}: x must be a CUDA tensor"):
        aot_stage(x, [x] * len(order), encode_stage(plan, order))


def test_torch_host_runs_embedded_kernels_on_cuda_only(embedded):
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed")
    from dpn_fast.engines.torch_host import fuse, import_timm
    model = import_timm().create_model("dpn68b", pretrained=False).eval()
    with pytest.raises(ValueError, match=r"embedded kernels \(kernels=\) run on CUDA; the model "
                                         r"is on cpu"):
        fuse(model.to(torch.float16), kernels=embedded)
