"""timm's DPN end to end on a GPU: the channels-last fused forward (dpn_fast.torch, its public
API only) against timm eager (NCHW and channels_last) and torch.compile (default and
max-autotune), every model timed the same way: CUDA-graph replays, at least MIN_ITERS of them.
Used by benchmarks/gpu_check.py.

torch.compile runs in a child process (`gpu_check.py --compile-child MODE`) with a hard time
limit: a compile cannot be interrupted in-process, and max-autotune's length is not known in
advance. The child rebuilds the same model from the same seeds.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from gpu_common import compare, dtype_name, exact_fp32, peak_mib, randn, time_fn, timed

SECTION = "e2e timing"
COMPILE_MODES = {"default": "default",
                 # Our own CUDA graph captures every model alike; inductor's would nest in it.
                 "max-autotune": "max-autotune-no-cudagraphs"}


@dataclass(frozen=True)
class ModelSpec:
    """The model and image size: timm dpn92 at 224x224 on a GPU; a tiny DPN (one block a
    stage) at 32x32 in the dry run, so Triton's interpreter walks every path in seconds."""
    name: str
    side: int
    kwargs: tuple = ()

    def create(self, timm, device):
        return timm.create_model(self.name, pretrained=False, **dict(self.kwargs)).to(device)


DPN92 = ModelSpec("dpn92", 224)
TINY_DPN = ModelSpec("dpn68", 32, (("k_sec", (1, 1, 1, 1)), ("k_r", 32), ("groups", 8),
                                   ("inc_sec", (8, 8, 8, 8)), ("num_classes", 10)))


def calibrate_batch_norm(model, device, side, batches=3, n=8):
    """Random weights + running stats from random images, so eval activations stay normalised
    (default stats would let them grow block by block and overflow fp16)."""
    gen = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(randn((n, 3, side, side), gen, device, torch.float32))
    model.eval()


def build_model(timm, spec, device):
    """The float32 eval model with calibrated BN statistics; the same in every process."""
    torch.manual_seed(3)
    model = spec.create(timm, device)
    calibrate_batch_norm(model, device, spec.side, n=16 if device == "cuda" else 2)
    return model


def as_dtype(model, dtype):
    return copy.deepcopy(model).to(dtype).eval()


def images(n, spec, dtype, device, seed=5):
    return randn((n, 3, spec.side, spec.side), torch.Generator().manual_seed(seed), device, dtype)


class EndToEnd:
    """The float32 base model and its float64 logits on one image (batch 1: the fused forward's
    kernels are then the n=1 timing's, warmed already); per dtype the fused forward checked
    against them, then timed beside the timm baselines."""

    def __init__(self, report, timm, spec, device):
        from dpn_fast.torch import fuse
        self.fuse, self.report, self.spec, self.device = fuse, report, spec, device
        self.base = build_model(timm, spec, device)
        self.x64 = images(1, spec, torch.float64, device)
        with torch.no_grad():
            self.ref64 = as_dtype(self.base, torch.float64)(self.x64)
        self.models, self.timed_dtypes = {}, set()

    def check(self, dtype):
        """Fused logits at dtype against float64 timm (the 2x-of-eager rule); `time` times the
        fused forward only where they were finite."""
        dn = dtype_name(dtype)
        model = self.models[dtype] = as_dtype(self.base, dtype)
        x = self.x64.to(dtype)
        row = {"dtype": dn, "model": self.spec.name}
        try:
            with torch.no_grad(), exact_fp32():
                eager = model(x)
            fused = self.fuse(model)
            logits = fused(x)
            row.update(compare(logits, self.ref64, eager, dn))
            row["max |fused - eager|"] = float((logits.double() - eager.double()).abs().max())
            if row["finite"]:
                self.timed_dtypes.add(dtype)
            else:
                self.report.note(f"e2e {dn}: non-finite fused logits, not timed")
        except Exception as e:  # noqa: BLE001 - the timm baselines are still timed
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        self.report.add("e2e equivalence (logits vs float64 timm)", row)

    def time(self, dtype, n):
        """Graph-replay timings and peak memory of timm eager, channels_last eager and the fused
        model at batch n. Peak first, of a freshly fused model: its first call allocates the
        workspace for that batch size, which counts."""
        x = images(n, self.spec, dtype, self.device)
        model = self.models[dtype]
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        runs = {"timm eager": lambda: model(x), "timm eager channels_last": lambda: model_cl(x_cl)}
        if dtype in self.timed_dtypes:  # its logits were finite
            fused = self.fuse(model)
            runs["fused nhwc"] = lambda: fused(x)
        for name, fn in runs.items():
            with torch.no_grad():
                peak = peak_mib(fn)
                ms = timed(self.report, fn)
            add_row(self.report, name, dtype_name(dtype), n, ms, peak)


def add_row(report, model, dn, n, ms, peak=None, compile_s=None):
    row = {"model": model, "dtype": dn, "n": n, "graph ms": ms,
           "img/s": n / (ms * 1e-3) if ms else None, "peak MiB": peak}
    if compile_s is not None:
        row["compile s"] = compile_s
    report.add(SECTION, row)


# =================================================================================================
# torch.compile in a child process
# =================================================================================================


def compile_child(timm, spec, mode, batches, device, results_path, dry_run):
    """The child's work: torch.compile(mode) of the model in fp16 (fp32 on CPU), then per batch
    the first call (compile time), the graph-replay time and the peak memory, one JSON line each
    as soon as measured. The dry run compiles with the eager backend (the path, not inductor)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = as_dtype(build_model(timm, spec, device), dtype)
    options = {"backend": "eager"} if dry_run else {"mode": COMPILE_MODES[mode]}
    for n in batches:
        compiled = torch.compile(model, dynamic=False, **options)
        x = images(n, spec, dtype, device)
        with torch.no_grad():
            t0 = time.monotonic()
            compiled(x)
            if device == "cuda":
                torch.cuda.synchronize()
            compile_s = time.monotonic() - t0
            try:
                ms, graph = time_fn(lambda: compiled(x), graph=device == "cuda"), True
            except Exception as e:  # noqa: BLE001 - a module that can't be captured: a loop
                print(f"graph capture failed ({type(e).__name__}: {e}); timing a loop", flush=True)
                ms, graph = time_fn(lambda: compiled(x)), False
            peak = peak_mib(lambda: compiled(x))
        with open(results_path, "a") as f:
            f.write(json.dumps({"n": n, "ms": ms, "graph": graph, "compile_s": compile_s,
                                "peak": peak, "dtype": dtype_name(dtype)}) + "\n")
        print(f"torch.compile {mode} n={n}: compile {compile_s:.1f}s, {ms:.3f} ms", flush=True)


def run_compiled(report, script, mode, batches, timeout_s, dry_run):
    """Runs compile_child in `script --compile-child mode` for at most timeout_s; adds the rows
    it measured (a killed child keeps the batches it finished)."""
    out = report.out_dir
    results, log_path = out / f"compile_{mode}.jsonl", out / f"compile_{mode}.log"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), "--compile-child", mode, "--batches",
           ",".join(map(str, batches)), "--out", str(out)] + (["--dry-run"] if dry_run else [])
    t0 = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # killed with its compile workers
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    done = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.exists() else []
    for r in done:
        add_row(report, f"torch.compile {mode}", r["dtype"], r["n"], r["ms"], r["peak"],
                compile_s=r["compile_s"])
        if not r["graph"]:
            report.note(f"torch.compile {mode} n={r['n']}: not capturable in a CUDA graph; "
                        "timed as a loop of calls")
    missing = [n for n in batches if n not in {r["n"] for r in done}]
    if missing:
        why = f"killed after {timeout_s:.0f} s" if rc is None else f"exit status {rc}"
        report.note(f"torch.compile {mode}: n={missing} not measured ({why}; {log_path.name})")
    report.info[f"torch.compile {mode} seconds"] = round(time.monotonic() - t0, 1)
