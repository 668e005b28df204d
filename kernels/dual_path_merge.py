"""Triton kernels of the dual-path merge (maths in csrc/dual_path_merge.h).

Framework-free: launchers take tensor-like arguments (torch tensors, or Paddle tensors through
dpn_fast.ops._backend.triton_arg), PREALLOCATED contiguous outputs and plain ints. Activations are
fp32/fp16/bf16 (math in fp32); scale/shift are folded fp32 [num_acts, C]; act / g_act are
[num_acts, n, C, hw]. A missing optional tensor is None.

One program covers BLOCK elements of one (batch, channel) plane of the concat
C = r + d + inc: each channel comes from exactly one source (resid + y, dense, or y), chosen with
masks rather than branches, so every input element is read once and every output written once.
"""
import triton
import triton.language as tl

_BLOCK_MAX = 1024


@triton.jit
def _merge_forward_kernel(resid, dense, y, scale, shift, resid_out, dense_out, act,
                          N, R, D, INC, HW,
                          HAS_Y: tl.constexpr, NUM_ACTS: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    C = R + D + INC
    b = plane // C
    c = plane % C
    k = c - R  # channel within dense_out
    # Masks from a block-shaped copy of c (the interpreter rejects scalar & block bool masks).
    c_blk = c + tl.zeros([BLOCK], tl.int64)
    in_resid = c_blk < R
    in_dense = (c_blk >= R) & (c_blk < R + D)
    x = tl.load(resid + (b * R + c) * HW + offs, mask=m & in_resid, other=0.0).to(tl.float32)
    x += tl.load(dense + (b * D + k) * HW + offs, mask=m & in_dense, other=0.0).to(tl.float32)
    if HAS_Y:
        y_channel = tl.where(in_resid, c, R + k - D)
        x += tl.load(y + (b * (R + INC) + y_channel) * HW + offs, mask=m & ~in_dense,
                     other=0.0).to(tl.float32)
        out_ty = resid_out.dtype.element_ty
        tl.store(resid_out + (b * R + c) * HW + offs, x.to(out_ty), mask=m & in_resid)
        tl.store(dense_out + (b * (D + INC) + k) * HW + offs, x.to(out_ty), mask=m & ~in_resid)
        x = x.to(out_ty).to(tl.float32)  # BN sees the rounded merge, as in the unfused sequence
    for a in tl.static_range(NUM_ACTS):
        s = tl.load(scale + a * C + c)
        t = tl.load(shift + a * C + c)
        v = x * s + t
        v = tl.where(v > 0.0, v, 0.0)
        dst = act + (a * N * C + plane) * HW + offs
        tl.store(dst, v.to(act.dtype.element_ty), mask=m)


@triton.jit
def _merge_backward_kernel(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift,
                           g_resid, g_dense, g_y, N, R, D, INC, HW,
                           HAS_Y: tl.constexpr, HAS_G_OUT: tl.constexpr, NUM_ACTS: tl.constexpr,
                           BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HW
    C = R + D + INC
    b = plane // C
    c = plane % C
    k = c - R
    c_blk = c + tl.zeros([BLOCK], tl.int64)
    in_resid = c_blk < R
    in_dense = (c_blk >= R) & (c_blk < R + D)
    resid_off = (b * R + c) * HW + offs
    dense_off = (b * (D + INC) + k) * HW + offs
    g = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_G_OUT:
        g += tl.load(g_resid_out + resid_off, mask=m & in_resid, other=0.0).to(tl.float32)
        g += tl.load(g_dense_out + dense_off, mask=m & ~in_resid, other=0.0).to(tl.float32)
    if NUM_ACTS > 0:
        x = tl.load(x_resid + resid_off, mask=m & in_resid, other=0.0).to(tl.float32)
        x += tl.load(x_dense + dense_off, mask=m & ~in_resid, other=0.0).to(tl.float32)
        for a in tl.static_range(NUM_ACTS):
            s = tl.load(scale + a * C + c)
            t = tl.load(shift + a * C + c)
            ga = tl.load(g_act + (a * N * C + plane) * HW + offs, mask=m, other=0.0)
            g += tl.where(x * s + t > 0.0, ga.to(tl.float32) * s, 0.0)
    out_ty = g_resid.dtype.element_ty
    tl.store(g_resid + resid_off, g.to(out_ty), mask=m & in_resid)
    tl.store(g_dense + (b * D + k) * HW + offs, g.to(out_ty), mask=m & in_dense)
    if HAS_Y:
        y_channel = tl.where(in_resid, c, R + k - D)
        tl.store(g_y + (b * (R + INC) + y_channel) * HW + offs, g.to(out_ty), mask=m & ~in_dense)


def _launch(n, channels, hw):
    """Grid, BLOCK and warps: one program per (plane, BLOCK elements), ~4 elements a thread."""
    block = min(_BLOCK_MAX, triton.next_power_of_2(max(hw, 1)))
    return (n * channels, triton.cdiv(hw, block)), block, max(1, min(8, block // 128))


def merge_forward(resid, dense, y, scale, shift, resid_out, dense_out, act, n, r, d, inc, hw,
                  num_acts):
    """Writes resid_out/dense_out (when y is given) and act[a] for a < num_acts."""
    if n * hw == 0:
        return
    grid, block, warps = _launch(n, r + d + inc, hw)
    # Absent tensors are never dereferenced (masked or compiled out); pass a live pointer.
    fill = resid
    _merge_forward_kernel[grid](
        resid, dense, y if y is not None else fill, scale if num_acts else fill,
        shift if num_acts else fill, resid_out if y is not None else fill,
        dense_out if y is not None else fill, act if num_acts else fill,
        n, r, d, inc, hw, HAS_Y=y is not None, NUM_ACTS=num_acts, BLOCK=block, num_warps=warps)


def merge_backward(x_resid, x_dense, g_resid_out, g_dense_out, g_act, scale, shift, g_resid,
                   g_dense, g_y, n, r, d, inc, hw, num_acts):
    """Writes g_resid, g_dense and (when g_y is given) g_y. g_resid_out/g_dense_out are both
    given or both None; x_resid/x_dense/g_act/scale/shift are read when num_acts > 0."""
    if n * hw == 0:
        return
    grid, block, warps = _launch(n, r + d + inc, hw)
    fill = g_resid
    has_g_out = g_resid_out is not None and g_dense_out is not None
    _merge_backward_kernel[grid](
        x_resid if num_acts else fill, x_dense if num_acts else fill,
        g_resid_out if has_g_out else fill, g_dense_out if has_g_out else fill,
        g_act if num_acts else fill, scale if num_acts else fill, shift if num_acts else fill,
        g_resid, g_dense, g_y if g_y is not None else fill, n, r, d, inc, hw,
        HAS_Y=g_y is not None, HAS_G_OUT=has_g_out, NUM_ACTS=num_acts, BLOCK=block,
        num_warps=warps)


def _aot_specs():
    """(kernel, signature, constexprs, options) per dtype at the largest BLOCK (and its warps) with
    both BN outputs, with and without y, for tests/test_gpu_compile.py's ahead-of-time compile."""
    ints = {name: "i32" for name in ("N", "R", "D", "INC", "HW")}
    _, block, warps = _launch(1, 1, _BLOCK_MAX)
    options = {"num_warps": warps}
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
