"""The channels-last kernels (dpn_fast/kernels/nhwc_conv1x1.py, nhwc_grouped_conv3x3.py) on a
GPU with torch as the host: correctness against float64, kernel timings against honest
baselines, the tile sweep, and the Triton cache warm-up jobs. Used by benchmarks/gpu_check.py.

GemmRun and GroupedRun are the only code here that knows the launchers' signatures: when a
launcher changes, they are the one place to edit.
"""
import math
from dataclasses import dataclass

import torch

from gpu_common import (ConvCase, compare, conv_inputs, conv_unfused, dtype_name, exact_fp32,
                        guarded, nan_like, randn, timed)

GEMM_FORMS = ("1x1a", "proj", "1x1c")


@dataclass(frozen=True)
class GemmCase:
    """One of a DPN block's 1x1 convs on stage rows. form: "1x1a" (BN + ReLU prologue, bias +
    ReLU), "proj" (prologue, stride as a row gather), "1x1c" (residual add into the stage buffer,
    dense columns appended behind `dense` existing ones; ldo = resid + the stage's capacity)."""
    label: str
    form: str
    k: int
    n: int
    hw: int         # input side
    stride: int = 1
    resid: int = 0  # 1x1c: columns added in place
    dense: int = 0  # 1x1c: dense channels already in the buffer
    ldo: int = 0    # 1x1c: the stage buffer's width
    stage: int = 0


def dpn92_cases(config):
    """(grouped convs, GEMMs) of DPN92: every distinct grouped conv shape; the three GEMM forms
    at the first and last block of each stage and, in the stage with the most blocks (the 14x14
    one, about 60% of the FLOPs), also at its second block (K = 1096: a multiple of 8, not 16)."""
    blocks = config.block_shapes("DPN92")
    convs, by_stage = {}, {}
    for b in blocks:
        key = (b.bottleneck, b.groups, b.stride, b.in_hw)
        convs.setdefault(key, ConvCase(f"s{b.stage}-{b.kind}", *key))
        by_stage.setdefault(b.stage, []).append(b)
    widest = max(by_stage, key=lambda s: len(by_stage[s]))
    gemms = []
    for stage, stage_blocks in by_stage.items():
        chosen = [stage_blocks[0], stage_blocks[-1]]
        if stage == widest:
            chosen.insert(1, stage_blocks[1])
        for b in {id(x): x for x in chosen}.values():
            label = f"s{b.stage}b{b.index}"
            k_in = b.in_resid + b.in_dense
            gemms.append(GemmCase(f"{label}-1x1a", "1x1a", k_in, b.bottleneck, b.in_hw,
                                  stage=stage))
            if b.kind != "normal":
                gemms.append(GemmCase(f"{label}-proj", "proj", k_in, b.resid + 2 * b.inc,
                                      b.in_hw, b.stride, stage=stage))
            gemms.append(GemmCase(f"{label}-1x1c", "1x1c", b.bottleneck, b.resid + b.inc,
                                  b.out_hw, resid=b.resid, dense=b.dense_before,
                                  ldo=b.resid + b.stage_dense, stage=stage))
    return list(convs.values()), gemms, widest


# Small odd shapes: odd and non-square sizes, 2-5 channels a group, stride 2, wide row strides.
SMALL_GEMMS = [GemmCase("odd-1x1a", "1x1a", 37, 24, 7), GemmCase("odd-proj", "proj", 20, 19, 7, 2),
               GemmCase("odd-1x1c", "1x1c", 13, 16, 5, resid=10, dense=7, ldo=28)]
SMALL_CONVS = [ConvCase("s1", 64, 32, 1, 9), ConvCase("s2", 64, 32, 2, 9),
               ConvCase("g3", 96, 32, 1, 5), ConvCase("odd-s2", 40, 8, 2, 7, w=5),
               ConvCase("odd-s1", 15, 5, 1, 6, w=13)]


class GemmRun:
    """A GemmCase's inputs at batch n, the fused launch, the unfused torch sequence it replaces
    (at any dtype: float64 for the reference) and the plain cuBLAS matmul of its shape."""

    def __init__(self, module, case, n, dtype, device, gen):
        self.module, self.case, self.n, self.dtype = module, case, n, dtype
        c = case
        self.h_out = (c.hw - 1) // c.stride + 1
        self.rows_in, self.rows = n * c.hw * c.hw, n * self.h_out * self.h_out
        self.a = randn((self.rows_in, c.k), gen, device, dtype)
        self.w = randn((c.k, c.n), gen, device, torch.float32, scale=1 / math.sqrt(c.k))
        self.bias = randn((c.n,), gen, device, torch.float32, scale=0.3)
        self.in_scale = (torch.rand(c.k, generator=gen) + 0.5).to(device)
        self.in_shift = randn((c.k,), gen, device, torch.float32, scale=0.3)
        ldo = c.ldo or c.n
        self.stage = randn((self.rows, ldo), gen, device, dtype)  # 1x1c: resid | old dense | ...
        self.out = nan_like((self.rows, ldo), device, dtype)
        self.w_dt = self.w.to(dtype)

    def fused(self, tiles=None):
        c, m = self.case, self.module
        if c.form == "1x1c":
            m.conv1x1_forward(self.a, self.w_dt, self.out, rows=self.rows, k=c.k, n=c.n, lda=c.k,
                              ldo=c.ldo, split=c.resid, dense_gap=c.dense, add_to_out=True,
                              tiles=tiles)
            return
        affine = {"in_scale": self.in_scale, "in_shift": self.in_shift}
        if c.form == "1x1a":
            affine.update(bias=self.bias, relu=True)
        m.conv1x1_forward(self.a, self.w_dt, self.out, rows=self.rows, k=c.k, n=c.n, lda=c.k,
                          ldo=c.n, stride=c.stride, in_hw=(c.hw, c.hw), tiles=tiles, **affine)

    def matmul_floor(self):
        """A plain cuBLAS matmul [rows, k] x [k, n] into a preallocated output: no prologue, no
        epilogue, no gather. What the GEMM can at best approach."""
        a = self.a[:self.rows] if self.rows <= self.rows_in else self.a
        out = torch.empty((a.shape[0], self.case.n), device=a.device, dtype=a.dtype)
        return lambda: torch.mm(a, self.w_dt, out=out)

    def torch_sequence(self):
        """The same work as a careful torch user writes it, timed beside the launch: in the
        activations' dtype, affine and weights cast once; BN + ReLU as one addcmul and a ReLU,
        the gather as a strided view, cuBLAS, bias + ReLU in place; for 1x1c the residual add in
        place and the new columns copied behind the old ones (no concat)."""
        c, n, out = self.case, self.n, self.out
        scale, shift, bias = (t.to(self.dtype) for t in (self.in_scale, self.in_shift, self.bias))
        a, w = self.a, self.w_dt
        if c.form == "1x1c":
            start = c.resid + c.dense

            def run():
                y = torch.mm(a, w)
                out[:, :c.resid] += y[:, :c.resid]
                out[:, start:start + c.n - c.resid] = y[:, c.resid:]
            return run

        def run():
            x = torch.relu_(torch.addcmul(shift, a, scale))
            if c.stride > 1:
                x = x.view(n, c.hw, c.hw, c.k)[:, ::c.stride, ::c.stride].reshape(-1, c.k)
            y = torch.mm(x, w)
            if c.form == "1x1a":
                torch.relu_(y.add_(bias))
            out[:, :c.n] = y
        return run

    def reset_out(self):
        """NaN, except a 1x1c's resid and old dense columns (what the stage buffer holds)."""
        self.out.fill_(float("nan"))
        if self.case.form == "1x1c":
            keep = self.case.resid + self.case.dense
            self.out[:, :keep] = self.stage[:, :keep]

    def unfused(self, dtype):
        """The torch sequence at `dtype`: BN + ReLU, the (strided) 1x1 conv as a matmul, bias,
        ReLU; for 1x1c the residual add and the concat. Returns the columns the launch writes."""
        c = self.case
        a = self.a.to(dtype)
        if c.form != "1x1c":
            p = torch.float64 if dtype == torch.float64 else torch.float32
            a = torch.relu(a.to(p) * self.in_scale.to(p) + self.in_shift.to(p)).to(dtype)
            if c.stride > 1:
                a = a.view(self.n, c.hw, c.hw, c.k)[:, ::c.stride, ::c.stride].reshape(-1, c.k)
        y = a @ self.w.to(dtype)
        if c.form == "1x1a":
            return torch.relu(y + self.bias.to(dtype))
        if c.form == "proj":
            return y
        return torch.cat([self.stage[:, :c.resid].to(dtype) + y[:, :c.resid], y[:, c.resid:]], 1)

    def written(self):
        c = self.case
        if c.form != "1x1c":
            return self.out[:, :c.n]
        start = c.resid + c.dense
        return torch.cat([self.out[:, :c.resid], self.out[:, start:start + c.n - c.resid]], 1)

    def untouched_ok(self):
        """Columns the launch must leave alone still hold what they held."""
        c = self.case
        if c.form != "1x1c":
            return bool(self.out[:, c.n:].isnan().all()) if self.out.shape[1] > c.n else True
        old = self.out[:, c.resid:c.resid + c.dense]
        spare = self.out[:, c.resid + c.dense + c.n - c.resid:]
        return bool(torch.equal(old, self.stage[:, c.resid:c.resid + c.dense])
                    and spare.isnan().all())

    def check(self, tiles=None):
        """Runs the launch on NaN-filled output; True when it matches float64 (the rule) and
        left the other columns alone."""
        ref64, plain = self.unfused(torch.float64), self.unfused(self.dtype)
        self.reset_out()
        self.fused(tiles)
        row = compare(self.written(), ref64, plain, dtype_name(self.dtype))
        row["untouched_ok"] = self.untouched_ok()
        row["ok"] = row["ok"] and row["untouched_ok"]
        return row


class GroupedRun:
    """A ConvCase as NHWC rows: the fused launch, and cuDNN's conv + BN + ReLU in its layouts."""

    def __init__(self, module, case, n, dtype, device, gen, tiles=None):
        self.module, self.case, self.n, self.dtype = module, case, n, dtype
        self.x, self.weight, self.bn, self.w_folded, self.bias = conv_inputs(case, n, dtype,
                                                                             device, gen)
        self.rows = self.x.permute(0, 2, 3, 1).reshape(-1, case.c).contiguous()
        self.h_out = (case.hw - 1) // case.stride + 1
        self.w_out = (case.width - 1) // case.stride + 1
        self.rows_out = n * self.h_out * self.w_out
        self.set_tiles(tiles or module.choose_tiles(case.c // case.groups, self.rows_out,
                                                    dtype != torch.float32, module.INTERPRETED))

    def set_tiles(self, tiles):
        """Weights packed for `tiles`, and the input, bias and output in the slot layout the
        kernel reads and writes for them (each chunk of groups in an 8-aligned slot, zero
        padding; the output NaN until written)."""
        self.tiles = tiles
        c = self.case
        cols, self.width = self.module.slot_layout(c.c, c.groups, tiles)
        self.cols = torch.from_numpy(cols).to(self.rows.device)
        packed = self.module.pack_weights(self.w_folded.double().cpu().numpy(), c.groups, tiles)
        self.packed = torch.from_numpy(packed).to(device=self.rows.device, dtype=self.rows.dtype)
        self.slot_rows = torch.zeros((self.rows.shape[0], self.width), device=self.rows.device,
                                     dtype=self.rows.dtype)
        self.slot_rows[:, self.cols] = self.rows
        self.slot_bias = torch.zeros(self.width, device=self.rows.device, dtype=torch.float32)
        self.slot_bias[self.cols] = self.bias.float()
        self.slot_out = nan_like((self.rows_out, self.width), self.rows.device, self.dtype)

    def fused(self):
        c = self.case
        self.module.grouped_conv3x3_forward(self.slot_rows, self.packed, self.slot_bias,
                                            self.slot_out, images=self.n, h=c.hw, w=c.width,
                                            c=c.c, groups=c.groups, stride=c.stride,
                                            ldx=self.width, ldo=self.width, tiles=self.tiles)

    def tiles_label(self):
        t = self.tiles
        return f"p{t.block_p} c{t.block_c} w{t.num_warps}"

    def unfused(self, dtype, x=None):
        """cuDNN conv + BN + ReLU (NCHW) at `dtype`, as rows."""
        x = self.x if x is None else x
        y = conv_unfused(x.to(dtype), self.weight.to(dtype), self.bn, self.case.stride,
                         self.case.groups)
        return y.permute(0, 2, 3, 1).reshape(-1, self.case.c)

    def cudnn_baselines(self):
        """{name: fn}: cuDNN conv + BN + ReLU on NCHW and channels_last input, and the conv with
        the BN folded into weight and bias + ReLU in both layouts (what a careful torch user
        runs). The target compares against the fastest."""
        c, dt = self.case, self.dtype
        x_cl = self.x.contiguous(memory_format=torch.channels_last)
        w = self.weight.to(dt)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        wf, bias = self.w_folded.to(dt), self.bias.to(dt)
        wf_cl = wf.contiguous(memory_format=torch.channels_last)
        conv = torch.nn.functional.conv2d

        def folded(x, w_):
            return lambda: torch.relu_(conv(x, w_, bias, stride=c.stride, padding=1,
                                            groups=c.groups))
        return {"nchw": lambda: conv_unfused(self.x, w, self.bn, c.stride, c.groups),
                "channels_last": lambda: conv_unfused(x_cl, w_cl, self.bn, c.stride, c.groups),
                "folded nchw": folded(self.x, wf), "folded channels_last": folded(x_cl, wf_cl)}

    def bytes_moved(self):
        return (self.slot_rows.numel() + self.slot_out.numel()) * self.rows.element_size()

    def check(self):
        self.slot_out.fill_(float("nan"))
        self.fused()
        dn = dtype_name(self.dtype)
        return compare(self.slot_out[:, self.cols], self.unfused(torch.float64),
                       self.unfused(self.dtype), dn)


# =================================================================================================
# Steps
# =================================================================================================


def run_correctness(report, ctx, gemms, convs, dtype, n, until):
    """Each case at dtype and batch n against float64; `until`: the time (monotonic) past
    which no new case starts."""
    gen = torch.Generator().manual_seed(8)
    section = "nhwc correctness"
    jobs = [("nhwc grouped conv", c) for c in convs] + [("nhwc 1x1", c) for c in gemms]
    dn = dtype_name(dtype)
    for i, (op, case) in enumerate(jobs):
        if ctx.over(until):
            report.note(f"nhwc correctness {dn}: step budget reached, {len(jobs) - i} of "
                        f"{len(jobs)} cases skipped")
            break

        def check(op=op, case=case):
            with exact_fp32():
                row = (GemmRun(ctx.gemm, case, n, dtype, ctx.device, gen).check()
                       if op == "nhwc 1x1" else
                       GroupedRun(ctx.grouped, case, n, dtype, ctx.device, gen).check())
            report.add(section, {"op": op, "case": case.label, "n": n, "dtype": dn,
                                 "form": getattr(case, "form", "eval"), **row})
        guarded(report, section, f"{op}/{case.label}/{dn}", check)
    rows = report.tables.get(section, [])
    report.info["nhwc correctness"] = f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} passed"


def time_grouped_convs(report, ctx, convs, batches, until):
    """fp16: the NHWC grouped conv (epilogue included) against the fastest cuDNN form (NCHW,
    channels_last, each with BN + ReLU or with the BN folded + ReLU); its bandwidth as % of the
    device copy. Kernel timings: graph replays, L2 flushed before each."""
    gen = torch.Generator().manual_seed(9)
    torch.backends.cudnn.benchmark = True  # the baselines get cuDNN's best algorithm
    for n in batches:
        for case in convs:
            if ctx.over(until):
                report.note("grouped conv timing: step budget reached, remaining shapes skipped")
                return
            run = GroupedRun(ctx.grouped, case, n, torch.float16, ctx.device, gen)
            row = {"case": case.label, "n": n, "C": case.c, "cin_g": case.c // case.groups,
                   "stride": case.stride, "hw": case.hw, "tiles": run.tiles_label()}
            baselines = {}
            for name, fn in run.cudnn_baselines().items():
                baselines[name] = row[f"cudnn {name} ms"] = timed(report, fn, kernel=True)
            measured = {k: v for k, v in baselines.items() if v}
            ms = row["nhwc ms"] = timed(report, run.fused, kernel=True)
            if measured:
                best = min(measured, key=measured.get)
                row["best cudnn"], row["best cudnn ms"] = best, measured[best]
                if ms:
                    row["speedup"] = measured[best] / ms
            if ms:
                gbs = run.bytes_moved() / (ms * 1e-3) / 1e9
                row["GBps"], row["%copy"] = gbs, 100 * gbs / ctx.copy_gbs
            report.add("nhwc grouped conv timing (fp16)", row)


def time_gemms(report, ctx, gemms, batches, until):
    """fp16: each GEMM form against a plain cuBLAS matmul of the same shape (the floor) and the
    torch sequence it replaces (GemmRun.torch_sequence); kernel timings as above."""
    gen = torch.Generator().manual_seed(10)
    for n in batches:
        for case in gemms:
            if ctx.over(until):
                report.note("GEMM timing: step budget reached, remaining shapes skipped")
                return
            run = GemmRun(ctx.gemm, case, n, torch.float16, ctx.device, gen)
            flops = 2 * run.rows * case.k * case.n
            row = {"case": case.label, "n": n, "M": run.rows, "K": case.k, "N": case.n}
            floor = row["cublas ms"] = timed(report, run.matmul_floor(), kernel=True)
            row["torch ms"] = timed(report, run.torch_sequence(), kernel=True)
            ms = row["nhwc ms"] = timed(report, run.fused, kernel=True)
            if ms:
                row["TFLOPs"] = flops / (ms * 1e-3) / 1e12
                if floor:
                    row["cublas TFLOPs"] = flops / (floor * 1e-3) / 1e12
                    row["of floor"] = floor / ms  # 1.0: as fast as the plain matmul
            report.add("nhwc 1x1 timing (fp16)", row)


def gemm_sweep_tiles(module, rows, gpu):
    """Tile choices (block_m, block_n, block_k, group_m, warps, stages) of the GEMM sweep: at
    batch 64 (thousands of rows) the shipped 128 x 128 x 32 and its K-step, aspect and size
    variants; at batch 1 (49-196 rows) small-M tiles."""
    if rows >= 4096:
        choices = [(128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 64, 32, 8, 4, 3),
                   (64, 128, 32, 8, 4, 3), (128, 256, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4)]
    else:
        choices = [(64, 128, 32, 8, 4, 3), (64, 64, 64, 8, 4, 3), (32, 64, 64, 8, 4, 3),
                   (32, 128, 64, 8, 4, 3), (16, 64, 128, 8, 4, 3)]
    return [module.Tiles(*t) for t in (choices if gpu else choices[:1])]


def grouped_sweep_tiles(module, cin_g, gpu):
    """Positions a program x lanes (the narrowest that holds a group, and twice it) x warps."""
    base = module.chunk_lanes(cin_g)[0]
    positions, warps = ((32, 64, 128, 256), (4, 8)) if gpu else ((64,), (4,))
    return [module.Tiles(p, c, c // cin_g, w, 2) for c in sorted({base, min(64, 2 * base)})
            for p in positions for w in warps]


def _tiles_name(t):
    if hasattr(t, "block_m"):
        return f"m{t.block_m}n{t.block_n}k{t.block_k} w{t.num_warps} s{t.num_stages}"
    return f"p{t.block_p} c{t.block_c} w{t.num_warps}"


def sweep(report, ctx, gemms, convs, batches, until):
    """fp16: the shipped tiles (choose_tiles') and the sweep's choices side by side, each checked
    against float64 first (`<choice> ok`), then timed; `best` is the fastest correct choice and
    `best x` its speed-up over the shipped tiles: the data for the kernels' tile tables. A
    choice that fails to compile or run is a row entry `<choice> error`."""
    gen = torch.Generator().manual_seed(11)
    jobs = [(n, c) for n in batches for c in convs] + [(n, g) for n in batches for g in gemms]
    for n, case in jobs:
        if ctx.over(until):
            report.note("tile sweep: step budget reached, remaining shapes skipped")
            return
        if isinstance(case, GemmCase):
            run = GemmRun(ctx.gemm, case, n, torch.float16, ctx.device, gen)
            shipped = ctx.gemm.choose_tiles(run.rows, case.k, case.n, True, ctx.gemm.INTERPRETED)
            choices = gemm_sweep_tiles(ctx.gemm, run.rows, ctx.gpu)
            row = {"case": case.label, "n": n, "M": run.rows, "K": case.k, "N": case.n}
            section = "nhwc 1x1 tile sweep (fp16)"

            def check(t, run=run):
                return run.check(t)["ok"]

            def launcher(t, run=run):
                return lambda: run.fused(t)
        else:
            cin_g = case.c // case.groups
            run = GroupedRun(ctx.grouped, case, n, torch.float16, ctx.device, gen)
            shipped = run.tiles
            choices = grouped_sweep_tiles(ctx.grouped, cin_g, ctx.gpu)
            row = {"case": case.label, "n": n, "cin_g": cin_g}
            section = "nhwc grouped conv tile sweep (fp16)"

            def check(t, run=run):
                run.set_tiles(t)
                return run.check()["ok"]

            def launcher(t, run=run):
                return run.fused
        row["shipped"] = _tiles_name(shipped)
        times = {}
        for tiles in [shipped] + [t for t in choices if t != shipped]:
            name = _tiles_name(tiles)
            try:
                ok = row[f"{name} ok"] = check(tiles)
                ms = row[f"{name} ms"] = timed(report, launcher(tiles), kernel=True)
            except Exception as e:  # noqa: BLE001 - e.g. a tile that needs too much shared memory
                row[f"{name} error"] = f"{type(e).__name__}: {e}"[:120]
                continue
            if ok and ms:
                times[name] = ms
        if times:
            best = row["best"] = min(times, key=times.get)
            shipped_ms = times.get(row["shipped"])
            row["best x"] = shipped_ms / times[best] if shipped_ms else None
        report.add(section, row)


def warm_jobs(ctx, gemms, convs, sweep_gemms, sweep_convs, batches, sweep_batches):
    """Every launch configuration the kernel steps will compile, as (label, fn) to run once
    each by the warm-up workers: the same shapes, dtypes and tiles, hence the same Triton
    specialisations. In the order the steps need them: fp16 correctness (batch 2), the
    timings, the sweep, then the other dtypes' correctness."""
    gen = torch.Generator().manual_seed(12)

    def conv(case, n, dtype, tiles=None):
        return (f"conv {case.label} {dtype_name(dtype)} n={n} {tiles or 'shipped tiles'}",
                lambda: GroupedRun(ctx.grouped, case, n, dtype, ctx.device, gen, tiles).fused())

    def gemm(case, n, dtype, tiles=None):
        return (f"gemm {case.label} {dtype_name(dtype)} n={n} {tiles or 'shipped tiles'}",
                lambda: GemmRun(ctx.gemm, case, n, dtype, ctx.device, gen).fused(tiles))

    def correctness(dtype):
        return [conv(c, 2, dtype) for c in convs] + [gemm(g, 2, dtype) for g in gemms]
    fp16 = torch.float16
    jobs = correctness(fp16)
    for n in batches:
        jobs += [conv(c, n, fp16) for c in convs] + [gemm(g, n, fp16) for g in gemms]
    for n in sweep_batches:
        for case in sweep_convs:
            jobs += [conv(case, n, fp16, t)
                     for t in grouped_sweep_tiles(ctx.grouped, case.c // case.groups, ctx.gpu)]
        for case in sweep_gemms:
            rows = n * ((case.hw - 1) // case.stride + 1) ** 2
            jobs += [gemm(case, n, fp16, t) for t in gemm_sweep_tiles(ctx.gemm, rows, ctx.gpu)]
    for dtype in ctx.dtypes:
        if dtype != fp16:
            jobs += correctness(dtype)
    return jobs
