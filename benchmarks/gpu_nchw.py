#!/usr/bin/env python3
"""GPU check of dpn_fast's NCHW kernels (csrc/*.cu through the C ABI of the Paddle-free library
`dpn_fast_kernels`, and the Triton kernels dpn_fast.kernels.dual_path_merge and
grouped_conv_bn_relu), on a machine with a CUDA GPU and torch, no Paddle:

    python3 benchmarks/gpu_nchw.py --out DIR [--quick]     # GPU, about 4 minutes
    python3 benchmarks/gpu_nchw.py --out DIR --dry-run     # CPU: everything a CPU can run

Stages (each recorded on its own; one failing never stops the others; a global time budget skips
what is left, with a note):
  build      the CMake target `dpn_fast_kernels` for the local card, loaded with ctypes
  correct    every kernel and backend vs a float64 torch reference at DPN92's shapes,
             fp32/fp16/bf16, forward and backward, NaN-poisoned outputs (gpu_common.compare)
  sanitize   compute-sanitizer memcheck of small cases (this script re-run with --sanitize-case)
  kernels    timings of each fused kernel vs the unfused torch sequence, batch 1/8/64
  sweep      the Triton NCHW conv's tile choices
Writes DIR/gpu_nchw.json and DIR/gpu_nchw.md. The channels-last forward that dpn_fast.torch runs
is benchmarks/gpu_check.py's. Details: docs/gpu_check.md.

Everything op-specific lives in the OP ADAPTERS section below (ctypes signatures, Triton launcher
calls, torch reference implementations).
"""
import argparse
import ctypes
import faulthandler
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}     # dpn_fast::DType (csrc/common.h)
EPS_OF = {"float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.9e-3}
# Share of the time budget by which each phase stops starting new work (the rest is skipped with
# a note). The correctness share also covers the build before it (~40 s on 2 CPU cores).
PHASE_END = {"correctness": 0.55, "convs": 0.72, "kernels": 0.82, "sweep": 0.95}

torch = F = None  # imported in main(), after TRITON_INTERPRET is settled
# gpu_common's names, bound in main() (it imports torch)
ATOL = ConvCase = BatchNormParams = Report = compare = conv_inputs = conv_unfused = None
guarded = log = nan_like = random_bn = randn = timed = copy_bandwidth = None


def bind_common():
    sys.path.insert(0, str(HERE))
    import gpu_common
    names = ("ATOL", "ConvCase", "BatchNormParams", "Report", "compare", "conv_inputs",
             "conv_unfused", "guarded", "log", "nan_like", "random_bn", "randn", "timed",
             "copy_bandwidth")
    globals().update({name: getattr(gpu_common, name) for name in names})
    gpu_common.import_checkout_dpn_fast()
    return gpu_common


def budget_report(out_dir, budget_s):
    """gpu_common.Report plus the time budget of this script's phases."""
    report = Report(out_dir, name="gpu_nchw", write_every_s=2.0,
                    summaries={"correctness": ("correctness (summary; every check in "
                                               "gpu_nchw.json)", _correctness_summary)})
    report.deadline = report.start + budget_s
    return report


def left(report):
    return report.deadline - time.monotonic()


def past(report, fraction):
    """True once `fraction` of the budget is spent (each phase has its share)."""
    return time.monotonic() - report.start > fraction * (report.deadline - report.start)

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


def dpn92_cases(config):
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
    return list(merges.values()), list(convs.values())



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




def small_cases():
    """Small odd shapes: odd and non-square sizes, 3-5 channels a group, stride 2, the merge's
    head-only and no-BN forms."""
    merges = [MergeCase("odd", 8, 5, 3, 7, 2), MergeCase("vec", 16, 8, 8, 8, 1),
              MergeCase("plain", 8, 4, 4, 5, 0), MergeCase("head", 12, 0, 0, 6, 2)]
    convs = [ConvCase("s1", 64, 32, 1, 9), ConvCase("s2", 64, 32, 2, 9),
             ConvCase("g3", 96, 32, 1, 5), ConvCase("odd-s2", 40, 8, 2, 7, w=5),
             ConvCase("odd-s1", 15, 5, 1, 6, w=13)]
    return merges, convs



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
# References: the unfused torch sequences (gpu_common has the conv's and the accuracy rule)
# =================================================================================================


def merge_unfused(resid, dense, y, bns):
    """slice / add / cat, then cat / BN / ReLU per head: the torch sequence the merge replaces."""
    if y is not None:
        r = resid.shape[1]
        resid_out, dense_out = resid + y[:, :r], torch.cat([dense, y[:, r:]], 1)
    else:
        resid_out, dense_out = resid, dense
    x = torch.cat([resid_out, dense_out], 1)
    return resid_out, dense_out, [bn.apply_relu(x) for bn in bns]



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
        if past(report, PHASE_END["correctness"]):
            report.note(f"correctness: budget reached, {len(jobs) - i} of {len(jobs)} cases"
                        " skipped")
            return
        op = "conv" if check is check_conv_case else "merge"
        guarded(report, section, f"{op}/{backend.name}/{case.label}/{dtype}",
                 check, backend, case, n, dtype, device, gen, report, section)


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
    quiet = Report(os.environ.get("TMPDIR", "/tmp") + "/dpn_fast_sanitize", write_every_s=60)
    small_merges, small_convs = small_cases()
    for dtype in (torch.float32, torch.float16):
        for backend in backends["merge"]:
            for case in small_merges:
                check_merge_case(backend, case, 2, dtype, device, gen, quiet, "s")
                _sync(device)
                log(f"sanitize-case merge/{backend.name}/{case.label}/{dtype} done")
        for backend in backends["conv"]:
            for case in small_convs:
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


def iters_for(n, quick):
    return max(20, {1: 200, 8: 100, 64: 30}.get(n, 10) // (4 if quick else 1))


def time_merges(report, backends, merges, batches, dtypes, device, quick, copy_gbs):
    gen = torch.Generator().manual_seed(2)
    for dtype in dtypes:
        for n in batches:
            for case in merges:
                if past(report, PHASE_END["kernels"]):
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
                row["unfused_ms"] = timed(report, unfused, iters=iters, graph=False)
                row["unfused_graph_ms"] = timed(report, unfused, iters=iters,
                                                graph=device == "cuda")
                best = None
                for backend in backends["merge"]:
                    def fused(b=backend):
                        b.forward(resid, dense, y, scale, shift, resid_out, dense_out, act,
                                  n, r, d, inc, hw * hw, acts)
                    row[f"{backend.name}_ms"] = timed(report, fused, iters=iters, graph=False)
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
                        ms = timed(report, fn, iters=iters, graph=device == "cuda")
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
                if past(report, PHASE_END["convs"]):
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
                row["cudnn_conv_bn_relu_ms"] = timed(report, unfused, iters=iters, graph=False)
                graph = device == "cuda"
                row["cudnn_conv_bn_relu_graph_ms"] = timed(report, unfused, iters=iters,
                                                           graph=graph)
                row["cudnn_folded_conv_relu_graph_ms"] = timed(report, folded, iters=iters,
                                                               graph=graph)
                # With the input's BN + ReLU too (DPN's c3x3_b head): the prologue form.
                in_bn = random_bn(case.c, gen, device)
                unfused_p = lambda: conv_unfused(in_bn.apply_relu(x), w_dt, bn, case.stride,  # noqa: E731
                                                 case.groups)
                row["cudnn_bn_relu_conv_bn_relu_graph_ms"] = timed(report, unfused_p, iters=iters,
                                                                    graph=graph)
                for backend in backends["conv"]:
                    w_prepared = backend.weight(w_folded, dtype)

                    def fused(b=backend, w=w_prepared):
                        b.forward(x, w, bias, out, n, case.c, case.hw, case.hw, case.c,
                                  case.groups, case.stride)
                    row[f"{backend.name}_ms"] = timed(report, fused, iters=iters, graph=False)
                    ms = timed(report, fused, iters=iters, graph=graph)
                    row[f"{backend.name}_graph_ms"] = ms
                    base = row["cudnn_conv_bn_relu_graph_ms"]
                    if ms and base:
                        row[f"{backend.name}_speedup"] = base / ms
                    if backend.has("prologue"):
                        state = backend.prepare_prologue(weight, in_bn, bn, dtype)

                        def fused_p(b=backend, state=state):
                            b.prologue(state, x, out, n, case.c, case.hw, case.hw, case.c,
                                       case.groups, case.stride)
                        ms = timed(report, fused_p, iters=iters, graph=graph)
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
                if past(report, PHASE_END["sweep"]):
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
                base = timed(report, unfused, iters=iters, graph=device == "cuda")
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
                    ms = timed(report, run, iters=iters, graph=device == "cuda")
                    row[f"{name} ms"] = ms
                    if ms and base:
                        row[f"{name} x"] = base / ms
                report.add("conv tile sweep (Triton, fp16)", row)




# =================================================================================================
# Targets
# =================================================================================================


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
    p.add_argument("--out", required=True, help="directory for gpu_nchw.json / .md / logs")
    p.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: imports, shapes, references, Triton under TRITON_INTERPRET=1, "
                        "the CUDA build and C ABI probe (where nvcc is present)")
    p.add_argument("--budget-s", type=float, default=240.0, help="global time budget (seconds)")
    p.add_argument("--build-dir", default=str(REPO / "build" / "gpu_nchw"))
    p.add_argument("--lib", help="prebuilt libdpn_fast_kernels.so (skips the build)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: "
                   "build,correct,sanitize,kernels,sweep")
    p.add_argument("--timing-dtypes", default="float16",
                   help="dtypes of the kernel timings (GPU)")
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
    common = bind_common()
    import dpn_fast
    from dpn_fast.kernels import grouped_conv_bn_relu
    skip = set(filter(None, args.skip.split(",")))
    small_merges, small_convs = small_cases()

    if args.sanitize_case:  # child under compute-sanitizer (--dry-run: the same cases on CPU)
        lib = ctypes.CDLL(args.lib) if args.lib else None
        device = "cpu" if args.dry_run else "cuda"
        backends = make_backends(lib, device)
        if args.dry_run:
            backends = {k: v + TORCH_ONLY()[k] for k, v in backends.items()}
        sanitize_cases(backends, device)
        return 0

    report = budget_report(args.out, args.budget_s)
    common.tee_output(report.out_dir / "gpu_nchw.log")
    # A hang (a kernel that never finishes) still leaves the partial report and a stack dump.
    faulthandler.dump_traceback_later(args.budget_s + 50, exit=True)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    report.info.update({"mode": "dry-run (CPU)" if args.dry_run
                                else ("quick" if args.quick else "full"),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "dpn_fast": str(Path(dpn_fast.__file__).parent),
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"})
    if device == "cpu" and not args.dry_run:
        report.note("no CUDA device: use --dry-run on a CPU machine")
        report.write()
        return 2
    # Exact references: no TF32 in the fp32 baselines (restored for the timings).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    merges, convs = dpn92_cases(common.load_model_config())
    report.info["DPN92 shapes"] = f"{len(merges)} merges, {len(convs)} grouped convs"
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

    dtypes = [torch.float16, torch.float32, torch.bfloat16]
    if "correct" not in skip:
        with report.stage("correctness"):
            if args.dry_run:
                # Kernels (Triton under the interpreter: slow, and wrong for bf16) on small odd
                # shapes in fp16/fp32; the torch references also at DPN92's real shapes.
                run_correctness(report, backends, small_merges, small_convs, dtypes[:2], 2, device)
                run_correctness(report, TORCH_ONLY(), merges[:3] + merges[-2:], convs,
                                [torch.float32], 1, device)
            else:
                run_correctness(report, backends,
                                (timed_merges if args.quick else merges) + small_merges,
                                convs + small_convs, dtypes, 2, device,
                                first=timed_merges + small_merges)
            for backend in backends["conv"]:
                if backend.has("bn_relu_backward"):
                    guarded(report, "correctness", f"conv/{backend.name}/bn-near-constant",
                            check_bn_backward_near_constant, backend, device, report,
                            "correctness")
            summarize_correctness(report)

    if sanitizer is not None:
        with report.stage("sanitize (wait)"):
            finish_sanitizer(report, sanitizer, timeout_s=min(180, left(report) - 60))

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
                             convs if device == "cuda" else small_convs[:1],
                             [1, 64] if device == "cuda" else [1], ["plain", "prologue"], device)

    with report.stage("targets"):
        evaluate_nchw_targets(report)
    report.info["total seconds"] = round(time.monotonic() - report.start, 1)
    report.write()
    log(f"wrote {report.out_dir / 'gpu_nchw.md'} and gpu_nchw.json")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
