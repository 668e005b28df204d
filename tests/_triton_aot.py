"""Ahead-of-time compiles every Triton kernel in dpn_fast.kernels for given compute capabilities
(no GPU needed) and prints one JSON object per compile: registers, local (spill) bytes, shared
memory.

Run as a separate process (tests/test_gpu_compile.py does) so that TRITON_INTERPRET, which the
test suite may set for the interpreter tests, cannot turn @triton.jit kernels into interpreted
functions here.

Convention: each op module dpn_fast.kernels.<op> defines AOT_SPECS, a list of (kernel, signature,
constexprs) or (kernel, signature, constexprs, options) with options as the launcher passes them
(num_warps...): signature maps every parameter name to a Triton type string ("*fp16", "i32", ...
and "constexpr" for constexpr parameters), constexprs gives their values. Every @triton.jit
function named *_kernel needs at least one spec per activation dtype (fp32, fp16, bf16), at the
launchers' largest configuration (the one most likely to spill); the channels-last kernels leave
fp16 to tests/_triton_ptx.py, which compiles every form DPN92 launches. Pointer arguments are
compiled 16-byte aligned, as the JIT specialises real tensors. A module may set AOT_MIN_CC
(e.g. 80 for tensor-core kernels, which on sm_75 fall back to FMAs Triton does not support
there): archs below it are not compiled.

    python tests/_triton_aot.py --archs 75,80,90
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import dpn_fast.kernels  # noqa: E402
from test_gpu_compile import parse_ptxas  # noqa: E402  (this script runs from tests/)


def kernel_modules():
    """(op, module) for each op module of dpn_fast.kernels (those named _* are helpers)."""
    for info in pkgutil.iter_modules(dpn_fast.kernels.__path__):
        if not info.name.startswith("_"):
            yield info.name, importlib.import_module(f"dpn_fast.kernels.{info.name}")


def jit_kernels(module):
    """Names of the module's launchable kernels: @triton.jit functions named *_kernel (helpers
    called from kernels are compiled as part of them)."""
    return {name for name, obj in vars(module).items()
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
            and obj.fn.__module__ == module.__name__}


def ptxas_for(cc):
    """The ptxas Triton itself uses for `cc` (it picks a newer one from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return Path(get_ptxas(cc).path)
    except (ImportError, AttributeError, RuntimeError):
        import triton.backends.nvidia as nvidia
        path = Path(nvidia.__file__).parent / "bin" / "ptxas"
        return path if path.exists() else None


def resource_usage(ptx, tool):
    """{"regs", "stack", "spill_stores", "spill_loads"} from `ptxas -v` on the kernel's PTX."""
    if tool is None:
        return {}
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        result = subprocess.run([str(tool), f"-arch={arch}", "-v", str(src), "-o",
                                 str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    rows = parse_ptxas(result.stdout + result.stderr)
    return {k: rows[0][k] for k in ("regs", "stack", "spill_stores", "spill_loads")} if rows else {}


def aligned_pointers(signature):
    """The attributes the JIT gives pointer arguments that are 16-byte aligned (every tensor the
    launchers get from torch's or Paddle's allocators): without them the compile is of a
    variant that never runs, with narrower loads and more registers."""
    return {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values())
            if kind.startswith("*")}


def spec_dtype(signature):
    """The activation dtype of a spec, for the report: the first pointer type."""
    return next((t[1:] for t in signature.values() if t.startswith("*")), "-")


def print_row(row, work):
    """Fills `row` with what work() returns (ok=True) or the error it raised (ok=False) and the
    seconds it took, and prints it as a JSON line for the test to read."""
    t0 = time.monotonic()
    try:
        row.update(ok=True, **work())
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    row["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default="75,80,90")
    args = parser.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    for op, module in kernel_modules():
        specs = getattr(module, "AOT_SPECS", None)
        kernels = jit_kernels(module)
        if specs is None:
            print(json.dumps({"op": op, "ok": False, "error": "no AOT_SPECS",
                              "kernels": sorted(kernels)}), flush=True)
            continue
        missing = sorted(kernels - {spec[0].fn.__name__ for spec in specs})
        if missing:
            print(json.dumps({"op": op, "ok": False,
                              "error": f"kernels without AOT_SPECS: {missing}"}), flush=True)
        module_archs = [cc for cc in archs if cc >= getattr(module, "AOT_MIN_CC", 0)]
        for kernel, signature, constexprs, *options in specs:
            options = options[0] if options else {}
            for cc in module_archs:
                row = {"op": op, "kernel": kernel.fn.__name__, "dtype": spec_dtype(signature),
                       "constexprs": {k: v for k, v in constexprs.items()}, "cc": cc}

                def compile_one(kernel=kernel, signature=signature, constexprs=constexprs,
                                options=options, cc=cc):
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs,
                                                        aligned_pointers(signature)),
                                              target=GPUTarget("cuda", cc, 32), options=options)
                    return dict(num_warps=compiled.metadata.num_warps,
                                shared=compiled.metadata.shared,
                                **resource_usage(compiled.asm["ptx"], ptxas_for(cc)))
                print_row(row, compile_one)


if __name__ == "__main__":
    main()
