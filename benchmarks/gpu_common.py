"""What the GPU checks share (benchmarks/gpu_check.py, benchmarks/gpu_nchw.py): the report that
is rewritten after every row, the log teed to a file, timing (CUDA graphs, an L2 flush between
kernel timings, at least MIN_ITERS timed iterations), peak memory, and the float64 accuracy rule
with its inputs and torch reference sequences.

Imports torch: a driver imports this module only after settling TRITON_INTERPRET (torch may
import triton, which reads it once).
"""
import contextlib
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # as tests/utils.py
BN_EPS = 1e-3  # timm's DPN BatchNorm epsilon
MIN_ITERS = 20  # timed iterations of every GPU timing


def log(msg):
    print(msg, flush=True)


class Tee:
    """A stream that writes to the console and to a log file (the log survives a killed run)."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the console's
        return getattr(self.stream, name)


def tee_output(path):
    """stdout and stderr (tracebacks included) also go to `path`."""
    sys.stdout, sys.stderr = Tee(sys.stdout, path), Tee(sys.stderr, path)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# =================================================================================================
# Report
# =================================================================================================


class Report:
    """Tables of rows, notes and errors, written to DIR/<name>.json and DIR/<name>.md after every
    row, so a run that is killed keeps everything measured before."""

    def __init__(self, out_dir, name="gpu_check", summaries=None, write_every_s=0.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.start = time.monotonic()
        self.info = {}
        self.tables = {}   # section -> list of row dicts
        self.notes = []
        self.errors = []   # (stage, traceback)
        self.stage_times = {}
        self.summaries = summaries or {}  # section -> (title, rows -> summary rows) for the .md
        self.write_every_s = write_every_s  # > 0: rows within that many seconds share a write
        self.written = 0.0

    def elapsed(self):
        return time.monotonic() - self.start

    @contextlib.contextmanager
    def stage(self, name):
        """One stage: an exception is recorded under Errors and the next stage still runs."""
        log(f"== {name} (t={self.elapsed():.0f}s)")
        t0 = time.monotonic()
        try:
            yield
        except Exception:
            tb = traceback.format_exc()
            self.errors.append((name, tb))
            log(f"!! {name} failed:\n{tb}")
        finally:
            self.stage_times[name] = round(time.monotonic() - t0, 1)
            self.write()

    def add(self, section, row):
        self.tables.setdefault(section, []).append(row)
        log("   " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()))
        if time.monotonic() - self.written >= self.write_every_s:
            self.write()

    def note(self, text):
        self.notes.append(text)
        log(f"   note: {text}")
        self.write()

    def write(self):
        data = {"info": self.info, "stage_seconds": self.stage_times, "tables": self.tables,
                "notes": self.notes,
                "errors": [{"stage": s, "traceback": t} for s, t in self.errors]}
        (self.out_dir / f"{self.name}.json").write_text(json.dumps(data, indent=1, default=str))
        lines = [f"# dpn_fast {self.name.replace('_', ' ')}", ""]
        lines += [f"- {k}: {fmt(v)}" for k, v in self.info.items()]
        lines += [f"- stage seconds: {self.stage_times}", ""]
        for section, rows in self.tables.items():
            if section in self.summaries:  # long tables: their summary (every row in the JSON)
                title, summarize = self.summaries[section]
                section, rows = title, summarize(rows)
            lines += [f"## {section}", "", *markdown_table(rows), ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.errors:
            lines += ["## Errors", ""]
            for stage, tb in self.errors:
                lines += [f"### {stage}", "```", tb.rstrip(), "```", ""]
        (self.out_dir / f"{self.name}.md").write_text("\n".join(lines))
        self.written = time.monotonic()


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def markdown_table(rows):
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v):
        return fmt(v).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    return out


@contextlib.contextmanager
def exact_fp32():
    """No TF32 in torch's float32 convs and matmuls: the plain float32 sequence that sets the
    accuracy bound must be float32 (cuDNN allows TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def guarded(report, section, what, fn, *args):
    """One failing case is a failed row, not a failed stage."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, the stage goes on
        report.add(section, {"case": what, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        return None


# =================================================================================================
# Timing
# =================================================================================================


def _graph_of(fn):
    """fn captured in a CUDA graph, after warm-up calls on a side stream (allocations settle)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_fn(fn, iters=MIN_ITERS, warmup=3, graph=False):
    """Mean ms per call over `iters` back-to-back calls. CUDA: events around the loop, of fn
    (launch overhead included) or of replays of fn captured in a CUDA graph (graph=True). CPU
    (dry run): wall clock of one call (the code path; Triton's interpreter is slow)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    run = _graph_of(fn).replay if graph else fn
    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


class L2Flush:
    """Writes a buffer twice the L2 size before each kernel timing, so no kernel reads inputs
    its previous iteration left in L2 (an isolated kernel gets no such help in a network)."""

    def __init__(self):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        self.buffer = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")

    def __call__(self):
        self.buffer.zero_()


_flush = None


def time_kernel(fn, iters=MIN_ITERS):
    """Median ms of one call of fn replayed from a CUDA graph, with the L2 flushed before each
    of `iters` timed replays (events around the replay alone). CPU (dry run): wall clock of one
    call (the interpreter is slow)."""
    global _flush
    if not torch.cuda.is_available():
        return time_fn(fn)
    if _flush is None:
        _flush = L2Flush()
    graph = _graph_of(fn)
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        _flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def timed(report, fn, kernel=False, iters=MIN_ITERS, graph=True):
    """time_kernel(fn) (kernel=True) or time_fn(fn, graph=graph); None, with a note, where
    timing (or capturing) raises."""
    try:
        return time_kernel(fn, iters) if kernel else time_fn(fn, iters, graph=graph)
    except Exception as e:  # noqa: BLE001 - one failed timing is a missing figure
        report.note(f"timing failed: {type(e).__name__}: {e}"[:300])
        return None


def peak_mib(fn):
    """MiB that one call of fn allocates beyond what was allocated before it (CUDA; the first
    call of a fused model at a batch size includes its workspace). None on CPU."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth(device):
    """GB/s of a large device-to-device copy (bytes read + written)."""
    elems = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(elems, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# =================================================================================================
# Inputs, references and the accuracy rule
# =================================================================================================


@dataclass
class BatchNormParams:
    weight: object
    bias: object
    mean: object
    var: object
    eps: float = BN_EPS

    def float(self):
        """fp32 contiguous copies (the C ABI's BN parameters are fp32 whatever the activations)."""
        return BatchNormParams(*(t.detach().float().contiguous()
                                 for t in (self.weight, self.bias, self.mean, self.var)), self.eps)

    def folded(self):
        """(scale, shift) fp32, folded in float64."""
        scale = self.weight.double() / torch.sqrt(self.var.double() + self.eps)
        return scale.float(), (self.bias.double() - self.mean.double() * scale).float()

    def apply_relu(self, x):
        """The unfused BN + ReLU as torch runs it at x's dtype (params fp32, or fp64 for fp64)."""
        cast = (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t)
        return torch.relu(F.batch_norm(x, cast(self.mean), cast(self.var), cast(self.weight),
                                       cast(self.bias), False, 0.0, self.eps))


def random_bn(c, gen, device):
    def u(lo, hi):
        return (torch.rand(c, generator=gen) * (hi - lo) + lo).to(device)
    return BatchNormParams(u(0.5, 1.5), u(-0.3, 0.3), u(-0.3, 0.3), u(0.5, 2.0))


def randn(shape, gen, device, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def nan_like(shape, device, dtype):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


@dataclass(frozen=True)
class ConvCase:
    """A grouped 3x3 conv (padding 1) with as many outputs as inputs."""
    label: str
    c: int
    groups: int
    stride: int
    hw: int      # input height (and width unless `w` is given)
    w: int = 0   # input width of a non-square case

    @property
    def width(self):
        return self.w or self.hw


def conv_inputs(case, n, dtype, device, gen):
    """x [n, c, h, w] at dtype; fp32 weight, BN, the weight with the BN folded in, its bias."""
    cin_per_group = case.c // case.groups
    x = randn((n, case.c, case.hw, case.width), gen, device, dtype)
    weight = randn((case.c, cin_per_group, 3, 3), gen, device, torch.float32,
                   scale=1.0 / math.sqrt(9 * cin_per_group))
    bn = random_bn(case.c, gen, device)
    scale, shift = bn.folded()
    w_folded = (weight.double() * scale.double().view(-1, 1, 1, 1)).float().contiguous()
    return x, weight, bn, w_folded, shift.contiguous()


def conv_unfused(x, weight, bn, stride, groups):
    """cuDNN conv + BN + ReLU (the fused conv's baseline)."""
    return bn.apply_relu(F.conv2d(x, weight, stride=stride, padding=1, groups=groups))


def compare(actual, ref64, plain, dtype, ignore=None):
    """The project's rule: max|fused - ref64| <= 2 * max|plain - ref64| + atol * max(1, |ref64|)."""
    def err(t):
        diff = (t.double() - ref64).abs()
        if ignore is not None:
            diff = torch.where(ignore, 0.0, diff)
        return float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(actual).all())
    fused_err = err(actual) if finite else float("inf")
    plain_err = err(plain)
    bound = 2 * plain_err + ATOL[dtype] * max(1.0, float(ref64.abs().max()))
    return {"err": fused_err, "plain_err": plain_err, "bound": bound,
            "ok": finite and fused_err <= bound, "finite": finite}


def load_model_config():
    """dpn_fast/models/config.py loaded by its path: plain Python, while dpn_fast.models'
    __init__ imports Paddle."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpn_fast_models_config",
                                                  REPO / "dpn_fast" / "models" / "config.py")
    config = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = config  # dataclasses look their module up while the class is built
    spec.loader.exec_module(config)
    return config


def import_checkout_dpn_fast():
    """Puts this checkout's dpn_fast first on the path, with Paddle hidden as on a GPU machine
    without it: with Paddle, `import dpn_fast` loads the op library, which a checkout lacks."""
    sys.modules.setdefault("paddle", None)
    sys.path.insert(0, str(REPO))
