"""Triton eval forward of grouped 3x3 conv (padding 1) + folded BatchNorm + ReLU.

out = relu(conv(x', w_folded, stride, padding=1, groups) + bias), x' = x, or with the optional
input prologue x' = relu(x * in_scale + in_shift) per input channel (an eval BatchNorm + ReLU on
the input, applied to loaded pixels only: the zero padding pads x').

Two kernels, chosen per shape and dtype from the tile sweeps on an H100 (docs/gpu_check.md):
- FMA (fp32, and groups of fewer than 12 channels): one program computes a block of output
  channels of one group for a block of output positions of one image; each (input channel, tap)
  step is an outer product of a weight column and a row of shifted inputs.
- tl.dot (fp16/bf16 groups of 12+ channels, e.g. DPN92's stages 3-4): an implicit GEMM per group
  on tensor cores, M = output positions flattened over the batch (7x7 planes fill a tile as well
  as 56x56 ones), N = the group's output channels, K = (input channel, tap), the weights' own
  [C_OUT, CIN_G * 9] layout.
fp32 accumulation; folded weights, bias and in_scale/in_shift fp32. fp32 never goes through
tl.dot, so its results don't depend on TF32.

Framework-free: tensors are anything Triton accepts as a pointer argument; `out` is preallocated.
"""
import os
from typing import NamedTuple

import triton
import triton.language as tl


@triton.jit
def _grouped_conv_fma_kernel(x_ptr, w_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, out_ptr,
                             C, H, W, C_OUT, H_OUT, W_OUT, GROUPS, COUT_G,
                             STRIDE: tl.constexpr, CIN_G: tl.constexpr, IN_AFFINE: tl.constexpr,
                             BLOCK_OC: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_image_group = tl.program_id(0)
    b = (pid_image_group // GROUPS).to(tl.int64)
    g = pid_image_group % GROUPS
    oc = tl.program_id(1) * BLOCK_OC + tl.arange(0, BLOCK_OC)
    oc_mask = oc < COUT_G
    channel = g * COUT_G + oc
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < H_OUT * W_OUT
    oh = p // W_OUT
    ow = p % W_OUT

    acc = tl.zeros([BLOCK_OC, BLOCK_P], dtype=tl.float32)
    x_group = x_ptr + (b * C + g * CIN_G) * H * W
    for ic in range(C // GROUPS):  # a runtime bound: fully unrolled, wide groups spill
        x_channel = x_group + ic * H * W
        w_channel = w_ptr + (channel * CIN_G + ic) * 9
        if IN_AFFINE:
            in_scale = tl.load(in_scale_ptr + g * CIN_G + ic)
            in_shift = tl.load(in_shift_ptr + g * CIN_G + ic)
        for kh in tl.static_range(3):
            ih = oh * STRIDE + (kh - 1)
            row_ok = p_mask & (ih >= 0) & (ih < H)
            for kw in tl.static_range(3):
                iw = ow * STRIDE + (kw - 1)
                ok = row_ok & (iw >= 0) & (iw < W)
                xv = tl.load(x_channel + ih * W + iw, mask=ok, other=0.0).to(tl.float32)
                if IN_AFFINE:
                    xv = tl.where(ok, tl.maximum(xv * in_scale + in_shift, 0.0), 0.0)
                wv = tl.load(w_channel + kh * 3 + kw, mask=oc_mask, other=0.0).to(tl.float32)
                acc += wv[:, None] * xv[None, :]
    bias = tl.load(bias_ptr + channel, mask=oc_mask, other=0.0).to(tl.float32)
    acc = tl.maximum(acc + bias[:, None], 0.0)
    out_offsets = (b * C_OUT + channel[:, None]) * (H_OUT * W_OUT) + p[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=oc_mask[:, None] & p_mask[None, :])


@triton.jit
def _grouped_conv_dot_kernel(x_ptr, w_ptr, bias_ptr, in_scale_ptr, in_shift_ptr, out_ptr,
                             N, C, H, W, C_OUT, H_OUT, W_OUT, COUT_G,
                             STRIDE: tl.constexpr, CIN_G: tl.constexpr, IN_AFFINE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    g = tl.program_id(1)
    P = H_OUT * W_OUT
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # output position over the batch
    m_ok = m < N * P
    b = m // P
    p = m % P
    oh = p // W_OUT
    ow = p % W_OUT
    oc = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    oc_ok = oc < COUT_G
    channel = g * COUT_G + oc
    # int32 offsets (the launcher refuses tensors of 2^31 elements): per-element addresses and
    # masks are what limits the tile size, so they are kept narrow.
    x_image = (b * C + g * CIN_G) * (H * W)  # [BLOCK_M] the group's first input channel
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, CIN_G * 9, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (input channel, tap) within the group
        k_ok = k < CIN_G * 9
        ic = k // 9
        ih = oh[:, None] * STRIDE + ((k % 9) // 3 - 1)[None, :]
        iw = ow[:, None] * STRIDE + (k % 3 - 1)[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + (x_image[:, None] + ic[None, :] * (H * W) + ih * W + iw),
                    mask=a_ok, other=0.0)
        if IN_AFFINE:
            in_scale = tl.load(in_scale_ptr + g * CIN_G + ic, mask=k_ok, other=0.0)
            in_shift = tl.load(in_shift_ptr + g * CIN_G + ic, mask=k_ok, other=0.0)
            a = a.to(tl.float32) * in_scale[None, :] + in_shift[None, :]
            a = tl.where(a_ok, tl.maximum(a, 0.0), 0.0)
        wv = tl.load(w_ptr + channel[None, :] * (CIN_G * 9) + k[:, None],
                     mask=k_ok[:, None] & oc_ok[None, :], other=0.0)
        acc = tl.dot(a.to(dtype), wv.to(dtype), acc)
    bias = tl.load(bias_ptr + channel, mask=oc_ok, other=0.0).to(tl.float32)
    acc = tl.maximum(acc + bias[None, :], 0.0)
    out_offsets = (b[:, None] * C_OUT + channel[None, :]) * P + p[:, None]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & oc_ok[None, :])


class Tiles(NamedTuple):
    """A kernel and its tile. FMA: block_m output positions of one image by block_n output
    channels. dot: block_m positions over the batch by block_n channels, K in block_k chunks."""
    use_dot: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


def choose_tiles(cin_g, cout_g, n, image_positions, half, interpret=False):
    """From the H100 sweeps (docs/gpu_check.md): tl.dot pays from 12 input channels a group
    (K = 108) in fp16/bf16, in both forms and at batch 1 to 64, with 32-position tiles from 24
    channels and 16-wide K chunks up to 16; larger dot tiles spill (per-element addresses and
    masks). Narrower groups run faster as FMA outer products (3 and 6 channels: 1.5-3x ahead of
    tl.dot at batch 64 in the input-prologue form), whose block_n <= 16 keeps the accumulator in
    registers. image_positions: h_out * w_out (the dot kernel's M spans the n images)."""
    if half and cin_g >= 12:
        positions = n * image_positions
        block_m = min(32 if cin_g >= 24 else 64, max(16, triton.next_power_of_2(positions)))
        block_n = min(64, max(16, triton.next_power_of_2(cout_g)))
        return Tiles(True, block_m, block_n, 16 if cin_g <= 16 else 32, 4)
    # The CPU interpreter pays per program: fewer, larger programs there.
    block_p = min(triton.next_power_of_2(image_positions), 1024 if interpret else 128)
    return Tiles(False, block_p, min(triton.next_power_of_2(cout_g), 16), 1, 4)


def grouped_conv_bias_relu_forward(x, w_folded, bias, out, n, c, h, w, c_out, groups, stride,
                                   in_scale=None, in_shift=None, tiles=None):
    """out[n, c_out, h_out, w_out] = relu(grouped_conv3x3(x', w_folded) + bias); out preallocated.

    x' = relu(x * in_scale + in_shift) (fp32 [c] each) when in_scale is given, else x.
    tiles: a Tiles to use instead of choose_tiles' (tuning sweeps: benchmarks/gpu_nchw.py).
    """
    in_affine = in_scale is not None
    if in_affine != (in_shift is not None):
        raise ValueError("grouped_conv_bias_relu_forward: give both in_scale and in_shift or "
                         "neither")
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    if n * h_out * w_out == 0:
        return out
    cin_g, cout_g = c // groups, c_out // groups
    if tiles is None:
        tiles = choose_tiles(cin_g, cout_g, n, h_out * w_out, "float32" not in str(x.dtype),
                             os.environ.get("TRITON_INTERPRET") == "1")
    # Without the prologue the scale/shift pointers are never read: pass bias in their place.
    args = (x, w_folded, bias, in_scale if in_affine else bias, in_shift if in_affine else bias,
            out)
    if tiles.use_dot:
        if max(n * c * h * w, n * c_out * h_out * w_out) >= 2**31:
            raise ValueError(f"grouped_conv_bias_relu_forward (Triton): x {n}x{c}x{h}x{w} or its "
                             "output has 2^31 or more elements; the tl.dot kernel's offsets "
                             "are 32-bit")
        grid = (triton.cdiv(n * h_out * w_out, tiles.block_m), groups,
                triton.cdiv(cout_g, tiles.block_n))
        _grouped_conv_dot_kernel[grid](*args, n, c, h, w, c_out, h_out, w_out, cout_g,
                                       STRIDE=stride, CIN_G=cin_g, IN_AFFINE=in_affine,
                                       BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                                       BLOCK_K=tiles.block_k, num_warps=tiles.num_warps)
    else:
        grid = (n * groups, triton.cdiv(cout_g, tiles.block_n),
                triton.cdiv(h_out * w_out, tiles.block_m))
        _grouped_conv_fma_kernel[grid](*args, c, h, w, c_out, h_out, w_out, groups, cout_g,
                                       STRIDE=stride, CIN_G=cin_g, IN_AFFINE=in_affine,
                                       BLOCK_OC=tiles.block_n, BLOCK_P=tiles.block_m,
                                       num_warps=tiles.num_warps)
    return out


def _aot_specs():
    """(kernel, signature, constexprs, options) per kernel and dtype for tests/test_gpu_compile.py's
    ahead-of-time compile, at the launcher's GPU tiles: DPN92's widest group (24 channels) at
    stride 1 and 12 channels at stride 2, both with the input prologue, and its narrowest (3
    channels) at stride 2 without. The dot kernel is compiled for fp32 too (reachable through
    `tiles`)."""
    ints = ("C", "H", "W", "C_OUT", "H_OUT", "W_OUT")
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        pointers = {"x_ptr": f"*{dt}", "w_ptr": "*fp32", "bias_ptr": "*fp32",
                    "in_scale_ptr": "*fp32", "in_shift_ptr": "*fp32", "out_ptr": f"*{dt}"}
        fma = {**pointers, **{k: "i32" for k in (*ints, "GROUPS", "COUT_G")},
               **{k: "constexpr" for k in ("STRIDE", "CIN_G", "IN_AFFINE", "BLOCK_OC", "BLOCK_P")}}
        dot = {**pointers, **{k: "i32" for k in ("N", *ints, "COUT_G")},
               **{k: "constexpr" for k in ("STRIDE", "CIN_G", "IN_AFFINE", "BLOCK_M", "BLOCK_N",
                                            "BLOCK_K")}}
        for stride, cin_g, in_affine in ((1, 24, True), (2, 12, True), (2, 3, False)):
            shape = {"STRIDE": stride, "CIN_G": cin_g, "IN_AFFINE": in_affine}
            t = choose_tiles(cin_g, cin_g, 1, 1 << 20, half=False)
            specs.append((_grouped_conv_fma_kernel, fma,
                          {**shape, "BLOCK_OC": t.block_n, "BLOCK_P": t.block_m},
                          {"num_warps": t.num_warps}))
            if cin_g >= 12:
                t = choose_tiles(cin_g, cin_g, 1, 1 << 20, half=True)
                specs.append((_grouped_conv_dot_kernel, dot,
                              {**shape, "BLOCK_M": t.block_m, "BLOCK_N": t.block_n,
                               "BLOCK_K": t.block_k}, {"num_warps": t.num_warps}))
    return specs


AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
