"""Triton grouped 3x3 convolution (padding 1, stride 1 or 2) of channels-last rows, with a
bias + ReLU epilogue: out = relu(grouped_conv3x3(x, w) + bias), a DPN block's c3x3_b with
c1x1_c's BatchNorm folded into w and bias.

Rows as in nhwc_conv1x1.py: position (image, h, w) -> a row of C channels, read and
written through row strides. A program computes BLOCK_P output positions (flattened over the
batch, so 7x7 images fill a tile as well as 56x56 ones) by the channels of `groups_per_program`
consecutive groups. Those channels are contiguous in a row, so each of the nine taps is one
coalesced [BLOCK_P, BLOCK_C] load of the input (the tile of neighbouring positions is read from
L1/L2 by the other taps: Triton has no explicit shared memory, it stages dot operands itself)
and one tl.dot with a block-diagonal [BLOCK_C, BLOCK_C] weight tile: the program's groups side
by side. Narrow groups (3, 6 channels) thus share one tensor-core tile instead of padding each
group to 16; the zeros cost tensor-core work that these memory-bound shapes have to spare.

Weights are packed once per layer by `pack_weights` into [programs along C, 9, BLOCK_C, BLOCK_C]
(numpy; the caller moves them to the device in the activations' dtype). fp32 accumulation;
fp32 inputs use IEEE fp32 products (not TF32). bias fp32. Framework-free like the other
launchers; nothing allocates or synchronises, so a launch can be captured in a CUDA graph.
"""
import os
from typing import NamedTuple

import numpy as np
import triton
import triton.language as tl

from dpn_fast.kernels._rows import check_dtypes, check_rows

# Decided when the kernels are decorated: @triton.jit reads TRITON_INTERPRET at that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _grouped_conv3x3_kernel(x_ptr, w_ptr, bias_ptr, out_ptr,
                            ROWS_OUT, H, W, H_OUT, W_OUT, C, LDX, LDO,
                            STRIDE: tl.constexpr, CHANNELS: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    m = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output row
    m_ok = m < ROWS_OUT
    image_positions = H_OUT * W_OUT
    b = m // image_positions
    p = m % image_positions
    oh = p // W_OUT
    ow = p % W_OUT
    lane = tl.arange(0, BLOCK_C)
    c = tl.program_id(1) * CHANNELS + lane  # the program's channels, in and out alike
    c_ok = (lane < CHANNELS) & (c < C)
    w_block = w_ptr + tl.program_id(1) * (9 * BLOCK_C * BLOCK_C)
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tap in range(9):
        ih = oh * STRIDE + (tap // 3 - 1)
        iw = ow * STRIDE + (tap % 3 - 1)
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = (b * H + ih) * W + iw
        xv = tl.load(x_ptr + row.to(tl.int64)[:, None] * LDX + c[None, :],
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        # Packed with zeros outside the program's groups and channels: no mask needed.
        wv = tl.load(w_block + tap * (BLOCK_C * BLOCK_C) + lane[:, None] * BLOCK_C + lane[None, :])
        acc = tl.dot(xv, wv.to(dtype), acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0)
    acc = tl.maximum(acc + bias[None, :], 0.0)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * LDO + c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


class Tiles(NamedTuple):
    """block_p output positions by block_c channel lanes holding groups_per_program groups."""
    block_p: int
    block_c: int
    groups_per_program: int
    num_warps: int
    num_stages: int


def choose_tiles(channels_per_group, rows_out, half, interpret=False):
    """The narrowest tensor-core tile (16, 32 or 64 lanes) that holds a group, filled with as many
    whole groups as fit: 3 and 6 channels a group -> 5 and 2 groups in 16 lanes (94%, 75% used),
    12 -> 1 in 16, 24 -> 1 in 32, 48 -> 1 in 64. Positions a program: fp16/bf16 64 (32 with 64
    lanes), fp32 (IEEE products, no tensor cores) 32 (16 with 64 lanes): the most that compile
    without spilling for sm_80/sm_90. NOT yet timed on a GPU: benchmarks/gpu_check.py's sweep
    is the data to choose by."""
    if channels_per_group > 64:
        raise ValueError(f"grouped_conv3x3_forward: {channels_per_group} channels a group; the "
                         "kernel's tile holds at most 64")
    block_c = max(16, triton.next_power_of_2(channels_per_group))
    per_program = block_c // channels_per_group
    if interpret:  # the interpreter pays per program: one tile over every position
        return Tiles(min(1024, max(16, triton.next_power_of_2(rows_out))), block_c, per_program,
                     4, 1)
    block_p = 64 if half else 32
    return Tiles(block_p if block_c < 64 else block_p // 2, block_c, per_program, 4, 2)


def pack_weights(weight, groups, tiles):
    """[C, C // groups, 3, 3] (out, in, kh, kw) -> [programs along C, 9, block_c, block_c]: per
    program and tap the block-diagonal (input lane, output lane) matrix of its groups, zero
    elsewhere. numpy in, numpy out (weight's dtype)."""
    weight = np.asarray(weight)
    c, cin_g = weight.shape[:2]
    if c % groups or weight.shape != (c, c // groups, 3, 3):
        raise ValueError(f"pack_weights: weight of shape {weight.shape} is not a grouped 3x3 "
                         f"conv of {groups} groups with as many outputs as inputs")
    channels = tiles.groups_per_program * cin_g
    programs = -(-c // channels)
    packed = np.zeros((programs, 9, tiles.block_c, tiles.block_c), dtype=weight.dtype)
    taps = weight.reshape(c, cin_g, 9)
    for out_channel in range(c):
        program, out_lane = divmod(out_channel, channels)
        group_lane = out_lane - out_lane % cin_g  # the group's first lane in the program
        packed[program, :, group_lane:group_lane + cin_g, out_lane] = taps[out_channel].T
    return packed


def grouped_conv3x3_forward(x, packed_w, bias, out, *, images, h, w, c, groups, stride, ldx,
                            ldo, tiles):
    """out rows = relu(grouped_conv3x3(x rows) + bias), padding 1; out preallocated.

    x: images * h * w rows of c channels (row stride ldx); out: images * h_out * w_out rows,
    h_out = ceil(h / stride) (row stride ldo). packed_w: pack_weights(w, groups, tiles) in x's
    dtype; tiles: the Tiles the weights were packed for. bias: fp32 [c].
    """
    name = "grouped_conv3x3_forward"
    if bias is None:  # check_dtypes skips absent optional tensors; this one is required
        raise TypeError(f"{name}: bias (fp32 [c]) is required")
    dtype = check_dtypes(name, ("x", x), (("packed_w", packed_w), ("out", out)),
                         (("bias", bias),))
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2, got {stride}")
    if min(images, h, w) < 0 or c <= 0 or groups <= 0 or c % groups:
        raise ValueError(f"{name}: bad sizes images={images} h={h} w={w} c={c} groups={groups}")
    cin_g = c // groups
    if tiles.groups_per_program * cin_g > tiles.block_c or tiles.groups_per_program < 1:
        raise ValueError(f"{name}: {tiles.groups_per_program} groups of {cin_g} channels do not "
                         f"fit {tiles.block_c} lanes")
    if ldx < c or ldo < c:
        raise ValueError(f"{name}: row strides ldx={ldx}, ldo={ldo} are below c={c}")
    check_rows(name, {"x": (x, ldx), "packed_w": (packed_w, tiles.block_c), "bias": (bias, None),
                         "out": (out, ldo)})
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    rows_out = images * h_out * w_out
    if rows_out == 0:
        return out
    channels = tiles.groups_per_program * cin_g
    grid = (triton.cdiv(rows_out, tiles.block_p), triton.cdiv(c, channels))
    _grouped_conv3x3_kernel[grid](x, packed_w, bias, out, rows_out, h, w, h_out, w_out, c, ldx,
                                  ldo, STRIDE=stride, CHANNELS=channels,
                                  PRECISION="ieee" if dtype == "float32" else "tf32",
                                  BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c,
                                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def _aot_specs():
    """Per activation dtype, one group width per lane count at the GPU tiles: 3 channels at
    stride 2 (5 groups in 16 lanes), 24 at stride 2 (32 lanes), 48 at stride 1 (64 lanes)."""
    ints = ("ROWS_OUT", "H", "W", "H_OUT", "W_OUT", "C", "LDX", "LDO")
    specs = []
    for dt, precision in (("fp32", "ieee"), ("fp16", "tf32"), ("bf16", "tf32")):
        signature = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": "*fp32",
                     "out_ptr": f"*{dt}", **{name: "i32" for name in ints},
                     **{name: "constexpr" for name in ("STRIDE", "CHANNELS", "PRECISION",
                                                       "BLOCK_P", "BLOCK_C")}}
        for cin_g, stride in ((3, 2), (24, 2), (48, 1)):
            t = choose_tiles(cin_g, 1 << 20, half=dt != "fp32")
            specs.append((_grouped_conv3x3_kernel, signature,
                          {"STRIDE": stride, "CHANNELS": t.groups_per_program * cin_g,
                           "PRECISION": precision, "BLOCK_P": t.block_p, "BLOCK_C": t.block_c},
                          {"num_warps": t.num_warps, "num_stages": t.num_stages}))
    return specs


AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
AOT_MIN_CC = 80  # tensor-core kernels: sm_80+ (dpn_fast.torch refuses older cards)
