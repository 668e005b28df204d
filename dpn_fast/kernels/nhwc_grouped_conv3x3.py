"""Triton grouped 3x3 convolution (padding 1, stride 1 or 2) of channels-last rows, with a
bias + ReLU epilogue: out = relu(grouped_conv3x3(x, w) + bias), a DPN block's c3x3_b with
c1x1_c's BatchNorm folded into w and bias.

Rows as in nhwc_conv1x1.py: position (image, h, w) -> a row of channels, read and written
through row strides. The channels are laid out in *slots* (`slot_layout`): the groups are taken
`groups_per_program` at a time (a chunk: as many whole groups as fill 16, 32 or 64 tensor-core
lanes best), and each chunk sits in a slot whose width is a multiple of 8 channels, zero padded,
so every chunk starts 16-byte aligned (3-channel groups: 5 groups = 15 channels in a 16-channel
slot). Input and output rows use the same slots; the 1x1 convs around the grouped conv write
and read them directly (their weights get zero columns / rows for the padding), so no copy is
needed. Padding channels of the input must be finite (they meet zero weights); the output's are
written as zeros.

A program computes BLOCK_P output positions (flattened over the batch, so 7x7 images fill a tile
as well as 56x56 ones) of one chunk. The chunks of a position tile are neighbouring programs
(the fastest-varying program index), so a row is fetched from DRAM once and its other slots come
from L2. Each of the nine taps is one aligned [BLOCK_P, BLOCK_C] load of the input and one
tl.dot with a block-diagonal [BLOCK_C, BLOCK_C] weight tile: the chunk's groups side by side.
Narrow groups thus share one tensor-core tile; the zeros cost tensor-core work that these
memory-bound shapes have to spare.

Weights are packed once per layer by `pack_weights` into [chunks, 9, BLOCK_C, BLOCK_C] (numpy;
the caller moves them to the device in the activations' dtype). fp32 accumulation; fp32 inputs
use IEEE fp32 products (not TF32). bias fp32, in the slot layout. Framework-free like the other
launchers; nothing allocates or synchronises, so a launch can be captured in a CUDA graph.
"""
import os
from typing import NamedTuple

import numpy as np
import triton
import triton.language as tl

from dpn_fast.kernels._launch import NOTHING, VECTOR_ALIGN, Launch, alignment
from dpn_fast.kernels._rows import check_dtypes, check_rows
from dpn_fast.kernels._tiles import current_arch, lookup

# Decided when the kernels are decorated: @triton.jit reads TRITON_INTERPRET at that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

LANES = (16, 32, 64)  # tensor-core tile widths a chunk may use


# Sizes are not specialised on divisibility by 16 (ALIGN hints the row strides instead).
_SIZES = ["ROWS_OUT", "H", "W", "H_OUT", "W_OUT", "LDX", "LDO", "CHUNKS"]


@triton.jit(do_not_specialize=_SIZES)
def _grouped_conv3x3_kernel(x_ptr, w_ptr, bias_ptr, out_ptr,
                            ROWS_OUT, H, W, H_OUT, W_OUT, LDX, LDO, CHUNKS,
                            STRIDE: tl.constexpr, SLOT: tl.constexpr, PRECISION: tl.constexpr,
                            ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # The launcher checked that the row strides are multiples of ALIGN (and SLOT is a multiple
    # of 8): restated so the compiler emits aligned vector loads and stores.
    LDX = LDX // ALIGN * ALIGN
    LDO = LDO // ALIGN * ALIGN
    pid = tl.program_id(0)
    chunk = pid % CHUNKS
    m = (pid // CHUNKS) * BLOCK_P + tl.arange(0, BLOCK_P)  # output row
    m_ok = m < ROWS_OUT
    image_positions = H_OUT * W_OUT
    b = m // image_positions
    p = m % image_positions
    oh = p // W_OUT
    ow = p % W_OUT
    lane = tl.arange(0, BLOCK_C)
    lane_ok = lane < SLOT
    c = chunk * SLOT + lane  # the chunk's channels, in and out alike
    w_block = w_ptr + chunk * (9 * BLOCK_C * BLOCK_C)
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tap in range(9):
        ih = oh * STRIDE + (tap // 3 - 1)
        iw = ow * STRIDE + (tap % 3 - 1)
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row = (b * H + ih) * W + iw
        xv = tl.load(x_ptr + row.to(tl.int64)[:, None] * LDX + c[None, :],
                     mask=ok[:, None] & lane_ok[None, :], other=0.0)
        # Packed with zeros outside the chunk's groups and channels: no mask needed.
        wv = tl.load(w_block + tap * (BLOCK_C * BLOCK_C) + lane[:, None] * BLOCK_C + lane[None, :])
        acc = tl.dot(xv, wv.to(dtype), acc, input_precision=PRECISION)
    bias = tl.load(bias_ptr + c, mask=lane_ok, other=0.0)
    acc = tl.maximum(acc + bias[None, :], 0.0)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * LDO + c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & lane_ok[None, :])


class Tiles(NamedTuple):
    """block_p output positions by block_c channel lanes holding groups_per_program groups."""
    block_p: int
    block_c: int
    groups_per_program: int
    num_warps: int
    num_stages: int


def _round_up(x, multiple):
    return -(-x // multiple) * multiple


class Chunks(NamedTuple):
    """How a layer's groups are chunked: groups_per_program whole groups in block_c lanes."""
    block_c: int
    groups_per_program: int


def chunk_lanes(channels_per_group):
    """Chunks: the narrowest of 16, 32, 64 lanes whose whole groups fill >= 90% of their
    8-aligned slot (else the fullest): 3 channels a group -> 5 groups, 15 of a 16-channel slot;
    6 -> 5 groups, 30 of 32 (32 lanes); 12 -> 2 groups, 24 of 24 (32 lanes); 24 -> 24 of 24;
    48 -> 48 of 48 (64 lanes)."""
    if not 0 < channels_per_group <= LANES[-1]:
        raise ValueError(f"grouped_conv3x3_forward: {channels_per_group} channels a group; the "
                         f"kernel's tile holds 1 to {LANES[-1]}")
    fills = []
    for lanes in LANES:
        if lanes >= channels_per_group:
            channels = lanes // channels_per_group * channels_per_group
            fills.append((channels / _round_up(channels, VECTOR_ALIGN), lanes))
    block_c = next((lanes for fill, lanes in fills if fill >= 0.9),
                   max(fills, key=lambda f: (f[0], -f[1]))[1])
    return Chunks(block_c, block_c // channels_per_group)


def choose_tiles(channels_per_group, rows_out, half, interpret=False, arch=None):
    """Lanes and groups a program: chunk_lanes. Positions a program: the tile table's entry
    (tiles.json) for compute capability `arch` (default: the current device's); the CPU
    interpreter pays per program: one tile over every position."""
    block_c, per_program = chunk_lanes(channels_per_group)
    if interpret:
        return Tiles(min(1024, max(16, triton.next_power_of_2(rows_out))), block_c, per_program,
                     4, 1)
    entry = lookup("grouped_conv3x3", current_arch() if arch is None else arch, half,
                   rows=rows_out, lanes=block_c)
    return Tiles(entry["block_p"], block_c, per_program, entry["num_warps"],
                 entry["num_stages"])


def slot_layout(c, groups, tiles):
    """(columns, width): the row column of each of the c channels (numpy int64 [c]) and the
    width of a row (chunks * slot) in the slot layout the kernel reads and writes for `tiles`
    (Tiles or Chunks)."""
    cin_g = c // groups
    channels = tiles.groups_per_program * cin_g
    slot = _round_up(channels, VECTOR_ALIGN)
    chunk, lane = np.divmod(np.arange(c), channels)
    return chunk * slot + lane, -(-c // channels) * slot


def pack_weights(weight, groups, tiles):
    """[C, C // groups, 3, 3] (out, in, kh, kw) -> [chunks, 9, block_c, block_c]: per chunk and
    tap the block-diagonal (input lane, output lane) matrix of its groups, zero elsewhere (the
    slot's padding lanes included), for `tiles` (Tiles or Chunks). numpy in, numpy out (weight's
    dtype)."""
    weight = np.asarray(weight)
    c, cin_g = weight.shape[:2]
    if c % groups or weight.shape != (c, c // groups, 3, 3):
        raise ValueError(f"pack_weights: weight of shape {weight.shape} is not a grouped 3x3 "
                         f"conv of {groups} groups with as many outputs as inputs")
    channels = tiles.groups_per_program * cin_g
    chunks = -(-c // channels)
    packed = np.zeros((chunks, 9, tiles.block_c, tiles.block_c), dtype=weight.dtype)
    taps = weight.reshape(c, cin_g, 9)
    for out_channel in range(c):
        chunk, out_lane = divmod(out_channel, channels)
        group_lane = out_lane - out_lane % cin_g  # the group's first lane in the chunk
        packed[chunk, :, group_lane:group_lane + cin_g, out_lane] = taps[out_channel].T
    return packed


def grouped_conv3x3_forward(x, packed_w, bias, out, **kwargs):
    """out rows = relu(grouped_conv3x3(x rows) + bias), launched now:
    plan_grouped_conv3x3(...)(). Returns out."""
    plan_grouped_conv3x3(x, packed_w, bias, out, **kwargs)()
    return out


def plan_grouped_conv3x3(x, packed_w, bias, out, *, images, h, w, c, groups, stride, ldx, ldo,
                         tiles):
    """The checked launch (a Launch: call it to run) of out rows = relu(grouped_conv3x3(x rows)
    + bias), padding 1; out preallocated. Every argument is checked here, none when it runs.

    x: images * h * w rows of c channels in the slot layout (slot_layout(c, groups, tiles)),
    row stride ldx; out: images * h_out * w_out rows, h_out = ceil(h / stride), the same layout,
    row stride ldo. packed_w: pack_weights(w, groups, tiles) in x's dtype; tiles: the Tiles the
    weights were packed for. bias: fp32, the slot layout's width, zero in the padding.
    """
    name = "grouped_conv3x3_forward"
    if bias is None:  # check_dtypes skips absent optional tensors; this one is required
        raise TypeError(f"{name}: bias (fp32, the slot layout's width) is required")
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
    _, width = slot_layout(c, groups, tiles)
    if ldx < width or ldo < width:
        raise ValueError(f"{name}: row strides ldx={ldx}, ldo={ldo} are below the slot layout's "
                         f"width {width} ({c} channels)")
    check_rows(name, {"x": (x, ldx), "packed_w": (packed_w, tiles.block_c), "bias": (bias, None),
                         "out": (out, ldo)})
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    rows_out = images * h_out * w_out
    if rows_out == 0:
        return NOTHING
    channels = tiles.groups_per_program * cin_g
    chunks = -(-c // channels)
    grid = (triton.cdiv(rows_out, tiles.block_p) * chunks,)
    args = (x, packed_w, bias, out, rows_out, h, w, h_out, w_out, ldx, ldo, chunks)
    options = launch_options(stride, cin_g, dtype, alignment(ldx, ldo), tiles)
    return Launch(_grouped_conv3x3_kernel, grid, args, options, dtype)


def launch_options(stride, channels_per_group, dtype, align, tiles):
    """The kernel's constexprs and launch options (a Launch's options) for the stride, the group
    width, the activations' dtype name, ALIGN and the Tiles."""
    return dict(STRIDE=stride,
                SLOT=_round_up(tiles.groups_per_program * channels_per_group, VECTOR_ALIGN),
                PRECISION="ieee" if dtype == "float32" else "tf32", ALIGN=align,
                BLOCK_P=tiles.block_p, BLOCK_C=tiles.block_c, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)


# Channels a group compiled ahead of time: the DPNs' (DPN68 ... DPN131: 3 to 32) and 48, the
# 64-lane tile's. The kernel depends on them only through the chunk geometry (SLOT, BLOCK_C).
EMBEDDED_GROUP_WIDTHS = (3, 4, 6, 8, 12, 16, 24, 32, 48)


def embedded_variants(arch, dtype):
    """The launch options compiled ahead of time into the op library for a listed arch of the
    tile table and a dtype name: every distinct chunk geometry of EMBEDDED_GROUP_WIDTHS x stride
    1, 2 at the tiles choose_tiles gives it. ALIGN is VECTOR_ALIGN alone: rows in the slot
    layout are multiples of it wide."""
    variants = {}
    for width in EMBEDDED_GROUP_WIDTHS:
        tiles = choose_tiles(width, 1, dtype != "float32", arch=arch)
        for stride in (1, 2):
            options = launch_options(stride, width, dtype, VECTOR_ALIGN, tiles)
            variants[tuple(sorted(options.items()))] = options
    return list(variants.values())


def triton_signature(dt):
    """The kernel's parameters as Triton types for activations of Triton dtype `dt` ("fp16"):
    pointers, the i32 sizes (never specialised), the constexprs."""
    return {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": "*fp32", "out_ptr": f"*{dt}",
            **{name: "i32" for name in _SIZES},
            **{name: "constexpr" for name in ("STRIDE", "SLOT", "PRECISION", "ALIGN", "BLOCK_P",
                                              "BLOCK_C")}}


def _aot_specs():
    """fp32 and bf16, one group width per lane count at the GPU tiles: 3 channels at stride 2
    (5 groups in a 16-lane slot), 24 at stride 2 (32 lanes), 48 at stride 1 (64 lanes). fp16
    at DPN92's shapes, with the JIT's specialisation: tests/_triton_ptx.py."""
    specs = []
    for dt, precision in (("fp32", "ieee"), ("bf16", "tf32")):
        signature = triton_signature(dt)
        for cin_g, stride in ((3, 2), (24, 2), (48, 1)):
            t = choose_tiles(cin_g, 1 << 20, half=dt != "fp32", arch=AOT_MIN_CC)
            specs.append((_grouped_conv3x3_kernel, signature,
                          {"STRIDE": stride,
                           "SLOT": _round_up(t.groups_per_program * cin_g, VECTOR_ALIGN),
                           "PRECISION": precision, "ALIGN": VECTOR_ALIGN, "BLOCK_P": t.block_p,
                           "BLOCK_C": t.block_c},
                          {"num_warps": t.num_warps, "num_stages": t.num_stages}))
    return specs


AOT_MIN_CC = 80  # tensor-core kernels: sm_80+ (dpn_fast.torch refuses older cards)
AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
