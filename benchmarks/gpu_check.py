#!/usr/bin/env python3
"""GPU check of dpn_fast's channels-last forward on a machine with a CUDA GPU and torch, no Paddle.

    python3 benchmarks/gpu_check.py --out DIR              # GPU: 395 s (PLAN)
    python3 benchmarks/gpu_check.py --out DIR --dry-run    # CPU: the whole plan, tiny sizes
    python3 benchmarks/gpu_check.py --estimate             # the plan and its time estimate

Runs PLAN in order, fp16 first: warm the Triton cache on every core, the kernels' fp16
correctness, timm DPN92 end to end (timm eager, channels_last eager, torch.compile default and
max-autotune, the fused forward) in CUDA-graph mode at n=64 and n=1 with peak memory, the kernel
timings against cuDNN/cuBLAS, a tile sweep limited to the 14x14 stage's GEMMs and the
narrow-group convs, then fp32/bf16 correctness; last the targets table. Each step has its share
of --budget-s and starts no new work past it; DIR/gpu_check.md and .json are rewritten after
every row and DIR/gpu_check.log holds the console. Details: docs/gpu_check.md.
"""
import argparse
import datetime
import faulthandler
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCHES = (64, 1)             # the targets' batch sizes, n=64 first
MACHINE_START_S = 60          # the device machine's start, outside this script
GPU_MACHINE_LIMIT_S = 8 * 60  # what a run may take of the GPU machine's time, start included


@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: float  # on an H100/H200; the basis is in docs/gpu_check.md
    basis: str


PLAN = (
    Step("setup", 15, "imports 5 s, copy bandwidth, timm dpn92 built and BN-calibrated, float64 "
                      "logits of one image"),
    Step("warm triton cache", 35, "about 150 kernel specialisations at 1-3 s of CPU each, on 15 "
                                  "worker processes (5 s start each)"),
    Step("correctness fp16", 15, "33 kernel cases at batch 2, compiled already"),
    Step("e2e fp16", 25, "equivalence, then 3 models x 2 batches: peak call + graph capture + "
                         "23 replays"),
    Step("torch.compile default", 60, "child process: 20-25 s compile at n=64 (measured on an "
                                      "H200), ~15 s at n=1, 5 s start; killed at its share"),
    Step("torch.compile max-autotune", 150, "child process: benchmarks GEMM/conv choices per "
                                            "shape; n=64 first; killed at its share"),
    Step("kernel timings", 30, "7 convs x 2 batches x 5 timings + 15 GEMMs x 2 batches x 3 "
                               "timings, 20 replays each with an L2 flush"),
    Step("sweep", 35, "3 convs x 2 batches x 16 tiles + 6 GEMMs x 2 batches x 9 tiles, "
                      "checked then timed"),
    Step("correctness fp32 bf16", 20, "the fp16 cases in fp32 and bf16 (compiled already)"),
    Step("e2e fp32 bf16", 10, "fused logits vs float64 in fp32 and bf16"),
    Step("targets", 0, "from the tables"),
)


def plan_estimate_s(skip=()):
    return sum(s.estimate_s for s in PLAN if s.name not in skip)


# =================================================================================================
# Targets (no torch needed: tests call this on rows as a GPU run writes them)
# =================================================================================================


TARGETS = ("grouped conv >= 3x best cuDNN at n=64, every shape", "e2e n=64 >= 2x timm eager",
           "e2e n=64 >= 1.4x torch.compile", "e2e n=1 graph <= 0.8 ms",
           "peak memory <= timm eager")
CONV_SECTION, E2E_SECTION = "nhwc grouped conv timing (fp16)", "e2e timing"


def evaluate_targets(report):
    """The targets table, one row per TARGETS name: PASS / FAIL / not measured, and the figures
    (fp16; each row checks exactly what its name says, on whatever card ran it)."""
    e2e = {(r["model"], r["n"]): r for r in report.tables.get(E2E_SECTION, [])
           if r["dtype"] == "float16"}

    def value(model, n, key="graph ms"):
        return (e2e.get((model, n)) or {}).get(key)

    rows = []
    convs = [r for r in report.tables.get(CONV_SECTION, []) if r["n"] == 64]
    speedups = [r.get("speedup") for r in convs]
    measured = bool(convs) and None not in speedups
    rows.append(_verdict(
        measured and min(speedups) >= 3, measured,
        f"min {min(speedups):.2f}x over {len(convs)} shapes ("
        + ", ".join(f"{r['case']} {r['speedup']:.2f}x vs {r['best cudnn']}" for r in convs)
        + ")" if measured else ""))

    fused64 = value("fused nhwc", 64)

    def ratio(base, need, what):
        if not (base and fused64):
            return _verdict(False, False, "")
        return _verdict(base / fused64 >= need, True,
                        f"{fused64:.2f} vs {base:.2f} ms ({what}): {base / fused64:.2f}x")
    rows.append(ratio(value("timm eager", 64), 2.0, "timm eager"))
    compiled = {mode: value(f"torch.compile {mode}", 64) for mode in ("default", "max-autotune")}
    done = {m: v for m, v in compiled.items() if v}
    best = min(done, key=done.get) if done else None
    verdict = ratio(done.get(best), 1.4, f"torch.compile {best}")
    if len(done) < 2 and verdict[0] != "not measured":
        absent = [m for m in compiled if m not in done]
        verdict = (verdict[0], verdict[1] + f"; {', '.join(absent)} not measured")
    rows.append(verdict)
    graph = value("fused nhwc", 1)
    card = report.info.get("device", "")
    rows.append(_verdict(graph is not None and graph <= 0.8, graph is not None,
                         f"{graph:.3f} ms on {card}" if graph is not None else ""))
    eager_peak = value("timm eager", 64, "peak MiB")
    fused_peak = value("fused nhwc", 64, "peak MiB")
    measured = eager_peak is not None and fused_peak is not None
    rows.append(_verdict(measured and fused_peak <= eager_peak, measured,
                         f"n=64: {fused_peak:.0f} vs {eager_peak:.0f} MiB" if measured else ""))
    for target, (verdict, detail) in zip(TARGETS, rows):
        report.add("targets", {"target": target, "verdict": verdict, "measured": detail})


def _verdict(ok, measured, detail):
    if not measured:
        return "not measured", detail
    return ("PASS" if ok else "FAIL"), detail


# =================================================================================================
# The run
# =================================================================================================


class Context:
    """What every step needs: the device, the kernels' modules, the cases, the model spec, and
    when the current step must stop starting new work."""

    def __init__(self, args):
        import torch

        import gpu_e2e
        import gpu_nhwc
        from gpu_common import load_model_config
        from dpn_fast.kernels import nhwc_conv1x1, nhwc_grouped_conv3x3
        self.args, self.dry_run = args, args.dry_run
        self.gpu = torch.cuda.is_available() and not args.dry_run
        self.device = "cuda" if self.gpu else "cpu"
        self.gemm, self.grouped = nhwc_conv1x1, nhwc_grouped_conv3x3
        convs, gemms, widest = gpu_nhwc.dpn92_cases(load_model_config())
        # bf16 arithmetic is wrong under Triton's interpreter: the dry run checks fp32 instead.
        self.dtypes = [torch.float16, torch.float32, torch.bfloat16][:2 if args.dry_run else 3]
        self.e2e_dtype = torch.float16 if self.gpu else torch.float32
        self.spec = gpu_e2e.DPN92 if self.gpu else gpu_e2e.TINY_DPN
        if self.gpu:
            self.batches, self.sweep_batches = list(BATCHES), list(BATCHES)
            self.correct_gemms = gemms + gpu_nhwc.SMALL_GEMMS
            self.correct_convs = convs + gpu_nhwc.SMALL_CONVS
            self.timed_gemms, self.timed_convs = gemms, convs
            self.sweep_gemms = [g for g in gemms if g.stage == widest]
            self.sweep_convs = [c for c in convs if c.c // c.groups <= 6]
        else:  # the small odd shapes through the interpreter: every path, little time
            self.batches, self.sweep_batches = [1], [1]
            self.correct_gemms, self.correct_convs = gpu_nhwc.SMALL_GEMMS, gpu_nhwc.SMALL_CONVS
            self.timed_gemms, self.timed_convs = gpu_nhwc.SMALL_GEMMS, gpu_nhwc.SMALL_CONVS[:1]
            self.sweep_gemms = gpu_nhwc.SMALL_GEMMS[:1]
            self.sweep_convs = [c for c in gpu_nhwc.SMALL_CONVS if c.label == "g3"]
        self.copy_gbs = None
        self._timm = None

    @property
    def timm(self):
        if self._timm is None:
            from dpn_fast.torch import import_timm
            self._timm = import_timm()
        return self._timm

    @staticmethod
    def over(until):
        return time.monotonic() >= until

    def fused_warm_jobs(self):
        """(label, fn) per fused forward the run calls: each compiles its kernel variants one
        after another, so each gets its own worker."""
        import gpu_e2e

        def fused_forward(dtype, n):
            from dpn_fast.torch import fuse
            base = gpu_e2e.build_model(self.timm, self.spec, self.device)
            fuse(gpu_e2e.as_dtype(base, dtype))(gpu_e2e.images(n, self.spec, dtype, self.device))
        jobs = [(f"fused forward n={n}", lambda n=n: fused_forward(self.e2e_dtype, n))
                for n in self.batches]
        jobs += [(f"fused forward {d} n=1", lambda d=d: fused_forward(d, 1))
                 for d in self.dtypes if d != self.e2e_dtype]
        return jobs if self.gpu else jobs[:1]  # the dry run: the path, not the compiles

    def kernel_warm_jobs(self):
        import gpu_nhwc
        jobs = gpu_nhwc.warm_jobs(self, self.correct_gemms, self.correct_convs,
                                  self.sweep_gemms, self.sweep_convs, self.batches,
                                  self.sweep_batches)
        return jobs if self.gpu else jobs[-2:]


def run_plan(report, ctx, budget_s):
    """PLAN's steps in order, each given its estimate's share of budget_s (what earlier steps
    saved carries over; skipped steps have none); a step whose share has passed is skipped with
    a note."""
    import torch

    import gpu_e2e
    import gpu_nhwc
    from gpu_common import copy_bandwidth
    scale = budget_s / plan_estimate_s(ctx.args.skip)
    planned_end, e2e, warmup = report.start, None, None
    for step in PLAN:
        if step.name in ctx.args.skip:
            report.note(f"{step.name}: skipped (--skip)")
            continue
        planned_end += step.estimate_s * scale
        until = planned_end
        if step.name != "targets" and time.monotonic() >= until:
            report.note(f"{step.name}: skipped, the budget's share for it had passed")
            continue
        with report.stage(step.name):
            if step.name == "setup":
                ctx.copy_gbs = report.info["device copy GB/s"] = copy_bandwidth(ctx.device)
                report.info["timm"] = ctx.timm.__version__
                e2e = gpu_e2e.EndToEnd(report, ctx.timm, ctx.spec, ctx.device)
            elif step.name == "warm triton cache":
                warmup = Warmup(report, ctx)
                warmup.wait("kernels", until)
            elif step.name == "correctness fp16":
                gpu_nhwc.run_correctness(report, ctx, ctx.correct_gemms, ctx.correct_convs,
                                         ctx.dtypes[0], 2, until)
            elif step.name == "e2e fp16":
                if warmup is not None:
                    warmup.wait("fused", until - 0.5 * step.estimate_s * scale)
                e2e.check(ctx.e2e_dtype)
                for n in ctx.batches:
                    e2e.time(ctx.e2e_dtype, n)
            elif step.name.startswith("torch.compile"):
                mode = step.name.split()[-1]
                gpu_e2e.run_compiled(report, Path(__file__), mode, ctx.batches,
                                     until - time.monotonic(), ctx.dry_run)
            elif step.name == "kernel timings":
                gpu_nhwc.time_grouped_convs(report, ctx, ctx.timed_convs, ctx.batches, until)
                gpu_nhwc.time_gemms(report, ctx, ctx.timed_gemms, ctx.batches, until)
            elif step.name == "sweep":
                gpu_nhwc.sweep(report, ctx, ctx.sweep_gemms, ctx.sweep_convs, ctx.sweep_batches,
                               until)
            elif step.name == "correctness fp32 bf16":
                for dtype in ctx.dtypes[1:]:
                    gpu_nhwc.run_correctness(report, ctx, ctx.correct_gemms, ctx.correct_convs,
                                             dtype, 2, until)
            elif step.name == "e2e fp32 bf16":
                for dtype in ctx.dtypes:
                    if dtype != ctx.e2e_dtype:
                        e2e.check(dtype)
            elif step.name == "targets":
                evaluate_targets(report)
            else:
                raise AssertionError(f"PLAN step {step.name} has no code")
        if ctx.gpu:
            torch.cuda.empty_cache()
    if warmup is not None:  # workers a skipped step never waited for: none outlives the run
        for kind in list(warmup.procs):
            warmup.wait(kind, time.monotonic())


class Warmup:
    """Compiles every kernel configuration of the run in parallel, into the Triton cache that
    the steps then read: one worker process per fused forward (each compiles its variants in
    turn), the kernel steps' launches shared round-robin by the other workers (at most 15 in
    all, one a core; 2 in the dry run). The fused forwards' workers run on in the background
    until a step needs them (`wait`)."""

    def __init__(self, report, ctx):
        self.report, self.ctx = report, ctx
        cmd = [sys.executable, __file__, "--out", str(report.out_dir)] + \
            (["--dry-run"] if ctx.dry_run else [])
        fused = len(ctx.fused_warm_jobs())
        kernels = len(ctx.kernel_warm_jobs())
        shards = max(1, min(15, os.cpu_count() or 1) - fused) if ctx.gpu else 1
        shards = min(shards, kernels)
        self.procs = {"fused": [], "kernels": []}
        for kind, shard in [("fused", f"fused:{i}/{fused}") for i in range(fused)] + \
                [("kernels", f"kernels:{i}/{shards}") for i in range(shards)]:
            log_file = open(report.out_dir / f"warm_{shard.replace(':', '_').replace('/', 'of')}"
                            ".log", "w")
            proc = subprocess.Popen(cmd + ["--warm-shard", shard], stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs[kind].append((shard, proc, log_file))
        report.info["triton cache warm-up"] = (f"{fused} fused forwards and {kernels} kernel "
                                               f"launches on {fused + shards} workers")

    def wait(self, kind, until):
        """Waits for the `kind` workers until `until`; kills those still running then (a step
        compiles what they had not)."""
        import signal
        for shard, proc, log_file in self.procs.pop(kind, []):
            try:
                rc = proc.wait(timeout=max(1.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "killed at the step's share"
            log_file.close()
            if rc != 0:
                self.report.note(f"warm-up worker {shard}: {rc} (see its warm_*.log)")
        self.report.info[f"warm-up {kind} done at"] = f"{self.report.elapsed():.0f}s"


def warm_shard(ctx, shard):
    """A warm-up worker, `fused:i/k` or `kernels:i/k`: job i of the fused forwards, or every
    k-th kernel launch from the i-th. A failing job is printed and the next one runs (the step
    that needs it reports the error)."""
    kind, part = shard.split(":")
    index, workers = map(int, part.split("/"))
    jobs = ctx.fused_warm_jobs() if kind == "fused" else ctx.kernel_warm_jobs()
    failed = 0
    for i, (label, fn) in enumerate(jobs):
        if i % workers != index:
            continue
        t0 = time.monotonic()
        try:
            fn()
            print(f"{label}: {time.monotonic() - t0:.1f}s", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"{label}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


def describe(report, ctx, args):
    import torch
    import triton

    import dpn_fast
    info = report.info
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["mode"] = "dry run (CPU, Triton interpreter, tiny DPN)" if ctx.dry_run else "GPU"
    info["device"] = torch.cuda.get_device_name() if ctx.gpu else "cpu"
    if ctx.gpu:
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
        info["cuda"], info["cudnn"] = torch.version.cuda, torch.backends.cudnn.version()
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    info.update({"python": platform.python_version(), "torch": torch.__version__,
                 "triton": triton.__version__, "commit": args.commit or git_commit(),
                 "dpn_fast": str(Path(dpn_fast.__file__).parent), "budget s": args.budget_s,
                 "model": f"{ctx.spec.name} {ctx.spec.side}x{ctx.spec.side}"})


def git_commit():
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() \
            or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_estimate():
    total = plan_estimate_s()
    for step in PLAN:
        print(f"{step.estimate_s:5.0f} s  {step.name}: {step.basis}")
    print(f"{total:5.0f} s  the script (default --budget-s {total:.0f})")
    print(f"{total + MACHINE_START_S:5.0f} s  with the machine's start "
          f"(limit {GPU_MACHINE_LIMIT_S} s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for gpu_check.md / .json / .log")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: the whole plan under TRITON_INTERPRET=1 at tiny sizes")
    p.add_argument("--estimate", action="store_true", help="print the plan's time estimate")
    p.add_argument("--budget-s", type=float,
                   help="the script's time budget, shared by the steps as PLAN estimates "
                        "(default: the estimates' sum, --skip's steps left out)")
    p.add_argument("--commit", help="the commit checked (where the copy has no .git)")
    p.add_argument("--skip", type=lambda v: set(filter(None, v.split(","))), default=set(),
                   help="comma-separated PLAN step names to skip")
    p.add_argument("--warm-shard", help=argparse.SUPPRESS)    # child: i/k of the warm-up jobs
    p.add_argument("--compile-child", help=argparse.SUPPRESS)  # child: torch.compile MODE
    p.add_argument("--batches", help=argparse.SUPPRESS)        # the compile child's batches
    args = p.parse_args(argv)
    if not args.estimate and not args.out:
        p.error("--out is required")
    unknown = args.skip - {step.name for step in PLAN}
    if unknown:
        p.error(f"--skip: no PLAN step named {sorted(unknown)}; the steps: "
                f"{', '.join(step.name for step in PLAN)}")
    if args.budget_s is None:
        args.budget_s = plan_estimate_s(args.skip)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.estimate:
        print_estimate()
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    else:
        os.environ.setdefault("TRITON_DEFAULT_BACKEND", "nvidia")
    sys.path.insert(0, str(HERE))
    from gpu_common import Report, import_checkout_dpn_fast, tee_output
    import_checkout_dpn_fast()
    ctx = Context(args)
    if args.warm_shard:
        return warm_shard(ctx, args.warm_shard)
    if args.compile_child:
        import gpu_e2e
        gpu_e2e.compile_child(ctx.timm, ctx.spec, args.compile_child,
                              [int(n) for n in args.batches.split(",")], ctx.device,
                              Path(args.out) / f"compile_{args.compile_child}.jsonl",
                              ctx.dry_run)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tee_output(out / "gpu_check.log")
    report = Report(out, summaries={"nhwc correctness": (
        "nhwc correctness (summary; every case in gpu_check.json)", _correctness_summary)})
    if not ctx.gpu and not args.dry_run:
        report.note("no CUDA device: use --dry-run on a CPU machine")
        return 2
    # A hang (a kernel that never finishes) still leaves the report and a stack dump.
    faulthandler.dump_traceback_later(args.budget_s + 30, exit=True,
                                      file=open(out / "gpu_check.log", "a"))
    describe(report, ctx, args)
    run_plan(report, ctx, args.budget_s)
    report.info["total seconds"] = round(report.elapsed(), 1)
    report.write()
    print(f"wrote {out / 'gpu_check.md'} and gpu_check.json", flush=True)
    return 1 if report.errors else 0


def _correctness_summary(rows):
    """One row per (op, dtype): cases, passed, the worst err / bound."""
    groups = {}
    for r in rows:
        groups.setdefault((r.get("op", "(error)"), r.get("dtype", "")), []).append(r)
    return [{"op": op, "dtype": dtype, "cases": len(g), "passed": sum(bool(r.get("ok")) for r in g),
             "worst err/bound": max((r["err"] / r["bound"] for r in g if r.get("bound")),
                                    default=None),
             "failed": ", ".join(str(r.get("case")) for r in g if not r.get("ok"))[:200]}
            for (op, dtype), g in groups.items()]


if __name__ == "__main__":
    sys.exit(main())
