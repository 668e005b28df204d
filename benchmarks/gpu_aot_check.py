#!/usr/bin/env python3
"""GPU check of the op library's embedded Triton kernels (docs/gpu_aot.md) on a machine with a
CUDA GPU and torch, no Paddle: timm DPN92's fused forward with its launches through the C ABI of
a CUDA build's Paddle-free libdpn_fast_kernels.so, per dtype against float64 timm (the project's
rule, timm eager's error as the plain one) and against the same plans through Triton's JIT; then
both in CUDA-graph mode at n=64 and n=1. DIR/gpu_aot_check.json is rewritten after every row.

    python3 benchmarks/gpu_aot_check.py --lib build/aot-kernels/libdpn_fast_kernels.so --out DIR

The library is built on the CPU machine (its cubins come from that Triton) and carried:
docs/gpu_check.md, "The embedded kernels".
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", required=True, help="libdpn_fast_kernels.so of a CUDA build")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    import gpu_e2e
    from gpu_common import compare, dtype_name, exact_fp32, import_checkout_dpn_fast, time_fn
    import_checkout_dpn_fast()
    from dpn_fast.kernels._abi import EmbeddedKernels
    from dpn_fast.torch import fuse, import_timm

    kernels = EmbeddedKernels(args.lib)
    rows = []

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "gpu_aot_check.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "embedded": len(kernels), "rows": rows},
            indent=1))

    spec = gpu_e2e.DPN92
    base = gpu_e2e.build_model(import_timm(), spec, "cuda")
    x64 = gpu_e2e.images(1, spec, torch.float64, "cuda")
    models = {}
    with torch.no_grad(), exact_fp32():
        ref64 = gpu_e2e.as_dtype(base, torch.float64)(x64)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            model = models[dtype] = gpu_e2e.as_dtype(base, dtype)
            x = x64.to(dtype)
            eager, jit = model(x), fuse(model)(x)
            aot = fuse(model, kernels=kernels)(x)
            add({"check": "logits vs float64", "dtype": dtype_name(dtype),
                 **compare(aot, ref64, eager, dtype_name(dtype)),
                 "max |aot - jit|": float((aot.double() - jit.double()).abs().max())})
    with torch.no_grad():
        for n in (64, 1):
            x = gpu_e2e.images(n, spec, torch.float16, "cuda")
            for label, fused in (("jit", fuse(models[torch.float16])),
                                 ("aot", fuse(models[torch.float16], kernels=kernels))):
                graphed = fused.cuda_graph(x)
                add({"check": "graph replay fp16", "path": label, "n": n,
                     "ms": time_fn(lambda g=graphed: g(x))})


if __name__ == "__main__":
    main()
