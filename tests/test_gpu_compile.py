"""Compile checks for the GPU code, runnable without a GPU (CI).

- every csrc/*.cu compiled by nvcc for each of sm_75/80/86/89/90 (the archs the local nvcc
  accepts); ptxas's per-kernel resource usage (registers, stack, spills, shared memory) parsed;
- every Triton kernel in dpn_fast/kernels/ compiled ahead of time (tests/_triton_aot.py, AOT_SPECS
  convention) for sm_75/80/90, with registers / stack / spills from Triton's bundled ptxas;
- the channels-last kernels compiled as the JIT would for DPN92's fused fp16 forward
  (tests/_triton_ptx.py), for sm_80 and sm_90, their PTX inspected.

The first two write a table (build/cuda_resource_report.txt, build/triton_resource_report.txt)
that tests/conftest.py names, with its spill count, at the end of the pytest run; their spills
are reported, not failed (a performance question for a GPU run), while a compile error fails.
The third fails on what makes a kernel slow on every GPU: an MMA loop without 16-byte loads,
2-byte global accesses, local memory; it writes build/triton_dpn92_ptx_report.txt.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPORT_DIR = REPO / "build"
CUDA_ARCHS = (75, 80, 86, 89, 90)
TRITON_ARCHS = (75, 80, 90)
CUDA_SOURCES = sorted((REPO / "csrc").glob("*.cu"))
# The flags CMakeLists.txt gives the CUDA cores.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "--resource-usage",
              "-Xptxas=-warn-spills", f"-I{REPO / 'csrc'}"]


def nvcc():
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def supported_archs(tool):
    out = subprocess.run([tool, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return {int(a.split("_")[1]) for a in out.split() if a.startswith("compute_")}


def demangle(names):
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short_kernel_name(name):
    """'(anonymous namespace)::merge_kernel<float, 4>(float const*, ...)'
    -> 'merge_kernel<float, 4>'."""
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # first '(' outside template brackets starts the parameters
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    return re.sub(r"^void ", "", name[:cut])


def parse_ptxas(output):
    """[{kernel, arch, regs, stack, spill_stores, spill_loads, smem}] from ptxas -v output."""
    kernels, current = [], None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    names = demangle(sorted({k["kernel"] for k in kernels}))
    for k in kernels:
        k["kernel"] = short_kernel_name(names.get(k["kernel"], k["kernel"]))
    return kernels


# 16-byte global->shared copies or loads, and TMA: what a vectorised, pipelined load looks like.
WIDE_LOAD = re.compile(r"cp\.async\.c[ag]\.shared\.global.*,\s*(?:16|0x10)\s*[,;]"
                       r"|ld\.global[.\w]*\.v4\.(?:b32|u32|f32)|cp\.async\.bulk\.tensor")
NARROW_GLOBAL = re.compile(r"\b(?:ld|st)\.global[.\w]*\.(?:b16|u16|f16|bf16)\b")
MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\b")
LOCAL = re.compile(r"\b(?:ld|st)\.local\b")
LABEL = re.compile(r"^(\$L__\w+):")
BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def hot_loops(ptx):
    """The bodies (lists of lines) of the loops that issue tensor-core MMAs: a label and the
    lines up to the last backward branch to it."""
    lines = ptx.splitlines()
    labels = {}
    loops = {}
    for i, line in enumerate(lines):
        m = LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        m = BRANCH.search(line)
        if m and m.group(1) in labels:
            loops[m.group(1)] = (labels[m.group(1)], i)
    bodies = [lines[start:end + 1] for start, end in loops.values()]
    return [body for body in bodies if any(MMA.search(line) for line in body)]


def ptx_findings(ptx):
    """What the check asserts, counted: MMAs, 16-byte loads and 2-byte global accesses in the
    hot loops and in the whole kernel, local-memory accesses."""
    loops = hot_loops(ptx)
    count = lambda pattern, lines: sum(bool(pattern.search(line)) for line in lines)  # noqa: E731
    all_lines = ptx.splitlines()
    return {"hot_loops": len(loops),
            "loop_mma": sum(count(MMA, body) for body in loops),
            "loop_wide_loads": sum(count(WIDE_LOAD, body) for body in loops),
            "loop_narrow_global": sum(count(NARROW_GLOBAL, body) for body in loops),
            "kernel_narrow_global": count(NARROW_GLOBAL, all_lines),
            "kernel_wide_loads": count(WIDE_LOAD, all_lines),
            "local": count(LOCAL, all_lines)}


def problems(findings, usage):
    """Why a compiled kernel fails the check (empty: it passes)."""
    out = []
    if not findings["hot_loops"] or not findings["loop_mma"]:
        out.append("no loop issues tensor-core MMAs (mma / wgmma)")
    if not findings["loop_wide_loads"]:
        out.append("the MMA loops have no 16-byte global loads (ld.global.v4 / cp.async 16 / TMA)")
    if findings["kernel_narrow_global"]:
        out.append(f"{findings['kernel_narrow_global']} 2-byte global loads/stores (unvectorised)")
    if findings["local"] or usage.get("spill_stores") or usage.get("spill_loads"):
        out.append(f"local memory: {findings['local']} ld/st.local, ptxas spills {usage}")
    return out


def format_table(title, rows, columns):
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [title, "  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def write_report(name, text):
    REPORT_DIR.mkdir(exist_ok=True)
    (REPORT_DIR / name).write_text(text)


@pytest.fixture(scope="module")
def nvcc_tool():
    tool = nvcc()
    if tool is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return tool


@pytest.fixture(scope="module")
def cuda_report():
    rows = []
    yield rows
    if rows:
        rows.sort(key=lambda r: (r["source"], r["kernel"], r["arch"]))
        spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
        stacked = [r for r in rows if r["stack"] and not (r["spill_stores"] or r["spill_loads"])]
        text = format_table("CUDA kernels (nvcc/ptxas resource usage)", rows,
                            ["source", "kernel", "arch", "regs", "stack", "spill_stores",
                             "spill_loads", "smem"])
        text += f"{len(spilling)} kernel/arch pairs spill registers"
        text += f"; {len(stacked)} more use a stack frame (local memory) without spilling\n"
        write_report("cuda_resource_report.txt", text)


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_for_all_archs(source, nvcc_tool, cuda_report, tmp_path):
    archs = [a for a in CUDA_ARCHS if a in supported_archs(nvcc_tool)]
    assert archs, f"{nvcc_tool} accepts none of sm_{CUDA_ARCHS}"

    def compile_for(arch):
        cmd = [nvcc_tool, "-c", str(source), "-o", str(tmp_path / f"{source.stem}_{arch}.o"),
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", *NVCC_FLAGS]
        return arch, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_for, archs))
    failures = {a: r.stdout + r.stderr for a, r in results if r.returncode != 0}
    assert not failures, "\n".join(f"sm_{a}:\n{log[-4000:]}" for a, log in failures.items())
    for arch, result in results:
        kernels = parse_ptxas(result.stdout + result.stderr)
        assert kernels, f"no ptxas resource report for {source.name} sm_{arch}"
        cuda_report += [dict(k, source=source.name) for k in kernels]


def test_parse_ptxas_reads_registers_and_spills():
    sample = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size, 4096 bytes smem
"""
    (k,) = parse_ptxas(sample)
    assert (k["arch"], k["regs"], k["stack"], k["spill_stores"], k["spill_loads"], k["smem"]) == \
        ("sm_80", 255, 8, 4, 4, 4096)
    assert k["kernel"] == "kernel"


def test_triton_kernels_compile_ahead_of_time():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_triton_aot.py"), "--archs",
         ",".join(map(str, TRITON_ARCHS))], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no output from tests/_triton_aot.py:\n{result.stderr[-2000:]}"
    ops = {p.stem for p in (REPO / "dpn_fast" / "kernels").glob("*.py")
           if not p.name.startswith("_")}
    assert {r["op"] for r in rows} == ops
    columns = ["op", "kernel", "dtype", "cc", "regs", "stack", "spill_stores", "spill_loads",
               "shared", "num_warps", "constexprs"]
    text = format_table("Triton kernels (ahead-of-time compile)", [r for r in rows if r.get("ok")],
                        columns)
    spilling = [r for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    text += f"{len(spilling)} kernel/arch pairs spill registers\n"
    write_report("triton_resource_report.txt", text)
    failures = [r for r in rows if not r.get("ok")]
    assert not failures, "\n".join(json.dumps(r) for r in failures)


def test_channels_last_kernels_vectorise_at_dpn92_shapes():
    """Every distinct specialisation the JIT compiles for DPN92's fused fp16 forward (torch host,
    224x224, batch 1 and 64), on sm_80 and sm_90: its tensor-core MMA loop has 16-byte global
    loads (ld.global.v4 / cp.async 16 / TMA), it has no 2-byte global load or store, no local
    memory and no ptxas spills. Guards the alignment hints and the slot layout: without them
    the stage-3 GEMMs (K = 1096, N = 1048: multiples of 8, not 16) and the narrow-group convs
    load fp16 elements one at a time."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    if importlib.util.find_spec("timm") is None:  # importing it here may fail (torch_host's
        pytest.skip("timm not installed")           # import_timm works around that)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_triton_ptx.py"), "--archs",
                               str(cc), "--batches", "1,64"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO / "tests")
             for cc in (80, 90)]  # one process an arch: the compiles are CPU-bound
    rows = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        rows += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["cc"]) for r in rows} == {
        (k, cc) for k in ("_conv1x1_kernel", "_grouped_conv3x3_kernel") for cc in (80, 90)}
    for r in rows:
        r["tiles"] = " ".join(f"{k}={v}" for k, v in sorted(r["options"].items())
                              if k.startswith(("BLOCK", "ALIGN", "SLOT", "STRIDE", "num_")))
    columns = ["kernel", "cc", "first_use", "loop_mma", "loop_wide_loads", "kernel_narrow_global",
               "local", "problems", "tiles"]
    text = format_table("Channels-last kernels at DPN92's shapes (JIT specialisation, PTX)", rows,
                        columns)
    failing = [r for r in rows if not r.get("ok") or r["problems"]]
    text += f"{len(failing)} of {len(rows)} specialisation/arch pairs fail the check\n"
    write_report("triton_dpn92_ptx_report.txt", text)
    assert not failing, "\n".join(json.dumps({k: r.get(k) for k in (
        "kernel", "cc", "first_use", "options", "problems", "error")}) for r in failing)


def test_ptx_check_flags_what_makes_kernels_slow():
    """The PTX check itself, on hand-written loops: one as the aligned kernels compile (16-byte
    cp.async feeding the MMAs), one as the unaligned ones did (2-byte loads), one spilling."""
    def kernel(loop_body, tail=""):
        return "\n".join(["$L__BB0_1:", *loop_body, "@%p1 bra $L__BB0_1;", tail, "ret;"])
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};"
    good = kernel(["cp.async.cg.shared.global [ %r63 + 0 ], [ %rd6 + 0 ], 0x10, %r64;", mma],
                  "st.global.v4.b32 [ %rd9 + 0 ], { %r1, %r2, %r3, %r4 };")
    assert problems(ptx_findings(good), {"spill_stores": 0}) == []
    narrow = kernel(["ld.global.b16 { %rs1 }, [ %rd6 + 0 ];", mma])
    found = problems(ptx_findings(narrow), {})
    assert any("16-byte" in p for p in found) and any("2-byte" in p for p in found), found
    assert "tensor-core" in problems(ptx_findings(kernel(["ld.global.v4.b32 {%r1}, [%rd1];"])),
                                     {})[0]
    spilling = kernel(["ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd6 + 0 ];", mma,
                       "st.local.u32 [%rd2], %r1;"])
    assert any("local memory" in p for p in problems(ptx_findings(spilling), {}))
