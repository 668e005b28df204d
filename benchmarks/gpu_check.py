#!/usr/bin/env python3
"""One-command GPU check of dpn_fast's kernels for a GPU machine WITHOUT Paddle (torch is the host).

    python3 benchmarks/gpu_check.py --out DIR [--quick]     # on the GPU machine, < 6 minutes
    python3 benchmarks/gpu_check.py --out DIR --dry-run     # CPU: everything a CPU can run

Stages (each recorded on its own; one failing never stops the others; a global time budget skips
what is left, with a note, so the run always ends with a report):
  build      the Paddle-free CMake target `dpn_fast_kernels` for the local card, loaded with ctypes
  nhwc-*     the channels-last kernels (dpn_fast/kernels/nhwc_*.py): correctness, timing, tile
             sweep
  correct    every kernel and backend (CUDA C ABI, Triton) vs a float64 torch reference at DPN92's
             shapes, fp32/fp16/bf16, forward and backward, NaN-poisoned outputs; passes when
             max|fused - ref64| <= 2 * max|plain torch at that dtype - ref64|
                                   + atol * max(1, |ref64|)
  sanitize   compute-sanitizer memcheck of small cases (this script re-run with --sanitize-case)
  kernels    CUDA-event timings of each fused kernel vs the unfused torch sequence, batch 1/8/64
  e2e        timm dpn92 on the fused kernels (dpn_fast.torch's channels-last forward) vs timm
             eager and torch.compile
Writes DIR/gpu_check.json and DIR/gpu_check.md. Details: docs/gpu_check.md.

The kernels and the torch host are this checkout's (dpn_fast.kernels, dpn_fast.torch), imported
without Paddle even where it is installed. Everything op-specific lives in the OP ADAPTERS section
below (ctypes signatures, Triton launcher calls, torch reference implementations); the rest of the
script is op-agnostic plumbing.
"""
import argparse
import contextlib
import copy
import ctypes
import faulthandler
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # as tests/utils.py
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}     # dpn_fast::DType (csrc/common.h)
EPS_OF = {"float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.9e-3}
BN_EPS = 1e-3  # timm's DPN BatchNorm epsilon
# Share of the time budget by which each phase stops starting new work (the rest is skipped with
# a note). torch.compile goes last: it starts only while COMPILE_MIN_LEFT_S seconds remain.
# The NHWC stages run first (the NCHW stages' shares are narrow: a run with every stage needs a
# larger --budget-s). The NHWC correctness share
# also covers a slow build before it (the dry run's CUDA build takes ~40 s here).
PHASE_END = {"nhwc correctness": 0.22, "nhwc kernels": 0.34, "nhwc sweep": 0.44,
             "correctness": 0.60, "convs": 0.66, "kernels": 0.70, "sweep": 0.74, "e2e": 0.86}
COMPILE_MIN_LEFT_S = 75
E2E_SECTION = "e2e timing (timm dpn92, 224x224)"

torch = F = None  # imported in main(), after TRITON_INTERPRET is settled


def log(msg):
    print(msg, flush=True)


def import_checkout_dpn_fast():
    """Puts this checkout's dpn_fast first on the path, with Paddle hidden as on a GPU machine
    without it: with Paddle, `import dpn_fast` loads the op library, which a checkout lacks."""
    sys.modules.setdefault("paddle", None)
    sys.path.insert(0, str(REPO))


# =================================================================================================
# Report: stages, rows, notes, time budget
# =================================================================================================


class Report:
    def __init__(self, out_dir, budget_s):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.info = {}
        self.tables = {}   # section -> list of row dicts
        self.notes = []
        self.errors = []   # (stage, traceback)
        self.stage_times = {}

    def left(self):
        return self.deadline - time.monotonic()

    def past(self, fraction):
        """True once `fraction` of the budget is spent (each phase has its share)."""
        return time.monotonic() - self.start > fraction * (self.deadline - self.start)

    def out_of_time(self, reserve_s=0.0):
        return self.left() < reserve_s

    @contextlib.contextmanager
    def stage(self, name):
        log(f"== {name} (t={time.monotonic() - self.start:.0f}s, {self.left():.0f}s left)")
        t0 = time.monotonic()
        try:
            yield
        except Exception:
            tb = traceback.format_exc()
            self.errors.append((name, tb))
            log(f"!! {name} failed:\n{tb}")
        finally:
            self.stage_times[name] = round(time.monotonic() - t0, 1)
            self.write()  # a partial report survives a later crash or kill

    def add(self, section, row):
        self.tables.setdefault(section, []).append(row)
        log("   " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))

    def note(self, text):
        self.notes.append(text)
        log(f"   note: {text}")

    def write(self):
        data = {"info": self.info, "stage_seconds": self.stage_times, "tables": self.tables,
                "notes": self.notes,
                "errors": [{"stage": s, "traceback": t} for s, t in self.errors]}
        (self.out_dir / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
        lines = ["# dpn_fast GPU check", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in self.info.items()]
        lines += [f"- stage seconds: {self.stage_times}", ""]
        for section, rows in self.tables.items():
            if section == "correctness":  # thousands of rows: their summary (all are in the JSON)
                section, rows = "correctness (summary; every check in gpu_check.json)", \
                    _correctness_summary(rows)
            lines += [f"## {section}", "", *_markdown_table(rows), ""]
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.errors:
            lines += ["## Errors", ""]
            for stage, tb in self.errors:
                lines += [f"### {stage}", "```", tb.rstrip(), "```", ""]
        (self.out_dir / "gpu_check.md").write_text("\n".join(lines))


def _correctness_summary(rows):
    """One row per (op, backend, dtype, pass): checks, passed, and the worst err / bound."""
    groups = {}
    for r in rows:
        key = tuple(r.get(k, "") for k in ("op", "backend", "dtype", "pass"))
        groups.setdefault(key, []).append(r)
    out = []
    for (op, backend, dtype, pass_name), group in groups.items():
        ratios = [r["err"] / r["bound"] for r in group if r.get("bound")]
        out.append({"op": op or "(error)", "backend": backend, "dtype": dtype, "pass": pass_name,
                    "checks": len(group), "passed": sum(bool(r.get("ok")) for r in group),
                    "worst err/bound": max(ratios) if ratios else None})
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def _markdown_table(rows):
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    def cell(v):
        return _fmt(v).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    return out


# =================================================================================================
# DPN92 shapes (dpn_fast/models/config.py)
# =================================================================================================


@dataclass(frozen=True)
class MergeCase:
    label: str
    r: int       # residual channels
    d: int       # dense channels in
    inc: int     # dense channels added (0: head-only form, no y)
    hw: int      # spatial side (H == W)
    acts: int    # BN+ReLU outputs (heads of the next block: 2 before a projection block)


@dataclass(frozen=True)
class ConvCase:
    label: str
    c: int
    groups: int
    stride: int
    hw: int      # input height (and width unless `w` is given)
    w: int = 0   # input width of a non-square case

    @property
    def width(self):
        return self.w or self.hw


def dpn92_cases():
    # Loaded by its path: config.py is plain Python, but dpn_fast.models' __init__ imports Paddle.
    spec = importlib.util.spec_from_file_location("dpn_fast_models_config",
                                                  REPO / "dpn_fast" / "models" / "config.py")
    config = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = config  # dataclasses look their module up while the class is built
    spec.loader.exec_module(config)
    blocks = config.block_shapes("DPN92")
    first = blocks[0]
    merges = {(first.in_dense, 0, 0, first.in_hw, 2): MergeCase("stem-head", first.in_dense, 0, 0,
                                                                first.in_hw, 2)}
    convs = {}
    for i, b in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        acts = 0 if nxt is None else (1 if nxt.kind == "normal" else 2)
        key = (b.resid, b.dense_before, b.inc, b.out_hw, acts)
        merges.setdefault(key, MergeCase(f"s{b.stage}b{b.index}", *key))
        ckey = (b.bottleneck, b.groups, b.stride, b.in_hw)
        convs.setdefault(ckey, ConvCase(f"s{b.stage}-{b.kind}", *ckey))
    return list(merges.values()), list(convs.values()), nhwc_gemm_cases(blocks)


def representative(merges):
    """Per stage the first and last merge (timing and --quick use these)."""
    by_stage = {}
    for m in merges:
        by_stage.setdefault(m.label.split("b")[0], []).append(m)
    keep = []
    for group in by_stage.values():
        keep += [group[0]] if len(group) == 1 else [group[0], group[-1]]
    return keep


# =================================================================================================
# OP ADAPTERS. The only op-specific code: C ABI signatures (csrc/<op>.h), Triton launcher calls
# (dpn_fast.kernels.<op>) and torch reference implementations. Every adapter has the same methods as
# the op's Triton launchers: tensors (outputs preallocated) plus plain ints.
# =================================================================================================

def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def _dtype_code(t):
    return DTYPE_CODES[str(t.dtype).replace("torch.", "")]


def _bind(lib, symbols, signatures):
    """{method: ctypes function} for the symbols the library exports."""
    fns = {}
    for method, symbol in symbols.items():
        if hasattr(lib, symbol):
            fn = getattr(lib, symbol)
            fn.argtypes, fn.restype = signatures[method], ctypes.c_int
            fns[method] = fn
    return fns


def _check_status(name, status):
    if status != 0:
        raise RuntimeError(f"{name} returned dpn_fast::Status {status}")


# ---- dual_path_merge: csrc/dual_path_merge.h, dpn_fast/kernels/dual_path_merge.py ----------------
# forward(resid, dense, y|None, scale|None, shift|None, resid_out|None, dense_out|None, act|None,
#         n, r, d, inc, hw, num_acts[, dense_capacity]); scale/shift fp32 [A, C];
#         act [A, n, C, H, W]; C = r + d + inc. dense_capacity > 0 (backends with has("buffer")):
#         stage-buffer form, dense is dense_out, a [n, dense_capacity] buffer whose first d
#         channels are read and whose channels d .. d + inc get y's dense part.
# backward(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift, g_resid, g_dense,
#          g_y|None, n, r, d, inc, hw, num_acts)

MAX_ACTS = 2


class ChannelAffine(ctypes.Structure):
    """dpn_fast::ChannelAffine (csrc/dual_path_merge.h); var == nullptr: scale/shift are folded."""
    _fields_ = [("num_acts", ctypes.c_int),
                ("scale", ctypes.c_void_p * MAX_ACTS), ("shift", ctypes.c_void_p * MAX_ACTS),
                ("mean", ctypes.c_void_p * MAX_ACTS), ("var", ctypes.c_void_p * MAX_ACTS),
                ("eps", ctypes.c_float * MAX_ACTS)]


def _folded_affine(scale, shift, num_acts):
    if not num_acts:
        return None
    affine = ChannelAffine(num_acts=num_acts)
    for a in range(num_acts):
        affine.scale[a] = scale[a].data_ptr()
        affine.shift[a] = shift[a].data_ptr()
    return ctypes.byref(affine)


def _planes(act, num_acts):
    return (ctypes.c_void_p * MAX_ACTS)(*[act[a].data_ptr() if a < num_acts else None
                                          for a in range(MAX_ACTS)])


MERGE_SYMBOLS = {"forward": "dpn_fast_dual_path_merge_forward_cuda",
                 "backward": "dpn_fast_dual_path_merge_backward_cuda"}


class MergeCuda:
    name = "cuda"

    def __init__(self, lib):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        shape = [i64] * 5 + [ctypes.c_int, p]  # n, r, d, inc, hw, dtype, stream
        affine, planes = ctypes.POINTER(ChannelAffine), ctypes.POINTER(p)
        signatures = {"forward": [p, p, p, affine, p, p, planes] + shape[:5] + [i64] + shape[5:],
                      "backward": [p, p, p, p, planes, affine, p, p, p] + shape}
        self.fns = _bind(lib, MERGE_SYMBOLS, signatures)
        self.fwd, self.bwd = self.fns.get("forward"), self.fns.get("backward")

    def has(self, method):
        return method in self.fns or (method == "buffer" and "forward" in self.fns)

    def forward(self, resid, dense, y, scale, shift, resid_out, dense_out, act, n, r, d, inc, hw,
                num_acts, dense_capacity=0):
        status = self.fwd(_ptr(resid), _ptr(dense), _ptr(y), _folded_affine(scale, shift, num_acts),
                          _ptr(resid_out), _ptr(dense_out),
                          _planes(act, num_acts) if num_acts else None,
                          n, r, d, inc, hw, dense_capacity, _dtype_code(resid), _stream())
        _check_status("dpn_fast_dual_path_merge_forward_cuda", status)

    def backward(self, x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift, g_resid,
                 g_dense, g_y, n, r, d, inc, hw, num_acts):
        status = self.bwd(_ptr(x_resid), _ptr(x_dense), _ptr(g_resid_out), _ptr(g_dense_out),
                          _planes(g_act, num_acts) if num_acts else None,
                          _folded_affine(scale, shift, num_acts), _ptr(g_resid), _ptr(g_dense),
                          _ptr(g_y), n, r, d, inc, hw, _dtype_code(g_resid), _stream())
        _check_status("dpn_fast_dual_path_merge_backward_cuda", status)


class MergeTriton:
    name = "triton"

    def __init__(self, module):
        self.module = module

    @staticmethod
    def has(method):
        return method in MERGE_SYMBOLS

    def forward(self, *args):
        self.module.merge_forward(*args)

    def backward(self, *args):
        self.module.merge_backward(*args)


class MergeTorch:
    """The fused op's maths in plain torch (reference; also the dry run's stand-in for kernels)."""
    name = "torch"

    @staticmethod
    def has(method):
        return method in MERGE_SYMBOLS or method == "buffer"

    def forward(self, resid, dense, y, scale, shift, resid_out, dense_out, act, n, r, d, inc, hw,
                num_acts, dense_capacity=0):
        if y is not None:
            resid_out.copy_(resid + y[:, :r])
            if dense_capacity:  # stage buffer: dense is dense_out; append y's dense part
                dense_out[:, d:d + inc].copy_(y[:, r:])
            else:
                dense_out.copy_(torch.cat([dense[:, :d], y[:, r:]], 1))
            x = torch.cat([resid_out, dense_out[:, :d + inc]], 1)
        else:
            x = torch.cat([resid, dense[:, :d]], 1)
        for a in range(num_acts):
            z = x.float() * scale[a].view(1, -1, 1, 1) + shift[a].view(1, -1, 1, 1)
            act[a].copy_(z.clamp_min(0.0))

    def backward(self, x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift, g_resid,
                 g_dense, g_y, n, r, d, inc, hw, num_acts):
        if g_resid_out is not None:
            g = torch.cat([g_resid_out, g_dense_out], 1).float()
        else:
            g = torch.zeros((n, r + d + inc, *g_resid.shape[2:]), device=g_resid.device)
        if num_acts:
            x = torch.cat([x_resid, x_dense], 1).float()
            for a in range(num_acts):
                s, t = scale[a].view(1, -1, 1, 1), shift[a].view(1, -1, 1, 1)
                g = g + torch.where(x * s + t > 0, g_act[a].float() * s, 0.0)
        g_resid.copy_(g[:, :r])
        g_dense.copy_(g[:, r:r + d])
        if g_y is not None:
            g_y.copy_(torch.cat([g[:, :r], g[:, r + d:]], 1))


# ---- grouped_conv_bn_relu: csrc/grouped_conv_bn_relu.h, dpn_fast/kernels/grouped_conv_bn_relu.py
# Eval, BN folded by the caller: forward(x, w, bias, out, n, c, h, w_in, c_out, groups, stride):
#   out = relu(grouped_conv3x3(x, w, stride, padding 1) + bias); w = weight(w_folded_fp32, dtype)
#   in the form the backend takes (CUDA: the activation dtype; Triton: fp32), bias fp32.
# Eval with the input's BN + ReLU as a prologue (c3x3_b's BN in DPN):
#   state = prepare_prologue(w, in_bn, bn, dtype) once; prologue(state, x, out, n, c, h, w_in,
#   c_out, groups, stride): out = relu(bn(conv(relu(in_bn(x))))); w fp32 [c_out, c/groups, 3, 3],
#   in_bn/bn BatchNormParams (fp32).
# CUDA only: forward_bn (eval, BN folded on the device into fp32 workspaces), train (batch-stat
# BN, running stats updated in place) and bn_relu_backward (of relu(bn(y)) with batch stats).

CONV_SYMBOLS = {"forward": "dpn_fast_grouped_conv_bias_relu_cuda",
                "forward_bn": "dpn_fast_grouped_conv_bn_relu_infer_cuda",
                "prologue": "dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda",
                "train": "dpn_fast_grouped_conv_bn_relu_train_cuda",
                "bn_relu_backward": "dpn_fast_bn_relu_train_backward_cuda"}


class ConvCuda:
    name = "cuda"

    def __init__(self, lib):
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        shape = [i64] * 7 + [i32, p]  # n, c, h, w, c_out, groups, stride, dtype, stream
        signatures = {"forward": [p] * 4 + shape,
                      "forward_bn": [p] * 6 + [f32] + [p] * 3 + shape,
                      "prologue": [p] * 6 + [f32] + [p] * 4 + [f32] + [p] * 4 + shape,
                      "train": [p] * 6 + [f32, f32] + [p] * 4 + shape,
                      "bn_relu_backward": [p] * 10 + [i64] * 3 + [i32, p]}
        self.fns = _bind(lib, CONV_SYMBOLS, signatures)

    def has(self, method):
        return method in self.fns

    def _call(self, method, *args):
        _check_status(CONV_SYMBOLS[method], self.fns[method](*args))

    @staticmethod
    def weight(w_folded, dtype):
        return w_folded.to(dtype).contiguous()

    def forward(self, x, w, bias, out, n, c, h, w_in, c_out, groups, stride):
        self._call("forward", _ptr(x), _ptr(w), _ptr(bias), _ptr(out), n, c, h, w_in, c_out, groups,
                   stride, _dtype_code(x), _stream())

    def forward_bn(self, x, w, gamma, beta, mean, var, eps, w_ws, bias_ws, out, n, c, h, w_in,
                   c_out, groups, stride):
        self._call("forward_bn", _ptr(x), _ptr(w), _ptr(gamma), _ptr(beta), _ptr(mean), _ptr(var),
                   eps, _ptr(w_ws), _ptr(bias_ws), _ptr(out), n, c, h, w_in, c_out, groups, stride,
                   _dtype_code(x), _stream())

    @staticmethod
    def prepare_prologue(w, in_bn, bn, dtype):
        """Raw weights and BNs: the launcher folds both on the device into fp32 workspaces."""
        c = in_bn.weight.numel()
        return {"w": w.to(dtype).contiguous(), "in_bn": in_bn.float(), "bn": bn.float(),
                "in_scale_shift": torch.empty((2, c), device=w.device),
                "w_folded": torch.empty(w.shape, device=w.device),
                "bias": torch.empty((w.shape[0],), device=w.device)}

    def prologue(self, state, x, out, n, c, h, w_in, c_out, groups, stride):
        i, o = state["in_bn"], state["bn"]
        self._call("prologue", _ptr(x), _ptr(state["w"]), _ptr(i.weight), _ptr(i.bias),
                   _ptr(i.mean), _ptr(i.var), i.eps, _ptr(o.weight), _ptr(o.bias), _ptr(o.mean),
                   _ptr(o.var), o.eps, _ptr(state["in_scale_shift"]), _ptr(state["w_folded"]),
                   _ptr(state["bias"]), _ptr(out), n, c, h, w_in, c_out, groups, stride,
                   _dtype_code(x), _stream())

    def train(self, x, w, gamma, beta, running_mean, running_var, eps, momentum, y, out,
              saved_mean, saved_invstd, n, c, h, w_in, c_out, groups, stride):
        self._call("train", _ptr(x), _ptr(w), _ptr(gamma), _ptr(beta), _ptr(running_mean),
                   _ptr(running_var), eps, momentum, _ptr(y), _ptr(out), _ptr(saved_mean),
                   _ptr(saved_invstd), n, c, h, w_in, c_out, groups, stride, _dtype_code(x),
                   _stream())

    def bn_relu_backward(self, y, out, dout, gamma, saved_mean, saved_invstd, dy, dgamma, dbeta,
                         n, c, hw):
        shift_slope = nan_like((2, c), y.device, torch.float32)
        self._call("bn_relu_backward", _ptr(y), _ptr(out), _ptr(dout), _ptr(gamma),
                   _ptr(saved_mean), _ptr(saved_invstd), _ptr(dy), _ptr(dgamma), _ptr(dbeta),
                   _ptr(shift_slope), n, c, hw, _dtype_code(y), _stream())


def _folded_prologue(w, in_bn, bn):
    """fp32 (w * scale, bias) of bn and (scale, shift) of in_bn, folded in float64."""
    scale, shift = bn.folded()
    w_folded = (w.double() * scale.double().view(-1, 1, 1, 1)).float().contiguous()
    in_scale, in_shift = in_bn.folded()
    return {"w_folded": w_folded, "bias": shift.contiguous(), "in_scale": in_scale.contiguous(),
            "in_shift": in_shift.contiguous()}


class ConvTriton:
    name = "triton"

    def __init__(self, module):
        self.module = module

    @staticmethod
    def has(method):
        return method in ("forward", "prologue")

    @staticmethod
    def weight(w_folded, dtype):
        return w_folded.contiguous()

    def forward(self, *args):
        self.module.grouped_conv_bias_relu_forward(*args)

    @staticmethod
    def prepare_prologue(w, in_bn, bn, dtype):
        return _folded_prologue(w, in_bn, bn)

    def prologue(self, state, x, out, n, c, h, w_in, c_out, groups, stride):
        self.module.grouped_conv_bias_relu_forward(
            x, state["w_folded"], state["bias"], out, n, c, h, w_in, c_out, groups, stride,
            in_scale=state["in_scale"], in_shift=state["in_shift"])


class ConvTorch:
    """The CUDA launchers' maths in plain torch (reference; the dry run's stand-in)."""
    name = "torch"

    @staticmethod
    def has(method):
        return method in CONV_SYMBOLS

    @staticmethod
    def weight(w_folded, dtype):
        return w_folded.to(dtype).contiguous()

    def forward(self, x, w, bias, out, n, c, h, w_in, c_out, groups, stride):
        y = F.conv2d(x, w, bias.to(x.dtype), stride=stride, padding=1, groups=groups)
        out.copy_(torch.relu_(y))

    @staticmethod
    def prepare_prologue(w, in_bn, bn, dtype):
        state = _folded_prologue(w, in_bn, bn)
        state["w_folded"] = state["w_folded"].to(dtype)
        return state

    def prologue(self, state, x, out, n, c, h, w_in, c_out, groups, stride):
        xp = torch.relu(x.float() * state["in_scale"].view(1, -1, 1, 1)
                        + state["in_shift"].view(1, -1, 1, 1)).to(x.dtype)
        self.forward(xp, state["w_folded"], state["bias"], out, n, c, h, w_in, c_out, groups,
                     stride)

    def forward_bn(self, x, w, gamma, beta, mean, var, eps, w_ws, bias_ws, out, n, c, h, w_in,
                   c_out, groups, stride):
        scale = gamma / torch.sqrt(var + eps)
        w_ws.copy_(w.float() * scale.view(-1, 1, 1, 1))
        bias_ws.copy_(beta - mean * scale)
        self.forward(x, w_ws.to(x.dtype), bias_ws, out, n, c, h, w_in, c_out, groups, stride)

    def train(self, x, w, gamma, beta, running_mean, running_var, eps, momentum, y, out,
              saved_mean, saved_invstd, n, c, h, w_in, c_out, groups, stride):
        y.copy_(F.conv2d(x, w, stride=stride, padding=1, groups=groups))
        stats = bn_train_reference(y.float(), BatchNormParams(gamma, beta, running_mean,
                                                              running_var, eps), momentum)
        out.copy_(stats["out"])
        for name, t in (("saved_mean", saved_mean), ("saved_invstd", saved_invstd),
                        ("running_mean", running_mean), ("running_var", running_var)):
            t.copy_(stats[name])

    def bn_relu_backward(self, y, out, dout, gamma, saved_mean, saved_invstd, dy, dgamma, dbeta,
                         n, c, hw):
        # Centred on the exact batch mean, as the launcher is (saved_mean plus an offset): in
        # float64, which holds that mean where float32 may not.
        y64 = y.double()
        g = bn_relu_backward_reference(y64, out, dout.double(), gamma, y64.mean((0, 2, 3)),
                                       saved_invstd)
        dy.copy_(g["dy"])
        dgamma.copy_(g["dgamma"])
        dbeta.copy_(g["dbeta"])


SMALL_MERGES = [MergeCase("odd", 8, 5, 3, 7, 2), MergeCase("vec", 16, 8, 8, 8, 1),
                MergeCase("plain", 8, 4, 4, 5, 0), MergeCase("head", 12, 0, 0, 6, 2)]
SMALL_CONVS = [ConvCase("s1", 64, 32, 1, 9), ConvCase("s2", 64, 32, 2, 9),
               ConvCase("g3", 96, 32, 1, 5), ConvCase("odd-s2", 40, 8, 2, 7, w=5),
               ConvCase("odd-s1", 15, 5, 1, 6, w=13)]


def TORCH_ONLY():  # noqa: N802 - a constant that needs torch imported
    return {"merge": [MergeTorch()], "conv": [ConvTorch()]}


def make_backends(lib, device):
    """{"merge": [adapters], "conv": [adapters]}: every backend this machine can run."""
    from dpn_fast.kernels import dual_path_merge, grouped_conv_bn_relu
    backends = {"merge": [], "conv": []}
    if lib is not None and device == "cuda":
        merge = MergeCuda(lib)
        if merge.has("forward"):
            backends["merge"].append(merge)
        conv = ConvCuda(lib)
        if conv.has("forward"):
            backends["conv"].append(conv)
    backends["merge"].append(MergeTriton(dual_path_merge))
    backends["conv"].append(ConvTriton(grouped_conv_bn_relu))
    return backends


def probe_c_abi(lib):
    """Binds every C ABI symbol and calls each with an invalid dtype: it must answer
    kInvalidArgument before touching the device (so this also runs with no GPU)."""
    found = {}
    merge = MergeCuda(lib)
    for method, symbol in MERGE_SYMBOLS.items():
        if not merge.has(method):
            found[symbol] = "absent"
        elif method == "forward":
            found[symbol] = merge.fwd(None, None, None, None, None, None, None, 1, 1, 1, 1, 1, 0,
                                      99, None)
        else:
            found[symbol] = merge.bwd(None, None, None, None, None, None, None, None, None,
                                      1, 1, 1, 1, 1, 99, None)
    conv = ConvCuda(lib)
    dummy = {"forward": (None,) * 4, "forward_bn": (None,) * 6 + (1e-3,) + (None,) * 3,
             "train": (None,) * 6 + (1e-3, 0.9) + (None,) * 4,
             "prologue": (None,) * 6 + (1e-3,) + (None,) * 4 + (1e-3,) + (None,) * 4}
    for method, symbol in CONV_SYMBOLS.items():
        if not conv.has(method):
            found[symbol] = "absent"
        elif method == "bn_relu_backward":
            found[symbol] = conv.fns[method](*(None,) * 10, 1, 32, 16, 99, None)
        else:  # groups=32 with 32 channels: a valid shape, so the dtype is what is refused
            found[symbol] = conv.fns[method](*dummy[method], 1, 32, 4, 4, 32, 32, 1, 99, None)
    return found


# =================================================================================================
# Inputs and float64 / plain-dtype references (the unfused torch sequences)
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


def merge_unfused(resid, dense, y, bns):
    """slice / add / cat, then cat / BN / ReLU per head: the torch sequence the merge replaces."""
    if y is not None:
        r = resid.shape[1]
        resid_out, dense_out = resid + y[:, :r], torch.cat([dense, y[:, r:]], 1)
    else:
        resid_out, dense_out = resid, dense
    x = torch.cat([resid_out, dense_out], 1)
    return resid_out, dense_out, [bn.apply_relu(x) for bn in bns]


def conv_unfused(x, weight, bn, stride, groups):
    """cuDNN conv + BN + ReLU (the fused conv's baseline)."""
    return bn.apply_relu(F.conv2d(x, weight, stride=stride, padding=1, groups=groups))


def compare(actual, ref64, plain, dtype_name, ignore=None):
    """The project's rule: max|fused - ref64| <= 2 * max|plain - ref64| + atol * max(1, |ref64|)."""
    def err(t):
        diff = (t.double() - ref64).abs()
        if ignore is not None:
            diff = torch.where(ignore, 0.0, diff)
        return float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(actual).all())
    fused_err = err(actual) if finite else float("inf")
    plain_err = err(plain)
    bound = 2 * plain_err + ATOL[dtype_name] * max(1.0, float(ref64.abs().max()))
    return {"err": fused_err, "plain_err": plain_err, "bound": bound,
            "ok": finite and fused_err <= bound, "finite": finite}


# =================================================================================================
# Correctness
# =================================================================================================


def check_merge_case(backend, case, n, dtype, device, gen, report, section):
    dn = str(dtype).replace("torch.", "")
    r, d, inc, hw, acts = case.r, case.d, case.inc, case.hw, case.acts
    c = r + d + inc
    has_y = inc > 0
    resid = randn((n, r, hw, hw), gen, device, dtype)
    dense = randn((n, d, hw, hw), gen, device, dtype) if d else resid  # head-only: d == 0
    y = randn((n, r + inc, hw, hw), gen, device, dtype) if has_y else None
    bns = [random_bn(c, gen, device) for _ in range(acts)]
    folded = [bn.folded() for bn in bns]
    scale = torch.stack([s for s, _ in folded]) if acts else None
    shift = torch.stack([t for _, t in folded]) if acts else None
    resid_out = nan_like((n, r, hw, hw), device, dtype) if has_y else None
    dense_out = nan_like((n, d + inc, hw, hw), device, dtype) if has_y else None
    act = nan_like((acts, n, c, hw, hw), device, dtype) if acts else None
    dense_arg = dense if d else resid
    backend.forward(resid, dense_arg, y, scale, shift, resid_out, dense_out, act,
                    n, r, d, inc, hw * hw, acts)
    dense_in = dense if d else resid[:, :0]
    ref = merge_unfused(resid.double(), dense_in.double(), None if y is None else y.double(),
                        bns)
    plain = merge_unfused(resid, dense_in, y, bns)
    rows = []
    if has_y:
        rows += [("resid_out", resid_out, ref[0], plain[0]),
                 ("dense_out", dense_out, ref[1], plain[1])]
    rows += [(f"act{a}", act[a], ref[2][a], plain[2][a]) for a in range(acts)]
    for out_name, actual, ref64, plain_t in rows:
        report.add(section, {"op": "merge", "backend": backend.name, "case": case.label, "n": n,
                             "dtype": dn, "pass": "fwd", "out": out_name,
                             **compare(actual, ref64, plain_t, dn)})
    if has_y and backend.has("buffer"):
        # Stage-buffer form: dense channels live in a wider buffer; only d .. d + inc are written.
        capacity = d + inc + 3
        buffer = nan_like((n, capacity, hw, hw), device, dtype)
        buffer[:, :d] = dense[:, :d]
        resid_out_b = nan_like((n, r, hw, hw), device, dtype)
        act_b = nan_like((acts, n, c, hw, hw), device, dtype) if acts else None
        backend.forward(resid, buffer, y, scale, shift, resid_out_b, buffer, act_b,
                        n, r, d, inc, hw * hw, acts, capacity)
        rows = [("resid_out", resid_out_b, ref[0], plain[0]),
                ("dense_out", buffer[:, :d + inc], ref[1], plain[1])]
        rows += [(f"act{a}", act_b[a], ref[2][a], plain[2][a]) for a in range(acts)]
        for out_name, actual, ref64, plain_t in rows:
            report.add(section, {"op": "merge", "backend": backend.name, "case": case.label,
                                 "n": n, "dtype": dn, "pass": "fwd-buffer", "out": out_name,
                                 **compare(actual, ref64, plain_t, dn)})
        untouched = bool(torch.isnan(buffer[:, d + inc:]).all())
        report.add(section, {"op": "merge", "backend": backend.name, "case": case.label, "n": n,
                             "dtype": dn, "pass": "fwd-buffer", "out": "channels past d+inc",
                             "ok": untouched, "note": "must stay unwritten (NaN)"})

    if not has_y or not backend.has("backward"):
        return
    # Backward given the forward's (dtype) outputs: reference in float64 on the same inputs.
    x_resid, x_dense = (resid_out, dense_out) if acts else (None, None)
    g_resid_out = randn((n, r, hw, hw), gen, device, dtype)
    g_dense_out = randn((n, d + inc, hw, hw), gen, device, dtype)
    g_act = randn((acts, n, c, hw, hw), gen, device, dtype) if acts else None
    g_resid = nan_like((n, r, hw, hw), device, dtype)
    g_dense = nan_like((n, d, hw, hw), device, dtype)
    g_y = nan_like((n, r + inc, hw, hw), device, dtype)
    backend.backward(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift,
                     g_resid, g_dense, g_y, n, r, d, inc, hw * hw, acts)

    def grads(precision):
        g = torch.cat([g_resid_out, g_dense_out], 1).to(precision)
        ambiguous = torch.zeros_like(g, dtype=torch.bool)
        if acts:
            x = torch.cat([x_resid, x_dense], 1).to(precision)
            for a in range(acts):
                s = scale[a].to(precision).view(1, -1, 1, 1)
                t = shift[a].to(precision).view(1, -1, 1, 1)
                z = x * s + t
                g = g + torch.where(z > 0, g_act[a].to(precision) * s, 0.0)
                # ReLU's kink: where z is within the dtype's rounding of 0, either side is right.
                z64, xs = z.double(), (x.double() * s.double()).abs() + t.double().abs()
                ambiguous |= z64.abs() <= 8 * EPS_OF[dn] * xs
        return g, ambiguous

    g64, ambiguous = grads(torch.float64)
    g_plain, _ = grads(dtype)
    splits = {"g_resid": (g_resid, slice(0, r)), "g_dense": (g_dense, slice(r, r + d))}
    for out_name, (actual, sl) in splits.items():
        report.add(section, {"op": "merge", "backend": backend.name, "case": case.label, "n": n,
                             "dtype": dn, "pass": "bwd", "out": out_name,
                             **compare(actual, g64[:, sl], g_plain[:, sl], dn, ambiguous[:, sl])})
    cat_y = lambda g: torch.cat([g[:, :r], g[:, r + d:]], 1)  # noqa: E731
    report.add(section, {"op": "merge", "backend": backend.name, "case": case.label, "n": n,
                         "dtype": dn, "pass": "bwd", "out": "g_y",
                         **compare(g_y, cat_y(g64), cat_y(g_plain), dn, cat_y(ambiguous))})


def conv_inputs(case, n, dtype, device, gen):
    cin_per_group = case.c // case.groups
    x = randn((n, case.c, case.hw, case.width), gen, device, dtype)
    weight = randn((case.c, cin_per_group, 3, 3), gen, device, torch.float32,
                   scale=1.0 / math.sqrt(9 * cin_per_group))
    bn = random_bn(case.c, gen, device)
    scale, shift = bn.folded()
    w_folded = (weight.double() * scale.double().view(-1, 1, 1, 1)).float().contiguous()
    return x, weight, bn, w_folded, shift.contiguous()


def check_conv_case(backend, case, n, dtype, device, gen, report, section):
    dn = str(dtype).replace("torch.", "")
    x, weight, bn, w_folded, bias = conv_inputs(case, n, dtype, device, gen)
    c, groups, stride = case.c, case.groups, case.stride
    h_out, w_out = (case.hw - 1) // stride + 1, (case.width - 1) // stride + 1
    out_shape = (n, c, h_out, w_out)
    shape_args = (n, c, case.hw, case.width, c, groups, stride)

    def add(pass_name, out_name, actual, ref64, plain, ignore=None):
        report.add(section, {"op": "conv", "backend": backend.name, "case": case.label, "n": n,
                             "dtype": dn, "pass": pass_name, "out": out_name,
                             **compare(actual, ref64, plain, dn, ignore)})

    ref64 = conv_unfused(x.double(), weight.double(), bn, stride, groups)
    plain = conv_unfused(x, weight.to(dtype), bn, stride, groups)
    out = nan_like(out_shape, device, dtype)
    backend.forward(x, backend.weight(w_folded, dtype), bias, out, *shape_args)
    add("eval", "out", out, ref64, plain)
    if backend.has("forward_bn"):
        out = nan_like(out_shape, device, dtype)
        w_ws = nan_like(weight.shape, device, torch.float32)
        bias_ws = nan_like((c,), device, torch.float32)
        backend.forward_bn(x, weight.to(dtype), bn.weight, bn.bias, bn.mean, bn.var, bn.eps,
                           w_ws, bias_ws, out, *shape_args)
        add("eval-bn", "out", out, ref64, plain)
    if backend.has("prologue"):
        in_bn = random_bn(c, gen, device)
        state = backend.prepare_prologue(weight, in_bn, bn, dtype)
        out = nan_like(out_shape, device, dtype)
        backend.prologue(state, x, out, *shape_args)
        ref64_p = conv_unfused(in_bn.apply_relu(x.double()), weight.double(), bn, stride, groups)
        plain_p = conv_unfused(in_bn.apply_relu(x), weight.to(dtype), bn, stride, groups)
        add("eval-prologue", "out", out, ref64_p, plain_p)
    if backend.has("train"):
        momentum = 0.9
        y, out = nan_like(out_shape, device, dtype), nan_like(out_shape, device, dtype)
        saved_mean, saved_invstd = (nan_like((c,), device, torch.float32) for _ in range(2))
        running_mean, running_var = bn.mean.clone(), bn.var.clone()
        backend.train(x, weight.to(dtype), bn.weight, bn.bias, running_mean, running_var, bn.eps,
                      momentum, y, out, saved_mean, saved_invstd, *shape_args)
        y64 = F.conv2d(x.double(), weight.double(), stride=stride, padding=1, groups=groups)
        y_plain = F.conv2d(x, weight.to(dtype), stride=stride, padding=1, groups=groups)
        r64 = bn_train_reference(y64, bn, momentum)
        rp = bn_train_reference(y_plain.float(), bn, momentum)
        add("train", "y", y, y64, y_plain)
        add("train", "out", out, r64["out"], rp["out"].to(dtype))
        for name, actual in (("saved_mean", saved_mean), ("saved_invstd", saved_invstd),
                             ("running_mean", running_mean), ("running_var", running_var)):
            add("train", name, actual, r64[name], rp[name])
    if backend.has("bn_relu_backward"):
        # Inputs as the training forward leaves them (dtype y and out, fp32 statistics).
        y = randn(out_shape, gen, device, dtype)
        stats = bn_train_reference(y.double(), bn, 0.9)
        out = stats["out"].to(dtype)
        saved_mean, saved_invstd = stats["saved_mean"].float(), stats["saved_invstd"].float()
        dout = randn(out_shape, gen, device, dtype)
        dy = nan_like(out_shape, device, dtype)
        dgamma, dbeta = (nan_like((c,), device, torch.float32) for _ in range(2))
        backend.bn_relu_backward(y, out, dout, bn.weight, saved_mean, saved_invstd, dy, dgamma,
                                 dbeta, n, c, h_out * w_out)
        args = (y, out, dout, bn.weight, saved_mean, saved_invstd)
        g64 = bn_relu_backward_reference(*(t.double() for t in args))
        g_plain = bn_relu_backward_reference(*(t.to(dtype) if t.dim() == 4 else t for t in args))
        for name, actual in (("dy", dy), ("dgamma", dgamma), ("dbeta", dbeta)):
            add("bwd", name, actual, g64[name], g_plain[name])


def check_bn_backward_near_constant(backend, device, report, section):
    """The BN + ReLU backward of near-constant channels, two fp32 samples each (100 +- 0.1) whose
    batch mean float32 cannot hold; as tests/test_grouped_conv_bn_relu.py's CPU case. Centred on
    the rounded saved_mean, dy and dgamma err by many times the atol, and so does the plain
    float32 sequence: the bound is the atol alone (docs/pitfalls.md)."""
    gen = torch.Generator().manual_seed(12)
    c = 8
    shape = (2, c, 1, 1)
    base = 100.0 + torch.randint(0, 1000, (c,), generator=gen).float() * 2.0 ** -16
    y = torch.stack([base + 0.1, base - 0.1 + 2.0 ** -17]).view(shape).to(device)
    bn = random_bn(c, gen, device)
    stats = bn_train_reference(y.double(), bn, 0.9)
    assert (stats["saved_mean"].float().double() != stats["saved_mean"]).all()
    out = stats["out"].float()
    dout = randn(shape, gen, device, torch.float32)
    dy = nan_like(shape, device, torch.float32)
    dgamma, dbeta = (nan_like((c,), device, torch.float32) for _ in range(2))
    backend.bn_relu_backward(y, out, dout, bn.weight, stats["saved_mean"].float(),
                             stats["saved_invstd"].float(), dy, dgamma, dbeta, 2, c, 1)
    g64 = bn_relu_backward_reference(y.double(), out, dout.double(), bn.weight,
                                     stats["saved_mean"], stats["saved_invstd"])
    # ref64 also stands for plain: the bound is the atol alone.
    for name, actual in (("dy", dy), ("dgamma", dgamma), ("dbeta", dbeta)):
        report.add(section, {"op": "conv", "backend": backend.name, "case": "bn-near-constant",
                             "n": 2, "dtype": "float32", "pass": "bwd", "out": name,
                             **compare(actual, g64[name], g64[name], "float32")})


def bn_train_reference(y, bn, momentum):
    """Training BN + ReLU with batch statistics at y's precision (biased variance; running stats
    updated Paddle's way: running = momentum * running + (1 - momentum) * batch)."""
    p = y.dtype
    mean = y.mean((0, 2, 3))
    var = ((y - mean.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    invstd = 1.0 / torch.sqrt(var + bn.eps)
    k = (bn.weight.to(p) * invstd).view(1, -1, 1, 1)
    out = torch.relu((y - mean.view(1, -1, 1, 1)) * k + bn.bias.to(p).view(1, -1, 1, 1))
    return {"out": out, "saved_mean": mean, "saved_invstd": invstd,
            "running_mean": momentum * bn.mean.to(p) + (1 - momentum) * mean,
            "running_var": momentum * bn.var.to(p) + (1 - momentum) * var}


def bn_relu_backward_reference(y, out, dout, gamma, mean, invstd):
    """d/dy of relu(bn(y)) with batch statistics, at the inputs' precision; the ReLU mask from
    the given out (as the kernel sees it)."""
    p = y.dtype
    view = lambda t: t.to(p).view(1, -1, 1, 1)  # noqa: E731
    dz = torch.where(out > 0, dout, torch.zeros_like(dout))
    xhat = (y - view(mean)) * view(invstd)
    dbeta = dz.sum((0, 2, 3), dtype=torch.float64 if p == torch.float64 else torch.float32)
    dgamma = (dz * xhat).sum((0, 2, 3), dtype=dbeta.dtype)
    count = y.numel() // y.shape[1]
    dy = view(gamma) * view(invstd) * (dz - view(dbeta) / count - xhat * view(dgamma) / count)
    return {"dy": dy, "dgamma": dgamma, "dbeta": dbeta}


def run_correctness(report, backends, merges, convs, dtypes, n, device, first=()):
    """Every (case, dtype, backend), most informative first so that a budget cut loses least:
    all conv shapes and the `first` merges in each dtype, then the other merges."""
    gen = torch.Generator().manual_seed(0)
    section = "correctness"
    jobs = []
    for dtype in dtypes:
        for case in convs:
            jobs += [(check_conv_case, b, case, dtype) for b in backends["conv"]]
        for case in [m for m in merges if m in first]:
            jobs += [(check_merge_case, b, case, dtype) for b in backends["merge"]]
    for dtype in dtypes:
        for case in [m for m in merges if m not in first]:
            jobs += [(check_merge_case, b, case, dtype) for b in backends["merge"]]
    for i, (check, backend, case, dtype) in enumerate(jobs):
        if report.past(PHASE_END["correctness"]):
            report.note(f"correctness: budget reached, {len(jobs) - i} of {len(jobs)} cases"
                        " skipped")
            return
        op = "conv" if check is check_conv_case else "merge"
        _guarded(report, section, f"{op}/{backend.name}/{case.label}/{dtype}",
                 check, backend, case, n, dtype, device, gen, report, section)


def _guarded(report, section, what, fn, *args):
    """One failing case is a failed row, not a failed stage."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        report.add(section, {"case": what, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})


def summarize_correctness(report):
    rows = report.tables.get("correctness", [])
    failed = [r for r in rows if not r.get("ok")]
    report.info["correctness"] = f"{len(rows) - len(failed)}/{len(rows)} checks passed"
    if failed:
        report.tables["correctness failures"] = failed


# =================================================================================================
# Sanitizer (this script re-run under compute-sanitizer)
# =================================================================================================


def sanitize_cases(backends, device):
    """Small, odd-shaped cases of every kernel: scalar and vector paths, 0/1/2 BN outputs."""
    gen = torch.Generator().manual_seed(1)
    quiet = Report(os.environ.get("TMPDIR", "/tmp") + "/dpn_fast_sanitize", 60)
    for dtype in (torch.float32, torch.float16):
        for backend in backends["merge"]:
            for case in SMALL_MERGES:
                check_merge_case(backend, case, 2, dtype, device, gen, quiet, "s")
                _sync(device)
                log(f"sanitize-case merge/{backend.name}/{case.label}/{dtype} done")
        for backend in backends["conv"]:
            for case in SMALL_CONVS:
                check_conv_case(backend, case, 2, dtype, device, gen, quiet, "s")
                _sync(device)
                log(f"sanitize-case conv/{backend.name}/{case.label}/{dtype} done")
    bad = [r for rows in quiet.tables.values() for r in rows if not r.get("ok")]
    log(f"sanitize-case results: {len(bad)} failing comparisons")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()  # a fault is reported against the case that caused it


def start_sanitizer(report, lib_path):
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        report.note("compute-sanitizer not found: memcheck skipped")
        return None
    log_path = report.out_dir / "sanitizer.log"
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one cudaMalloc per tensor
    cmd = [tool, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "3",
           "--print-limit", "20", sys.executable, str(Path(__file__).resolve()),
           "--sanitize-case", "all", "--out", str(report.out_dir)]
    if lib_path is not None:  # without it (failed build) the Triton kernels are still checked
        cmd += ["--lib", str(lib_path)]
    log(f"   starting {' '.join(cmd)} (log: {log_path})")
    handle = open(log_path, "w")
    # Own session: on timeout the sanitizer and the python it runs are killed together.
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, handle, log_path


def finish_sanitizer(report, started, timeout_s):
    proc, handle, log_path = started
    try:
        rc = proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "timeout"
    handle.close()
    text = log_path.read_text(errors="replace")
    summary = [ln for ln in text.splitlines()
               if "ERROR SUMMARY" in ln or "sanitize-case results" in ln]
    cases = sum("sanitize-case " in ln and ln.endswith("done") for ln in text.splitlines())
    report.add("sanitizer", {"tool": "memcheck", "exit": rc, "cases_done": cases,
                             "summary": "; ".join(summary) or text[-300:]})


# =================================================================================================
# Timing
# =================================================================================================


def time_fn(fn, iters, warmup=5, graph=False):
    """ms per call. CUDA: events around a loop (eager) or around graph replays (graph=True, device
    time without launch overhead). CPU (dry run): wall clock."""
    if torch.cuda.is_available():
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        else:
            run = fn
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
    fn()
    t0 = time.perf_counter()
    for _ in range(max(1, iters)):
        fn()
    return (time.perf_counter() - t0) * 1e3 / max(1, iters)


def _timed(report, fn, iters, graph):
    try:
        return time_fn(fn, iters, graph=graph)
    except Exception as e:  # noqa: BLE001 - a backend that can't be captured still gets eager
        report.note((f"timing ({'graph' if graph else 'eager'}) failed:"
                     f" {type(e).__name__}: {e}")[:300])
        return None


def copy_bandwidth(device):
    """GB/s of a large device-to-device copy (read + write bytes)."""
    elems = (1 << 28) if device == "cuda" else (1 << 22)
    src = torch.empty(elems, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), iters=20 if device == "cuda" else 2)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def iters_for(n, quick):
    return {1: 200, 8: 100, 64: 30}.get(n, 10) // (4 if quick else 1)


def time_merges(report, backends, merges, batches, dtypes, device, quick, copy_gbs):
    gen = torch.Generator().manual_seed(2)
    for dtype in dtypes:
        for n in batches:
            for case in merges:
                if report.past(PHASE_END["kernels"]):
                    report.note("kernel timing: budget reached, remaining merge timings skipped")
                    return
                r, d, inc, hw, acts = case.r, case.d, case.inc, case.hw, case.acts
                if inc == 0:
                    continue  # the stem's head-only form is timed end to end
                c = r + d + inc
                resid = randn((n, r, hw, hw), gen, device, dtype)
                dense = randn((n, d, hw, hw), gen, device, dtype)
                y = randn((n, r + inc, hw, hw), gen, device, dtype)
                bns = [random_bn(c, gen, device) for _ in range(acts)]
                scale = torch.stack([bn.folded()[0] for bn in bns]) if acts else None
                shift = torch.stack([bn.folded()[1] for bn in bns]) if acts else None
                resid_out = torch.empty_like(resid)
                dense_out = torch.empty((n, d + inc, hw, hw), device=device, dtype=dtype)
                act = (torch.empty((acts, n, c, hw, hw), device=device, dtype=dtype) if acts
                       else None)
                nbytes = resid.element_size() * n * hw * hw * (
                    (r + d + r + inc) + (r + d + inc) + acts * c)
                iters = iters_for(n, quick) if device == "cuda" else 1
                row = {"case": case.label, "n": n, "dtype": str(dtype).replace("torch.", ""),
                       "C": c, "hw": hw, "acts": acts, "MB": nbytes / 1e6}
                unfused = lambda: merge_unfused(resid, dense, y, bns)  # noqa: E731
                row["unfused_ms"] = _timed(report, unfused, iters, graph=False)
                row["unfused_graph_ms"] = _timed(report, unfused, iters, graph=device == "cuda")
                best = None
                for backend in backends["merge"]:
                    def fused(b=backend):
                        b.forward(resid, dense, y, scale, shift, resid_out, dense_out, act,
                                  n, r, d, inc, hw * hw, acts)
                    row[f"{backend.name}_ms"] = _timed(report, fused, iters, graph=False)
                    variants = [(backend.name, fused, nbytes)]
                    if backend.has("buffer"):
                        # Stage-buffer form: the d old dense channels are read, not copied.
                        capacity = d + inc
                        buffer = torch.empty((n, capacity, hw, hw), device=device, dtype=dtype)
                        buffer[:, :d] = dense

                        def fused_buffer(b=backend, buffer=buffer, capacity=capacity):
                            b.forward(resid, buffer, y, scale, shift, resid_out, buffer, act,
                                      n, r, d, inc, hw * hw, acts, capacity)
                        variants.append((f"{backend.name}_buffer", fused_buffer,
                                         nbytes - resid.element_size() * n * hw * hw * d))
                    for name, fn, moved in variants:
                        ms = _timed(report, fn, iters, graph=device == "cuda")
                        row[f"{name}_graph_ms"] = ms
                        if ms is not None:
                            gbs = moved / (ms * 1e-3) / 1e9
                            row[f"{name}_GBps"] = gbs
                            row[f"{name}_%copy"] = 100 * gbs / copy_gbs
                            best = ms if best is None else min(best, ms)
                if best is not None and row["unfused_graph_ms"]:
                    row["speedup_vs_unfused"] = row["unfused_graph_ms"] / best
                report.add("merge timing", row)


def time_convs(report, backends, convs, batches, dtypes, device, quick):
    gen = torch.Generator().manual_seed(3)
    torch.backends.cudnn.benchmark = True  # the baseline gets cuDNN's best algorithm
    for dtype in dtypes:
        for n in batches:
            for case in convs:
                if report.past(PHASE_END["convs"]):
                    report.note("kernel timing: budget reached, remaining conv timings skipped")
                    return
                x, weight, bn, w_folded, bias = conv_inputs(case, n, dtype, device, gen)
                w_dt, w_folded_dt, bias_dt = weight.to(dtype), w_folded.to(dtype), bias.to(dtype)
                h_out = (case.hw - 1) // case.stride + 1
                out = torch.empty((n, case.c, h_out, h_out), device=device, dtype=dtype)
                iters = iters_for(n, quick) if device == "cuda" else 1
                row = {"case": case.label, "n": n, "dtype": str(dtype).replace("torch.", ""),
                       "C": case.c, "groups": case.groups, "stride": case.stride, "hw": case.hw}
                unfused = lambda: conv_unfused(x, w_dt, bn, case.stride, case.groups)  # noqa: E731
                folded = lambda: torch.relu_(F.conv2d(x, w_folded_dt, bias_dt, stride=case.stride,  # noqa: E731
                                                      padding=1, groups=case.groups))
                row["cudnn_conv_bn_relu_ms"] = _timed(report, unfused, iters, graph=False)
                graph = device == "cuda"
                row["cudnn_conv_bn_relu_graph_ms"] = _timed(report, unfused, iters, graph=graph)
                row["cudnn_folded_conv_relu_graph_ms"] = _timed(report, folded, iters, graph=graph)
                # With the input's BN + ReLU too (DPN's c3x3_b head): the prologue form.
                in_bn = random_bn(case.c, gen, device)
                unfused_p = lambda: conv_unfused(in_bn.apply_relu(x), w_dt, bn, case.stride,  # noqa: E731
                                                 case.groups)
                row["cudnn_bn_relu_conv_bn_relu_graph_ms"] = _timed(report, unfused_p, iters,
                                                                    graph=graph)
                for backend in backends["conv"]:
                    w_prepared = backend.weight(w_folded, dtype)

                    def fused(b=backend, w=w_prepared):
                        b.forward(x, w, bias, out, n, case.c, case.hw, case.hw, case.c,
                                  case.groups, case.stride)
                    row[f"{backend.name}_ms"] = _timed(report, fused, iters, graph=False)
                    ms = _timed(report, fused, iters, graph=graph)
                    row[f"{backend.name}_graph_ms"] = ms
                    base = row["cudnn_conv_bn_relu_graph_ms"]
                    if ms and base:
                        row[f"{backend.name}_speedup"] = base / ms
                    if backend.has("prologue"):
                        state = backend.prepare_prologue(weight, in_bn, bn, dtype)

                        def fused_p(b=backend, state=state):
                            b.prologue(state, x, out, n, case.c, case.hw, case.hw, case.c,
                                       case.groups, case.stride)
                        ms = _timed(report, fused_p, iters, graph=graph)
                        row[f"{backend.name}_prologue_graph_ms"] = ms
                        base = row["cudnn_bn_relu_conv_bn_relu_graph_ms"]
                        if ms and base:
                            row[f"{backend.name}_prologue_vs_unfused"] = base / ms
                report.add("conv timing", row)


def sweep_conv_tiles(report, module, convs, batches, forms, device):
    """The Triton conv's tile choices side by side (fp16, graph replay), against the unfused cuDNN
    sequence: the data behind dpn_fast.kernels.grouped_conv_bn_relu's choose_tiles. Each form in
    `forms`: `plain` (conv + BN + ReLU) and `prologue` (the input's BN + ReLU fused too; there
    `split` runs that BN + ReLU as its own torch pass before the plain-form kernel instead). Each
    choice's output is also checked against float64 (`<choice> ok`), so a fast wrong one can't be
    picked."""
    gen = torch.Generator().manual_seed(7)
    dtype = torch.float16
    for n in batches:
        for case in convs:
            x, weight, bn, w_folded, bias = conv_inputs(case, n, dtype, device, gen)
            in_bn = random_bn(case.c, gen, device)
            prologue = _folded_prologue(weight, in_bn, bn)
            cg = case.c // case.groups
            h_out = (case.hw - 1) // case.stride + 1
            out = torch.empty((n, case.c, h_out, h_out), device=device, dtype=dtype)
            iters = iters_for(n, False) if device == "cuda" else 1
            w_dt = weight.to(dtype)
            bn_dot = min(64, max(16, 1 << (cg - 1).bit_length()))
            choices = (("fma", module.choose_tiles(cg, cg, n, h_out * h_out, half=False)),
                       ("dot m32", module.Tiles(True, 32, bn_dot, 32, 4)),
                       ("dot m64", module.Tiles(True, 64, bn_dot, 32, 4)),
                       ("dot m64 k16", module.Tiles(True, 64, bn_dot, 16, 4)))
            for form in forms:
                if report.past(PHASE_END["sweep"]):
                    report.note("conv tile sweep: budget reached, remaining shapes skipped")
                    return
                if form == "plain":
                    unfused = lambda: conv_unfused(x, w_dt, bn, case.stride, case.groups)  # noqa: E731
                else:
                    unfused = lambda: conv_unfused(in_bn.apply_relu(x), w_dt, bn,  # noqa: E731
                                                   case.stride, case.groups)
                plain = unfused()
                x64 = x.double() if form == "plain" else in_bn.apply_relu(x.double())
                ref64 = conv_unfused(x64, weight.double(), bn, case.stride, case.groups)
                base = _timed(report, unfused, iters, graph=device == "cuda")
                row = {"case": case.label, "n": n, "form": form, "cudnn_ms": base}
                def conv(x_in, w, b, tiles, **prologue_args):
                    return lambda: module.grouped_conv_bias_relu_forward(
                        x_in, w, b, out, n, case.c, case.hw, case.hw, case.c, case.groups,
                        case.stride, tiles=tiles, **prologue_args)
                runs = []
                for name, tiles in choices:
                    if form == "plain":
                        runs.append((name, conv(x, w_folded, bias, tiles)))
                        continue
                    runs.append((name, conv(x, prologue["w_folded"], prologue["bias"], tiles,
                                            in_scale=prologue["in_scale"],
                                            in_shift=prologue["in_shift"])))
                    if tiles.use_dot:  # the input's BN + ReLU as its own pass, then the plain form
                        runs.append((f"split {name}", lambda tiles=tiles: conv(
                            in_bn.apply_relu(x), prologue["w_folded"], prologue["bias"], tiles)()))
                for name, run in runs:
                    out.fill_(float("nan"))
                    run()
                    row[f"{name} ok"] = compare(out, ref64, plain, "float16")["ok"]
                    ms = _timed(report, run, iters, graph=device == "cuda")
                    row[f"{name} ms"] = ms
                    if ms and base:
                        row[f"{name} x"] = base / ms
                report.add("conv tile sweep (Triton, fp16)", row)


# =================================================================================================
# NHWC kernels (dpn_fast/kernels/nhwc_conv1x1.py, dpn_fast/kernels/nhwc_grouped_conv3x3.py)
# =================================================================================================


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


def nhwc_gemm_cases(blocks):
    """The three GEMM forms at the first and last block of each stage."""
    cases, by_stage = [], {}
    for b in blocks:
        by_stage.setdefault(b.stage, []).append(b)
    for stage_blocks in by_stage.values():
        for b in {id(x): x for x in (stage_blocks[0], stage_blocks[-1])}.values():
            label = f"s{b.stage}b{b.index}"
            k_in = b.in_resid + b.in_dense
            cases.append(GemmCase(f"{label}-1x1a", "1x1a", k_in, b.bottleneck, b.in_hw))
            if b.kind != "normal":
                cases.append(GemmCase(f"{label}-proj", "proj", k_in, b.resid + 2 * b.inc,
                                      b.in_hw, b.stride))
            cases.append(GemmCase(f"{label}-1x1c", "1x1c", b.bottleneck, b.resid + b.inc,
                                  b.out_hw, resid=b.resid, dense=b.dense_before,
                                  ldo=b.resid + b.stage_dense))
    return cases


SMALL_GEMMS = [GemmCase("odd-1x1a", "1x1a", 37, 24, 7), GemmCase("odd-proj", "proj", 20, 19, 7, 2),
               GemmCase("odd-1x1c", "1x1c", 13, 16, 5, resid=10, dense=7, ldo=28)]


class GemmRun:
    """A GemmCase's inputs at batch n, the fused launch, and the unfused torch sequence it
    replaces (at any dtype: float64 for the reference)."""

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


def check_gemm_case(module, case, n, dtype, device, gen, report, section):
    run = GemmRun(module, case, n, dtype, device, gen)
    ref64, plain = run.unfused(torch.float64), run.unfused(dtype)
    run.reset_out()
    run.fused()
    row = compare(run.written(), ref64, plain, str(dtype).replace("torch.", ""))
    row["untouched_ok"] = run.untouched_ok()
    row["ok"] = row["ok"] and row["untouched_ok"]
    report.add(section, {"op": "nhwc 1x1", "backend": "triton", "case": case.label, "n": n,
                         "dtype": str(dtype).replace("torch.", ""), "pass": case.form, **row})


class GroupedRun:
    """A ConvCase as NHWC rows: the fused launch and cuDNN's conv + BN + ReLU (NCHW)."""

    def __init__(self, module, case, n, dtype, device, gen, tiles=None):
        self.module, self.case, self.n = module, case, n
        x, self.weight, self.bn, w_folded, self.bias = conv_inputs(case, n, dtype, device, gen)
        self.x = x
        self.rows = x.permute(0, 2, 3, 1).reshape(-1, case.c).contiguous()
        self.h_out = (case.hw - 1) // case.stride + 1
        self.w_out = (case.width - 1) // case.stride + 1
        self.out = nan_like((n * self.h_out * self.w_out, case.c), device, dtype)
        self.set_tiles(tiles or module.choose_tiles(case.c // case.groups, self.out.shape[0],
                                                    dtype != torch.float32, module.INTERPRETED),
                       w_folded)

    def set_tiles(self, tiles, w_folded=None):
        if w_folded is None:
            w_folded = self._w_folded
        self._w_folded, self.tiles = w_folded, tiles
        packed = self.module.pack_weights(w_folded.double().cpu().numpy(), self.case.groups, tiles)
        self.packed = torch.from_numpy(packed).to(device=self.rows.device, dtype=self.rows.dtype)

    def fused(self):
        c = self.case
        self.module.grouped_conv3x3_forward(self.rows, self.packed, self.bias, self.out,
                                            images=self.n, h=c.hw, w=c.width, c=c.c,
                                            groups=c.groups, stride=c.stride, ldx=c.c, ldo=c.c,
                                            tiles=self.tiles)

    def unfused(self, dtype, x=None):
        """cuDNN conv + BN + ReLU (NCHW) at `dtype`, as rows."""
        x = self.x if x is None else x
        y = conv_unfused(x.to(dtype), self.weight.to(dtype), self.bn, self.case.stride,
                         self.case.groups)
        return y.permute(0, 2, 3, 1).reshape(-1, self.case.c)

    def bytes_moved(self):
        return (self.rows.numel() + self.out.numel()) * self.rows.element_size()


def check_grouped_case(module, case, n, dtype, device, gen, report, section):
    run = GroupedRun(module, case, n, dtype, device, gen)
    run.fused()
    dn = str(dtype).replace("torch.", "")
    report.add(section, {"op": "nhwc grouped conv", "backend": "triton", "case": case.label,
                         "n": n, "dtype": dn, "pass": "eval",
                         **compare(run.out, run.unfused(torch.float64), run.unfused(dtype), dn)})


def run_nhwc_correctness(report, gemm_module, conv_module, gemms, convs, dtypes, n, device):
    gen = torch.Generator().manual_seed(8)
    section = "nhwc correctness"
    for dtype in dtypes:
        jobs = [(check_grouped_case, conv_module, c) for c in convs]
        jobs += [(check_gemm_case, gemm_module, c) for c in gemms]
        for check, module, case in jobs:
            if report.past(PHASE_END["nhwc correctness"]):
                report.note("nhwc correctness: budget reached, remaining cases skipped")
                return
            _guarded(report, section, f"nhwc/{case.label}/{dtype}", check, module, case, n,
                     dtype, device, gen, report, section)
    rows = report.tables.get(section, [])
    report.info["nhwc correctness"] = f"{sum(bool(r.get('ok')) for r in rows)}/{len(rows)} passed"


def time_nhwc_convs(report, module, convs, batches, device, quick, copy_gbs):
    """The NHWC grouped conv (epilogue included) vs cuDNN conv + BN + ReLU, NCHW and
    channels_last input, fp16 graph replays; the NHWC conv's bandwidth vs the device copy."""
    gen = torch.Generator().manual_seed(9)
    torch.backends.cudnn.benchmark = True
    graph = device == "cuda"
    for n in batches:
        for case in convs:
            if report.past(PHASE_END["nhwc kernels"]):
                report.note("nhwc conv timing: budget reached, remaining shapes skipped")
                return
            run = GroupedRun(module, case, n, torch.float16, device, gen)
            iters = iters_for(n, quick) if graph else 1
            x_cl = run.x.contiguous(memory_format=torch.channels_last)
            row = {"case": case.label, "n": n, "C": case.c, "groups": case.groups,
                   "cin_g": case.c // case.groups, "stride": case.stride, "hw": case.hw,
                   "tiles": "p{}c{}g{}".format(run.tiles.block_p, run.tiles.block_c,
                                                run.tiles.groups_per_program)}
            w16 = run.weight.half()
            for key, x_in in (("cudnn_ms", run.x), ("cudnn_cl_ms", x_cl)):
                row[key] = _timed(report, lambda x_in=x_in: conv_unfused(
                    x_in, w16, run.bn, case.stride, case.groups), iters, graph)
            ms = row["nhwc_ms"] = _timed(report, run.fused, iters, graph)
            if ms:
                row["speedup"] = row["cudnn_ms"] / ms if row["cudnn_ms"] else None
                gbs = run.bytes_moved() / (ms * 1e-3) / 1e9
                row["GBps"], row["%copy"] = gbs, 100 * gbs / copy_gbs
            report.add("nhwc grouped conv timing (fp16)", row)


def time_nhwc_gemms(report, module, gemms, batches, device, quick):
    """Each GEMM form at the representative DPN92 shapes vs the unfused torch sequence on rows
    (cuBLAS matmul plus elementwise passes), fp16 graph replays."""
    gen = torch.Generator().manual_seed(10)
    graph = device == "cuda"
    for n in batches:
        for case in gemms:
            if report.past(PHASE_END["nhwc kernels"]):
                report.note("nhwc GEMM timing: budget reached, remaining shapes skipped")
                return
            run = GemmRun(module, case, n, torch.float16, device, gen)
            iters = iters_for(n, quick) if graph else 1
            row = {"case": case.label, "n": n, "M": run.rows, "K": case.k, "N": case.n}
            row["torch_ms"] = _timed(report, lambda: run.unfused(torch.float16), iters, graph)
            ms = row["nhwc_ms"] = _timed(report, run.fused, iters, graph)
            if ms:
                row["TFLOPs"] = 2 * run.rows * case.k * case.n / (ms * 1e-3) / 1e12
                row["speedup"] = row["torch_ms"] / ms if row["torch_ms"] else None
            report.add("nhwc 1x1 timing (fp16)", row)


def sweep_nhwc_tiles(report, gemm_module, conv_module, gemms, convs, n, device):
    """Tile choices of both NHWC kernels side by side (fp16 graph replays), each checked against
    float64 first (`<choice> ok`): the data behind their choose_tiles."""
    gen = torch.Generator().manual_seed(11)
    graph = device == "cuda"
    iters = iters_for(n, False) if graph else 1
    tiles_of = conv_module.Tiles
    # Dry run (interpreter): one choice of each kind, to exercise the code path.
    position_tiles, warp_counts = ((32, 64, 128), (4, 8)) if graph else ((64,), (4,))
    gemm_tiles = [gemm_module.Tiles(*t) for t in (
        (128, 128, 32, 8, 8, 3), (128, 128, 64, 8, 8, 3), (128, 64, 32, 8, 4, 3),
        (64, 128, 32, 8, 4, 3), (128, 256, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4))]
    for case in convs:
        if report.past(PHASE_END["nhwc sweep"]):
            report.note("nhwc tile sweep: budget reached, remaining shapes skipped")
            return
        run = GroupedRun(conv_module, case, n, torch.float16, device, gen)
        ref64, plain = run.unfused(torch.float64), run.unfused(torch.float16)
        cin_g = case.c // case.groups
        row = {"case": case.label, "n": n, "cin_g": cin_g}
        for block_c in sorted({run.tiles.block_c, min(64, 2 * run.tiles.block_c)}):
            for block_p in position_tiles:
                for warps in warp_counts:
                    name = f"p{block_p} c{block_c} w{warps}"
                    run.set_tiles(tiles_of(block_p, block_c, block_c // cin_g, warps, 2))
                    run.out.fill_(float("nan"))
                    run.fused()
                    row[f"{name} ok"] = compare(run.out, ref64, plain, "float16")["ok"]
                    row[f"{name} ms"] = _timed(report, run.fused, iters, graph)
        report.add("nhwc grouped conv tile sweep (fp16)", row)
    for case in gemms:
        if report.past(PHASE_END["nhwc sweep"]):
            report.note("nhwc tile sweep: budget reached, remaining GEMMs skipped")
            return
        run = GemmRun(gemm_module, case, n, torch.float16, device, gen)
        ref64, plain = run.unfused(torch.float64), run.unfused(torch.float16)
        row = {"case": case.label, "n": n, "M": run.rows, "K": case.k, "N": case.n}
        for tiles in gemm_tiles if graph else gemm_tiles[:2]:
            name = "m{}n{}k{} w{} s{}".format(tiles.block_m, tiles.block_n, tiles.block_k,
                                               tiles.num_warps, tiles.num_stages)
            run.reset_out()
            run.fused(tiles)
            row[f"{name} ok"] = compare(run.written(), ref64, plain, "float16")["ok"] \
                and run.untouched_ok()
            row[f"{name} ms"] = _timed(report, lambda t=tiles: run.fused(t), iters, graph)
        report.add("nhwc 1x1 tile sweep (fp16)", row)


def run_nhwc_stages(report, gemm_module, grouped_module, gemms, convs, dtypes, device, args,
                    skip):
    """Stages nhwc-correct, nhwc-kernels, nhwc-sweep. On a GPU: DPN92's shapes (and small odd
    ones for correctness), fp32/fp16/bf16; timings and sweep fp16 (the targets' dtype). Dry run:
    the small odd shapes under the interpreter, fp32/fp16 (bf16 math is wrong there)."""
    gpu = device == "cuda"
    if "nhwc-correct" not in skip:
        with report.stage("nhwc correctness"):
            run_nhwc_correctness(report, gemm_module, grouped_module,
                                 gemms + SMALL_GEMMS if gpu else SMALL_GEMMS,
                                 convs + SMALL_CONVS if gpu else SMALL_CONVS,
                                 dtypes if gpu else dtypes[:2], 2, device)
    if "nhwc-kernels" not in skip:
        with report.stage("nhwc kernel timing"):
            copy_gbs = report.info.get("device copy GB/s") or copy_bandwidth(device)
            report.info["device copy GB/s"] = copy_gbs
            time_nhwc_convs(report, grouped_module, convs if gpu else SMALL_CONVS[:1],
                            [1, 8, 64] if gpu else [1], device, args.quick, copy_gbs)
            time_nhwc_gemms(report, gemm_module, gemms if gpu else SMALL_GEMMS,
                            [1, 64] if gpu else [1], device, args.quick)
    if "nhwc-sweep" not in skip:
        with report.stage("nhwc tile sweep"):
            sweep_nhwc_tiles(report, gemm_module, grouped_module,
                             gemms if gpu else SMALL_GEMMS[:1], convs if gpu else SMALL_CONVS[:1],
                             64 if gpu else 1, device)


# =================================================================================================
# End to end: timm dpn92 on the fused kernels (dpn_fast.torch)
# =================================================================================================


def calibrate_batch_norm(model, device, dtype, side, batches=3, n=8):
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
            model(randn((n, 3, side, side), gen, device, dtype))
    model.eval()


class EndToEnd:
    """timm dpn92: float64 reference logits once, then per dtype the fused forward
    (dpn_fast.torch, `fused nhwc`) checked against them and the timings; keeps each dtype's model
    for the torch.compile phase. On CPU (dry run) the fused forward runs under the interpreter at
    32x32 images, checked but not timed: one dpn92 call takes ~40 s there."""

    def __init__(self, report, timm, device, batches, quick):
        from dpn_fast.torch import fuse
        self.fuse = fuse
        self.report, self.device, self.batches, self.quick = report, device, batches, quick
        gpu = device == "cuda"
        self.side = 224 if gpu else 32
        self.base = timm.create_model("dpn92", pretrained=False).to(device)
        calibrate_batch_norm(self.base, device, torch.float32, self.side, n=16 if gpu else 2)
        self.gen = torch.Generator().manual_seed(5)
        self.x64 = randn((2 if gpu else 1, 3, self.side, self.side), self.gen, device,
                         torch.float64)
        with torch.no_grad():
            self.ref64 = _copy_model(self.base, torch.float64)(self.x64)
        self.models = {}
        if not gpu:
            report.note("e2e on CPU: 32x32 images (224x224 on a GPU); fused nhwc checked, not "
                        "timed (Triton's interpreter)")

    def run(self, dtype, batches=None):
        """Equivalence at dtype, then the timings at `batches` (default: the run's)."""
        report, dn = self.report, str(dtype).replace("torch.", "")
        section = "e2e equivalence (logits vs float64 timm)"
        model = self.models[dtype] = _copy_model(self.base, dtype)
        x = self.x64.to(dtype)
        with torch.no_grad():
            eager = model(x)
        fused_models = {}
        try:
            fused = self.fuse(model)
            logits = fused(x)
            row = {"dtype": dn, "fused": "nhwc",
                   "max_abs_fused_minus_eager":
                       float((logits.double() - eager.double()).abs().max()),
                   "max_abs_eager": float(eager.abs().max()),
                   **compare(logits, self.ref64, eager, dn)}
            report.add(section, row)
            if row["finite"] and self.device == "cuda":
                fused_models["nhwc"] = fused
            if not row["ok"]:
                report.note(f"e2e nhwc {dn}: fused logits outside the accuracy bound"
                            + ("" if row["finite"] else " (non-finite: not timed)"))
        except Exception as e:  # noqa: BLE001 - the timm baselines are still timed
            report.add(section, {"dtype": dn, "fused": "nhwc", "ok": False,
                                 "error": f"{type(e).__name__}: {e}"[:300]})
        for n in batches or self.batches:
            if report.past(PHASE_END["e2e"]):
                report.note(f"e2e timing {dn} n={n}: budget reached, skipped")
                continue
            _time_e2e(report, model, fused_models, n, self.side, dtype, self.device, self.quick,
                      self.gen)


def _copy_model(base, dtype):
    return copy.deepcopy(base).to(dtype).eval()


def peak_mib(fn):
    """MiB that one call of fn allocates beyond what was allocated before it (CUDA; the first
    call of a fused model at a batch size includes its workspace)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _time_e2e(report, model, fused_models, n, side, dtype, device, quick, gen):
    dn = str(dtype).replace("torch.", "")
    x = randn((n, 3, side, side), gen, device, dtype)
    iters = _e2e_iters(n, quick) if device == "cuda" else 1
    runs = {"timm eager": lambda: model(x)}
    if device == "cuda" and n <= 64:
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        runs["timm eager channels_last"] = lambda: model_cl(x_cl)
    for name, fused in fused_models.items():
        runs[f"fused {name}"] = lambda f=fused: f(x)
    for name, fn in runs.items():
        with torch.no_grad():
            peak = peak_mib(fn) if device == "cuda" else None
            ms = _timed(report, fn, iters, graph=False)
            graph_ms = (_timed(report, fn, iters, graph=True) if device == "cuda" and n == 1
                        else None)
        _e2e_row(report, name, dn, n, ms, graph_ms, peak=peak)


def _e2e_iters(n, quick):
    return max(5, 60 // n // (3 if quick else 1))


def run_compile(report, models, order, quick):
    """torch.compile(timm) in priority order, each only while enough budget is left (a compile
    can't be interrupted). Static shapes: each batch size is its own compile."""
    gen = torch.Generator().manual_seed(6)
    compiled = {}
    for dtype, n in order:
        dn = str(dtype).replace("torch.", "")
        if dtype not in models:
            continue
        if report.left() < COMPILE_MIN_LEFT_S:
            report.note(f"torch.compile {dn} n={n}: skipped, {report.left():.0f}s of budget left")
            continue
        try:
            fn = compiled.setdefault(dtype, torch.compile(models[dtype], dynamic=False))
            x = randn((n, 3, 224, 224), gen, "cuda", dtype)
            with torch.no_grad():
                t0 = time.monotonic()
                fn(x)
                torch.cuda.synchronize()
                compile_s = time.monotonic() - t0
                ms = time_fn(lambda: fn(x), _e2e_iters(n, quick))
                peak = peak_mib(lambda: fn(x))
            _e2e_row(report, "timm torch.compile", dn, n, ms, None, compile_s=compile_s, peak=peak)
        except Exception as e:  # noqa: BLE001
            report.note(f"torch.compile {dn} n={n} failed: {type(e).__name__}: {e}"[:300])


def _e2e_row(report, name, dn, n, ms, graph_ms, compile_s=None, peak=None):
    row = {"model": name, "dtype": dn, "n": n, "ms": ms,
           "img/s": n / (ms * 1e-3) if ms else None}
    if graph_ms is not None:
        row["graph_ms"] = graph_ms
    if peak is not None:
        row["peak_MiB"] = peak
    if compile_s is not None:
        row["compile_s"] = compile_s
    report.add(E2E_SECTION, row)


# =================================================================================================
# Targets
# =================================================================================================


# The channels-last forward's targets (fp16 unless noted).
TARGETS = ("grouped conv >= 3x cuDNN at n=64, every shape", "e2e n=64 >= 2x timm eager",
           "e2e n=64 >= 1.4x torch.compile", "e2e n=1 graph <= 0.8 ms",
           "peak memory <= timm eager")


def evaluate_targets(report):
    """The channels-last forward's targets ("targets"), then the NCHW kernels' ("targets (NCHW
    kernels)")."""
    e2e = {(r["model"], r["dtype"], r["n"]): r for r in report.tables.get(E2E_SECTION, [])}

    def e2e_value(model, dtype, n, key="ms"):
        return (e2e.get((model, dtype, n)) or {}).get(key)

    convs = [r for r in report.tables.get("nhwc grouped conv timing (fp16)", []) if r["n"] == 64]
    speedups = [r.get("speedup") for r in convs]
    narrow = [r.get("%copy") for r in convs if r["cin_g"] in (3, 6)]
    measured = bool(convs) and None not in speedups and None not in narrow
    verdicts = [_verdict(
        measured and min(speedups) >= 3 and min(narrow) >= 50, measured,
        f"min {min(speedups):.2f}x over {len(convs)} shapes; 3/6-channel groups at "
        f"{', '.join(f'{v:.0f}' for v in narrow)}% of copy (needs >= 50%)" if measured else "")]

    def ratio_target(base_model, need, rows):
        """rows: (dtype, n, need); PASS when every measured base/fused ratio meets its need."""
        figures, ok, any_measured = [], True, False
        for dtype, n, row_need in rows:
            base, fused = e2e_value(base_model, dtype, n), e2e_value("fused nhwc", dtype, n)
            if base and fused:
                any_measured = True
                ok = ok and base / fused >= row_need
                figures.append(f"{dtype} n={n}: {fused:.2f} vs {base:.2f} ms, {base / fused:.2f}x")
            else:
                ok = False
                figures.append(f"{dtype} n={n}: not measured")
        return _verdict(ok, any_measured, "; ".join(figures))

    verdicts.append(ratio_target("timm eager", 2.0, [("float16", 64, 2.0)]))
    verdicts.append(ratio_target("timm torch.compile", 1.4,
                                 [("float16", 64, 1.4), ("bfloat16", 256, 1.3)]))
    card = report.info.get("device", "")
    limit = 1.0 if "H100" in card else 0.8
    graph = e2e_value("fused nhwc", "float16", 1, "graph_ms")
    verdicts.append(_verdict(graph is not None and graph <= limit, graph is not None,
                             f"{graph:.3f} ms on {card} (limit {limit} ms)" if graph else ""))
    figures, ok, any_measured = [], True, False
    for dtype, n in (("float16", 64), ("float16", 256), ("bfloat16", 256)):
        eager, fused = (e2e_value(m, dtype, n, "peak_MiB") for m in ("timm eager", "fused nhwc"))
        if eager is None or fused is None:
            continue
        any_measured = True
        ok = ok and fused <= eager
        figures.append(f"{dtype} n={n}: {fused:.0f} vs {eager:.0f} MiB")
    verdicts.append(_verdict(ok, any_measured, "; ".join(figures)))
    for target, (verdict, detail) in zip(TARGETS, verdicts):
        report.add("targets", {"target": target, "verdict": verdict, "measured": detail})
    evaluate_nchw_targets(report)


def evaluate_nchw_targets(report):
    verdicts = []
    merges = [r for r in report.tables.get("merge timing", [])
              if r["n"] == 64 and r["dtype"] == "float16"]
    pct = [max(v for k, v in r.items() if k.endswith("%copy") and v is not None) for r in merges
           if any(k.endswith("%copy") and r[k] is not None for k in r)]
    verdicts.append(("merge >= 80% of copy bandwidth (fp16, n=64, every timed shape)",
                     _verdict(pct and min(pct) >= 80, pct,
                              f"min {min(pct):.0f}% over {len(pct)} shapes" if pct else "")))
    convs = [r for r in report.tables.get("conv timing", []) if r["dtype"] == "float16"]

    def best_speedup(r):
        vals = [v for k, v in r.items() if k.endswith("_speedup") and v is not None]
        return max(vals) if vals else None
    s64 = [best_speedup(r) for r in convs if r["n"] == 64]
    s1 = [best_speedup(r) for r in convs if r["n"] == 1]
    verdicts.append(("fused conv >= 2x cuDNN conv+BN+ReLU at every stage shape (fp16, n=64)",
                     _verdict(s64 and None not in s64 and min(s64) >= 2, s64,
                              f"min {min(s64):.2f}x over {len(s64)} shapes"
                              if s64 and None not in s64 else "")))
    verdicts.append(("fused conv not slower than cuDNN conv+BN+ReLU (fp16, n=1)",
                     _verdict(s1 and None not in s1 and min(s1) >= 1, s1,
                              f"min {min(s1):.2f}x over {len(s1)} shapes"
                              if s1 and None not in s1 else "")))
    for target, (verdict, detail) in verdicts:
        report.add("targets (NCHW kernels)", {"target": target, "verdict": verdict,
                                              "measured": detail})


def _verdict(ok, measured, detail):
    if not measured:
        return "not measured", detail
    return ("PASS" if ok else "FAIL"), detail


# =================================================================================================
# Build
# =================================================================================================


def real_nvcc():
    """nvcc may be a wrapper script that execs the toolkit's; CMake wants the real one."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(512)
    if head.startswith(b"#!"):
        for token in head.decode(errors="ignore").split():
            if token.endswith("/nvcc") and os.path.exists(token):
                return token
    return nvcc


def build_kernels(report, build_dir, arch):
    nvcc = real_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    build_dir = Path(build_dir)
    log_path = report.out_dir / "build.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(REPO), "-B", str(build_dir), *generator,
                 "-DDPN_FAST_WITH_PADDLE=OFF", "-DDPN_FAST_WITH_CUDA=ON",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    build = ["cmake", "--build", str(build_dir), "--target", "dpn_fast_kernels",
             "-j", str(os.cpu_count() or 2)]
    t0 = time.monotonic()
    with open(log_path, "w") as logf:
        for cmd in (configure, build):
            logf.write("$ " + " ".join(cmd) + "\n")
            logf.flush()
            rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"{cmd[:2]} failed ({rc}); see {log_path}:\n"
                                   + log_path.read_text()[-3000:])
    lib = build_dir / "libdpn_fast_kernels.so"
    report.info["build"] = f"sm_{arch} in {time.monotonic() - t0:.0f}s ({lib})"
    spills = [ln.strip() for ln in log_path.read_text().splitlines()
              if "spill" in ln and not ln.strip().startswith("0 bytes stack frame, 0 bytes spill")
              and "0 bytes spill stores, 0 bytes spill loads" not in ln]
    if spills:
        report.note(f"ptxas reports spills: {spills[:5]}")
    return lib


# =================================================================================================
# Main
# =================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True,
                   help="directory for gpu_check.json / gpu_check.md / logs")
    p.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: imports, shapes, references, Triton under TRITON_INTERPRET=1, "
                        "C ABI probe, timm dpn92 fused (dpn_fast.torch) vs eager on 32x32 images")
    p.add_argument("--budget-s", type=float, default=300.0, help="global time budget (seconds)")
    p.add_argument("--build-dir", default=str(REPO / "build" / "gpu_check"))
    p.add_argument("--lib", help="prebuilt libdpn_fast_kernels.so (skips the build)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: "
                   "nhwc-correct,nhwc-kernels,nhwc-sweep,build,correct,sanitize,kernels,sweep,"
                   "e2e,compile")
    p.add_argument("--timing-dtypes", default="float16,float32",
                   help="dtypes of the kernel and end-to-end timings (GPU)")
    p.add_argument("--sanitize-case", help=argparse.SUPPRESS)  # child mode under compute-sanitizer
    return p.parse_args(argv)


def main(argv=None):
    global torch, F
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    else:
        os.environ.setdefault("TRITON_DEFAULT_BACKEND", "nvidia")
    import torch as _torch
    import torch.nn.functional as _F
    torch, F = _torch, _F
    import_checkout_dpn_fast()
    import dpn_fast
    from dpn_fast.kernels import grouped_conv_bn_relu, nhwc_conv1x1, nhwc_grouped_conv3x3
    skip = set(filter(None, args.skip.split(",")))

    if args.sanitize_case:  # child under compute-sanitizer (--dry-run: the same cases on CPU)
        lib = ctypes.CDLL(args.lib) if args.lib else None
        device = "cpu" if args.dry_run else "cuda"
        backends = make_backends(lib, device)
        if args.dry_run:
            backends = {k: v + TORCH_ONLY()[k] for k, v in backends.items()}
        sanitize_cases(backends, device)
        return 0

    report = Report(args.out, args.budget_s)
    # A hang (a kernel that never finishes) still leaves the partial report and a stack dump.
    faulthandler.dump_traceback_later(args.budget_s + 50, exit=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    report.info.update({"mode": "dry-run (CPU)" if args.dry_run
                                else ("quick" if args.quick else "full"),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "dpn_fast": str(Path(dpn_fast.__file__).parent),
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    try:
        import triton
        report.info["triton"] = triton.__version__
    except ImportError:
        report.info["triton"] = "absent"
    if device == "cpu" and not args.dry_run:
        report.note("no CUDA device: use --dry-run on a CPU machine")
        report.write()
        return 2
    # Exact references: no TF32 in the fp32 baselines (restored for the timings).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    merges, convs, gemms = dpn92_cases()
    report.info["DPN92 shapes"] = (f"{len(merges)} merges, {len(convs)} grouped convs, "
                                   f"{len(gemms)} NHWC 1x1 convs (first and last block a stage)")
    timed_merges = representative(merges)

    lib = lib_path = None
    with report.stage("build"):
        if args.lib:
            lib_path = Path(args.lib)
        elif "build" not in skip:
            if device == "cuda":
                major, minor = torch.cuda.get_device_capability()
                arch = f"{major}{minor}"
            else:
                arch = "80"  # dry run: proves the Paddle-free target builds
            lib_path = build_kernels(report, args.build_dir, arch)
        if lib_path is not None:
            lib = ctypes.CDLL(str(lib_path))
            report.info["C ABI probe (1 = kInvalidArgument)"] = probe_c_abi(lib)

    backends = {"merge": [], "conv": []}
    with report.stage("backends"):
        backends = make_backends(lib, device)
        if args.dry_run:
            backends["merge"].append(MergeTorch())
            backends["conv"].append(ConvTorch())
        report.info["backends"] = {k: [b.name for b in v] for k, v in backends.items()}

    sanitizer = None
    if device == "cuda" and "sanitize" not in skip:
        with report.stage("sanitize (start)"):
            sanitizer = start_sanitizer(report, lib_path)

    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    run_nhwc_stages(report, nhwc_conv1x1, nhwc_grouped_conv3x3, gemms, convs, dtypes, device,
                    args, skip)

    if "correct" not in skip:
        with report.stage("correctness"):
            if args.dry_run:
                # Kernels (Triton under the interpreter: slow, and wrong for bf16) on small odd
                # shapes in fp32/fp16; the torch references also at DPN92's real shapes.
                run_correctness(report, backends, SMALL_MERGES, SMALL_CONVS, dtypes[:2], 2, device)
                run_correctness(report, TORCH_ONLY(), merges[:3] + merges[-2:], convs,
                                [torch.float32], 1, device)
            else:
                # DPN92's shapes plus small odd ones (odd sizes, non-square, few channels).
                run_correctness(report, backends,
                                (timed_merges if args.quick else merges) + SMALL_MERGES,
                                convs + SMALL_CONVS, dtypes, 2, device,
                                first=timed_merges + SMALL_MERGES)
            for backend in backends["conv"]:
                if backend.has("bn_relu_backward"):
                    _guarded(report, "correctness", f"conv/{backend.name}/bn-near-constant",
                             check_bn_backward_near_constant, backend, device, report,
                             "correctness")
            summarize_correctness(report)

    if sanitizer is not None:
        with report.stage("sanitize (wait)"):
            finish_sanitizer(report, sanitizer, timeout_s=min(180, report.left() - 150))

    torch.backends.cuda.matmul.allow_tf32 = True  # timings: torch's defaults for the baselines
    torch.backends.cudnn.allow_tf32 = True
    batches = [1, 8, 64] if device == "cuda" else [1]
    timing_dtypes = ([getattr(torch, name) for name in args.timing_dtypes.split(",")]
                     if device == "cuda" else [torch.float32])
    timing_backends = TORCH_ONLY() if args.dry_run else backends
    if "kernels" not in skip:
        with report.stage("kernel timing"):
            copy_gbs = copy_bandwidth(device)
            report.info["device copy GB/s"] = copy_gbs
            time_convs(report, timing_backends, convs if device == "cuda" else convs[:2], batches,
                       timing_dtypes, device, args.quick)
            time_merges(report, timing_backends,
                        timed_merges if device == "cuda" else timed_merges[:3], batches,
                        timing_dtypes, device, args.quick, copy_gbs)
    if "sweep" not in skip:
        with report.stage("conv tile sweep"):
            # Dry run: one small shape through the interpreter, to exercise the code path.
            sweep_conv_tiles(report, grouped_conv_bn_relu,
                             convs if device == "cuda" else SMALL_CONVS[:1],
                             [1, 64] if device == "cuda" else [1], ["plain", "prologue"], device)

    if "e2e" not in skip:
        e2e = None
        with report.stage("e2e setup"):
            from dpn_fast.engines.torch_host import import_timm
            timm = import_timm()
            report.info["timm"] = timm.__version__
            e2e = EndToEnd(report, timm, device, batches, args.quick)
        compile_order = [] if device != "cuda" or "compile" in skip else (
            [(torch.float16, 64), (torch.float16, 1), (torch.float16, 8)] +
            ([] if args.quick else [(torch.bfloat16, 256), (torch.float32, 64),
                                    (torch.float32, 1), (torch.float32, 8)]))
        # fp16 first and its torch.compile at batch 64 right after: the targets are fp16. On a
        # GPU (not --quick) fp16 also at n=256 and bf16 at n=256 only: the memory and bf16
        # targets (eager and the NHWC model only at that size).
        e2e_jobs = [(dtype, None) for dtype in timing_dtypes]
        if device == "cuda" and not args.quick:
            e2e_jobs = [(dtype, batches + [256] if dtype == torch.float16 else None)
                        for dtype in timing_dtypes] + [(torch.bfloat16, [256])]
        for dtype, e2e_batches in e2e_jobs:
            if e2e is None:
                break
            with report.stage(f"e2e {dtype}"):
                e2e.run(dtype, e2e_batches)
            if dtype == torch.float16 and compile_order:
                with report.stage("torch.compile fp16 n=64"):
                    run_compile(report, e2e.models, compile_order[:1], args.quick)
                compile_order = compile_order[1:]
        if e2e is not None and compile_order:
            with report.stage("torch.compile"):
                run_compile(report, e2e.models, compile_order, args.quick)

    with report.stage("targets"):
        evaluate_targets(report)
    report.info["total seconds"] = round(time.monotonic() - report.start, 1)
    report.write()
    log(f"wrote {report.out_dir / 'gpu_check.md'} and gpu_check.json")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
