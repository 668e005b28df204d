"""Triton kernels of the dual-path merge (maths in csrc/dual_path_merge.h).

Framework-free: launchers take tensor-like arguments (torch tensors, or Paddle tensors through
dpn_fast.ops._backend.triton_arg), PREALLOCATED contiguous outputs and plain ints. Activations are
fp32/fp16/bf16 (math in fp32); scale/shift are folded fp32 [num_acts, C]; act / g_act are
[num_acts, n, C, hw]. A missing optional tensor is None.

Per batch item the BN'd concat C = r + d + inc is three contiguous runs of the tensors involved:
resid (+ y's first r channels), the old dense channels, y's new dense channels. One program covers
BLOCK consecutive elements of one item's C * hw, so 7x7 and 14x14 planes fill programs like large
ones; each element's source is chosen with masks rather than branches, so every input element is
read once and every output written once. The run lengths are passed as ints (r * hw, ...), which
Triton specialises when they are multiples of 16: then the accesses vectorise.
"""
import triton
import triton.language as tl

_BLOCK = 1024
_WARPS = 4
_MAX_BATCH = 65535  # grid axis 1


@triton.jit
def _merge_forward_kernel(resid, dense, y, scale, shift, resid_out, dense_out, act,
                          N, HW, RHW, DHW, INCHW,
                          HAS_Y: tl.constexpr, NUM_ACTS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # element within the item's C * hw
    CHW = RHW + DHW + INCHW
    m = e < CHW
    in_resid = e < RHW
    in_dense = (e >= RHW) & (e < RHW + DHW)
    in_new = e >= RHW + DHW
    k = e - RHW  # element within dense_out
    x = tl.load(resid + b * RHW + e, mask=m & in_resid, other=0.0).to(tl.float32)
    x += tl.load(dense + b * DHW + k, mask=m & in_dense, other=0.0).to(tl.float32)
    if HAS_Y:
        y_item = y + b * (RHW + INCHW)
        x += tl.load(y_item + e, mask=m & in_resid, other=0.0).to(tl.float32)
        x += tl.load(y_item + (e - DHW), mask=m & in_new, other=0.0).to(tl.float32)
        out_ty = resid_out.dtype.element_ty
        tl.store(resid_out + b * RHW + e, x.to(out_ty), mask=m & in_resid)
        tl.store(dense_out + b * (DHW + INCHW) + k, x.to(out_ty), mask=m & ~in_resid)
        x = x.to(out_ty).to(tl.float32)  # BN sees the rounded merge, as in the unfused sequence
    c = e // HW
    C = CHW // HW
    for a in tl.static_range(NUM_ACTS):
        s = tl.load(scale + a * C + c, mask=m, other=0.0)
        t = tl.load(shift + a * C + c, mask=m, other=0.0)
        v = x * s + t
        v = tl.where(v > 0.0, v, 0.0)
        tl.store(act + (a * N + b) * CHW + e, v.to(act.dtype.element_ty), mask=m)


@triton.jit
def _merge_backward_kernel(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift,
                           g_resid, g_dense, g_y, N, HW, RHW, DHW, INCHW,
                           HAS_Y: tl.constexpr, HAS_G_OUT: tl.constexpr, NUM_ACTS: tl.constexpr,
                           BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    CHW = RHW + DHW + INCHW
    m = e < CHW
    in_resid = e < RHW
    in_dense = (e >= RHW) & (e < RHW + DHW)
    in_new = e >= RHW + DHW
    resid_off = b * RHW + e
    dense_off = b * (DHW + INCHW) + (e - RHW)  # in the forward's dense_out (old + new)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_G_OUT:
        g += tl.load(g_resid_out + resid_off, mask=m & in_resid, other=0.0).to(tl.float32)
        g += tl.load(g_dense_out + dense_off, mask=m & ~in_resid, other=0.0).to(tl.float32)
    if NUM_ACTS > 0:
        x = tl.load(x_resid + resid_off, mask=m & in_resid, other=0.0).to(tl.float32)
        x += tl.load(x_dense + dense_off, mask=m & ~in_resid, other=0.0).to(tl.float32)
        c = e // HW
        C = CHW // HW
        for a in tl.static_range(NUM_ACTS):
            s = tl.load(scale + a * C + c, mask=m, other=0.0)
            t = tl.load(shift + a * C + c, mask=m, other=0.0)
            ga = tl.load(g_act + (a * N + b) * CHW + e, mask=m, other=0.0)
            g += tl.where(x * s + t > 0.0, ga.to(tl.float32) * s, 0.0)
    out_ty = g_resid.dtype.element_ty
    tl.store(g_resid + resid_off, g.to(out_ty), mask=m & in_resid)
    tl.store(g_dense + b * DHW + (e - RHW), g.to(out_ty), mask=m & in_dense)
    if HAS_Y:
        y_item = g_y + b * (RHW + INCHW)
        tl.store(y_item + e, g.to(out_ty), mask=m & in_resid)
        tl.store(y_item + (e - DHW), g.to(out_ty), mask=m & in_new)


def _launch(n, r, d, inc, hw):
    """Grid and the run lengths: one program per BLOCK elements of one batch item."""
    if n > _MAX_BATCH:
        raise ValueError(f"dual_path_merge (Triton): batch {n} exceeds {_MAX_BATCH}")
    return (triton.cdiv((r + d + inc) * hw, _BLOCK), n), (hw, r * hw, d * hw, inc * hw)


def merge_forward(resid, dense, y, scale, shift, resid_out, dense_out, act, n, r, d, inc, hw,
                  num_acts):
    """Writes resid_out/dense_out (when y is given) and act[a] for a < num_acts."""
    if n * hw == 0:
        return
    grid, runs = _launch(n, r, d, inc, hw)
    # Absent tensors are never dereferenced (masked or compiled out); pass a live pointer.
    fill = resid
    _merge_forward_kernel[grid](
        resid, dense, y if y is not None else fill, scale if num_acts else fill,
        shift if num_acts else fill, resid_out if y is not None else fill,
        dense_out if y is not None else fill, act if num_acts else fill,
        n, *runs, HAS_Y=y is not None, NUM_ACTS=num_acts, BLOCK=_BLOCK, num_warps=_WARPS)


def merge_backward(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift, g_resid,
                   g_dense, g_y, n, r, d, inc, hw, num_acts):
    """Writes g_resid, g_dense and (when g_y is given) g_y. g_resid_out/g_dense_out are both
    given or both None; x_resid/x_dense/g_act/scale/shift are read when num_acts > 0."""
    if n * hw == 0:
        return
    grid, runs = _launch(n, r, d, inc, hw)
    fill = g_resid
    has_g_out = g_resid_out is not None and g_dense_out is not None
    _merge_backward_kernel[grid](
        x_resid if num_acts else fill, x_dense if num_acts else fill,
        g_resid_out if has_g_out else fill, g_dense_out if has_g_out else fill,
        g_act if num_acts else fill, scale if num_acts else fill, shift if num_acts else fill,
        g_resid, g_dense, g_y if g_y is not None else fill, n, *runs,
        HAS_Y=g_y is not None, HAS_G_OUT=has_g_out, NUM_ACTS=num_acts, BLOCK=_BLOCK,
        num_warps=_WARPS)


def _aot_specs():
    """(kernel, signature, constexprs, options) per dtype at the launchers' BLOCK and warps, with
    both BN outputs, with and without y, for tests/test_gpu_compile.py's ahead-of-time compile."""
    ints = {name: "i32" for name in ("N", "HW", "RHW", "DHW", "INCHW")}
    block, options = _BLOCK, {"num_warps": _WARPS}
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        act, par = f"*{dt}", "*fp32"
        forward = {"resid": act, "dense": act, "y": act, "scale": par, "shift": par,
                   "resid_out": act, "dense_out": act, "act": act, **ints,
                   "HAS_Y": "constexpr", "NUM_ACTS": "constexpr", "BLOCK": "constexpr"}
        backward = {"x_resid": act, "x_dense": act, "g_resid_out": act, "g_dense_out": act,
                    "g_act": act, "scale": par, "shift": par, "g_resid": act, "g_dense": act,
                    "g_y": act, **ints, "HAS_Y": "constexpr", "HAS_G_OUT": "constexpr",
                    "NUM_ACTS": "constexpr", "BLOCK": "constexpr"}
        for has_y in (True, False):
            specs.append((_merge_forward_kernel, forward,
                          {"HAS_Y": has_y, "NUM_ACTS": 2, "BLOCK": block}, options))
        specs.append((_merge_backward_kernel, backward,
                      {"HAS_Y": True, "HAS_G_OUT": True, "NUM_ACTS": 2, "BLOCK": block}, options))
    return specs


AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
