"""One DPN stage's kernel launches as data: which kernel in which variant, its grid, and its
arguments as Regions of named buffers and weights plus the sizes and strides. Planned once per
input shape by `plan_stage`; a host binds the names to its memory and runs the launches: the
torch host (dpn_fast.engines.torch_host) through Triton's JIT, or any host through the op
library's embedded kernels (_abi.EmbeddedKernels.launch_planned) on the device's stream.

A stage keeps its activations as rows (position -> channels) in one buffer "stage" of
rows x row_stride(width) elements: the residual channels, then the dense ones appended block by
block. Per block: projection (first block; reads "input", the previous stage's rows), 1x1a
(into "bottleneck", the grouped conv's slot layout), grouped conv ("bottleneck" -> "grouped"),
1x1c (residual added in place, dense channels appended). Weight names are
"<block index in the stage>.<role>" (`weight_names`).
"""
from typing import NamedTuple

from dpn_fast.kernels import nhwc_conv1x1, nhwc_grouped_conv3x3
from dpn_fast.kernels._launch import VECTOR_ALIGN, Region


class StageBlock(NamedTuple):
    """A block's geometry as the kernels run it."""
    stride: int
    resid: int        # residual channels
    inc: int          # dense channels it appends
    bottleneck: int   # channels of 1x1a's output and the grouped conv
    groups: int
    slot_width: int   # width of the slot layout: 1x1a's output, the grouped conv's rows, 1x1c's K


class StagePlan(NamedTuple):
    launches: list   # Launches whose tensor arguments are Regions
    sizes: dict      # buffer name -> elements it must hold ("input", "stage", "bottleneck", ...)
    h: int           # output rows' image size
    w: int
    width: int       # output channels
    row_stride: int  # of the output rows


def row_stride(width):
    """Row stride of a stage buffer: its width rounded up to VECTOR_ALIGN channels, so every row
    starts 16-byte aligned at fp16 (the kernels' aligned variant)."""
    return -(-width // VECTOR_ALIGN) * VECTOR_ALIGN


def stage_width(blocks):
    """Channels of a stage's output: the first block's resid + 2 inc, then inc a block."""
    return blocks[0].resid + 2 * blocks[0].inc + sum(b.inc for b in blocks)


def weight_names(index, first):
    """The weight names of block `index` of a stage (the first has a projection)."""
    roles = (["projection.weight", "projection.in_scale", "projection.in_shift"] if first else [])
    roles += ["conv_a.weight", "conv_a.in_scale", "conv_a.in_shift", "conv_a.bias",
              "grouped.weight", "grouped.bias", "conv_c.weight"]
    return [f"{index}.{role}" for role in roles]


def plan_stage(blocks, images, h, w, in_width, in_stride, dtype, arch):
    """The StagePlan of a stage of `blocks` (StageBlocks, the first with a projection) on
    `images` x h x w input rows of in_width channels, row stride in_stride ("input"), for
    activations of `dtype` (a dtype name) on compute capability `arch` (None: the current
    device's, or the interpreter's tiles under TRITON_INTERPRET=1). Every launch is checked
    here."""
    gemm, grouped = nhwc_conv1x1, nhwc_grouped_conv3x3
    half = dtype != "float32"
    first = blocks[0]
    h_out, w_out = (h - 1) // first.stride + 1, (w - 1) // first.stride + 1
    rows_in, rows = images * h * w, images * h_out * w_out
    width = stage_width(blocks)
    ld = row_stride(width)

    def gemm_tiles(m, k, n):
        return gemm.choose_tiles(m, k, n, half, gemm.INTERPRETED, arch)

    def weight(index, role, size, kind=dtype):
        return Region(f"{index}.{role}", kind, size)

    source = Region("input", dtype, rows_in * in_stride)
    stage = Region("stage", dtype, rows * ld)
    n_proj = first.resid + 2 * first.inc
    launches = [gemm.plan_conv1x1(
        source, weight(0, "projection.weight", in_width * n_proj), stage, rows=rows, k=in_width,
        n=n_proj, lda=in_stride, ldo=ld, stride=first.stride, in_hw=(h, w),
        in_scale=weight(0, "projection.in_scale", in_width, "float32"),
        in_shift=weight(0, "projection.in_shift", in_width, "float32"),
        tiles=gemm_tiles(rows, in_width, n_proj))]
    sizes = {"input": rows_in * in_stride, "stage": rows * ld, "bottleneck": 0, "grouped": 0}
    dense = 2 * first.inc  # dense channels in the buffer so far
    for i, blk in enumerate(blocks):
        if i == 0:  # reads the previous stage's rows at their size
            a_src, a_k, a_ld, a_rows, a_hw = source, in_width, in_stride, rows_in, (h, w)
        else:
            a_src, a_k, a_ld, a_rows, a_hw = stage, blk.resid + dense, ld, rows, (h_out, w_out)
        r = blk.slot_width
        bottleneck = Region("bottleneck", dtype, a_rows * r)
        grouped_rows = Region("grouped", dtype, rows * r)
        sizes["bottleneck"] = max(sizes["bottleneck"], bottleneck.size)
        sizes["grouped"] = max(sizes["grouped"], grouped_rows.size)
        launches.append(gemm.plan_conv1x1(
            a_src, weight(i, "conv_a.weight", a_k * r), bottleneck, rows=a_rows, k=a_k, n=r,
            lda=a_ld, ldo=r, in_scale=weight(i, "conv_a.in_scale", a_k, "float32"),
            in_shift=weight(i, "conv_a.in_shift", a_k, "float32"),
            bias=weight(i, "conv_a.bias", r, "float32"), relu=True,
            tiles=gemm_tiles(a_rows, a_k, r)))
        cin_g = blk.bottleneck // blk.groups
        tiles = grouped.choose_tiles(cin_g, rows, half, grouped.INTERPRETED, arch)
        chunks = -(-blk.bottleneck // (tiles.groups_per_program * cin_g))
        launches.append(grouped.plan_grouped_conv3x3(
            bottleneck, weight(i, "grouped.weight", chunks * 9 * tiles.block_c ** 2),
            weight(i, "grouped.bias", r, "float32"), grouped_rows, images=images, h=a_hw[0],
            w=a_hw[1], c=blk.bottleneck, groups=blk.groups, stride=blk.stride, ldx=r, ldo=r,
            tiles=tiles))
        n_c = blk.resid + blk.inc
        launches.append(gemm.plan_conv1x1(
            grouped_rows, weight(i, "conv_c.weight", r * n_c), stage, rows=rows, k=r, n=n_c,
            lda=r, ldo=ld, split=blk.resid, dense_gap=dense, add_to_out=True,
            tiles=gemm_tiles(rows, r, n_c)))
        dense += blk.inc
    return StagePlan(launches, sizes, h_out, w_out, width, ld)


def plan_stages(stages, images, h, w, in_width, dtype, arch):
    """The StagePlans of consecutive stages (each a list of StageBlocks, as plan_stage takes),
    the first reading images x h x w rows of in_width channels packed (row stride in_width),
    each later one the previous one's output."""
    plans, in_stride = [], in_width
    for blocks in stages:
        plans.append(plan_stage(blocks, images, h, w, in_width, in_stride, dtype, arch))
        h, w, in_width, in_stride = plans[-1].h, plans[-1].w, plans[-1].width, \
            plans[-1].row_stride
    return plans
