"""Triton 1x1 convolution of channels-last rows as a GEMM with a DPN block's prologue and epilogues.

Activations are rows: position (image, h, w) -> one row of channels, `[rows, channels]` read and
written through a row stride, so a GEMM can read a prefix of a wider buffer (a DPN stage buffer's
resid | dense channels) and write into a column range of one, with no copy and no concat.

    out[m, col(j)] = epilogue(sum_k prologue(a[row(m), k]) * w[k, j])

- prologue (optional): relu(a * in_scale[k] + in_shift[k]), an eval BatchNorm + ReLU of the
  input channels applied to the A tiles as they are loaded (no activation tensor is written);
- row(m): m, or for stride s the output position's input row (b, s * oh, s * ow): a 1x1 conv of
  stride s is a row gather;
- epilogue: + bias[j] (optional), ReLU (optional); columns j < split go to out column j, and
  with add_to_out are added to what out holds there (a residual add in place); columns
  j >= split go to out column j + dense_gap (a DPN block's new dense channels, appended behind
  the stage's existing ones).

tl.dot with fp32 accumulation (wgmma on Hopper, mma on Ampere). fp32 inputs use IEEE fp32
products (not TF32), so fp32 results compare exactly across cards. Weights are [K, N] row-major
in the activations' dtype; in_scale / in_shift / bias fp32. Framework-free: tensors are anything
Triton accepts as a pointer argument (a torch view's data_ptr includes its offset); outputs are
preallocated; nothing allocates or synchronises, so a launch can be captured in a CUDA graph.
"""
import os
from typing import NamedTuple

import triton
import triton.language as tl

from dpn_fast.kernels._launch import NOTHING, VECTOR_ALIGN, Launch, alignment
from dpn_fast.kernels._rows import check_dtypes, check_rows
from dpn_fast.kernels._tiles import current_arch, entries, lookup

# Decided when the kernels are decorated: @triton.jit reads TRITON_INTERPRET at that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Not specialised on divisibility by 16: sizes are hinted through ALIGN (which the host checks)
# instead, so one compiled variant serves every batch size and block of a stage.
_SIZES = ["M", "K", "N", "LDA", "LDO", "H", "W", "H_OUT", "W_OUT", "SPLIT", "DENSE_GAP"]


@triton.jit
def _k_step(acc, a_rows, w_ptr, in_scale_ptr, in_shift_ptr, k, K, N, j, j_ok,
            IN_AFFINE: tl.constexpr, MASK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += prologue(a[:, k]) @ w[k, j]. MASK_K: the last, partial K step; the main loop's
    steps lie inside K and load without a K mask."""
    dtype = a_rows.dtype.element_ty
    if MASK_K:
        k_ok = k < K
        a = tl.load(a_rows + k[None, :], mask=k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & j_ok[None, :]
    else:
        a = tl.load(a_rows + k[None, :])
        w_mask = j_ok[None, :]
    if IN_AFFINE:
        if MASK_K:  # columns past K get scale = shift = 0, so they stay 0 after the ReLU
            in_scale = tl.load(in_scale_ptr + k, mask=k_ok, other=0.0)
            in_shift = tl.load(in_shift_ptr + k, mask=k_ok, other=0.0)
        else:
            in_scale = tl.load(in_scale_ptr + k)
            in_shift = tl.load(in_shift_ptr + k)
        a = tl.maximum(a.to(tl.float32) * in_scale[None, :] + in_shift[None, :], 0.0).to(dtype)
    wv = tl.load(w_ptr + k[:, None] * N + j[None, :], mask=w_mask, other=0.0)
    return tl.dot(a, wv, acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=_SIZES)
def _conv1x1_kernel(a_ptr, w_ptr, in_scale_ptr, in_shift_ptr, bias_ptr, out_ptr,
                    M, K, N, LDA, LDO, H, W, H_OUT, W_OUT, SPLIT, DENSE_GAP,
                    STRIDE: tl.constexpr, IN_AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RELU: tl.constexpr, ADD_TO_OUT: tl.constexpr, PRECISION: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The launcher checked that these are multiples of ALIGN; restated so the compiler knows it
    # (vectorised loads and stores, cp.async / TMA pipelining of the K loop).
    K = K // ALIGN * ALIGN
    N = N // ALIGN * ALIGN
    LDA = LDA // ALIGN * ALIGN
    LDO = LDO // ALIGN * ALIGN
    SPLIT = SPLIT // ALIGN * ALIGN
    DENSE_GAP = DENSE_GAP // ALIGN * ALIGN
    # Programs walk GROUP_M row tiles per column sweep, so a group's A tiles stay in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    j_ok = j < N
    # Rows past M read row M - 1 (never stored): A loads need no row mask.
    m_in = tl.minimum(m, M - 1)
    if STRIDE == 1:
        a_row = m_in
    else:
        image_positions = H_OUT * W_OUT
        b = m_in // image_positions
        p = m_in % image_positions
        a_row = (b * H + (p // W_OUT) * STRIDE) * W + (p % W_OUT) * STRIDE
    a_rows = a_ptr + a_row.to(tl.int64)[:, None] * LDA

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_main = K // BLOCK_K * BLOCK_K
    for k0 in range(0, k_main, BLOCK_K):
        acc = _k_step(acc, a_rows, w_ptr, in_scale_ptr, in_shift_ptr, k0 + tl.arange(0, BLOCK_K),
                      K, N, j, j_ok, IN_AFFINE, False, PRECISION)
    if k_main < K:
        acc = _k_step(acc, a_rows, w_ptr, in_scale_ptr, in_shift_ptr,
                      k_main + tl.arange(0, BLOCK_K), K, N, j, j_ok, IN_AFFINE, True, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + j, mask=j_ok, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    # Columns < SPLIT land at their own index, the rest DENSE_GAP further: two contiguous stores.
    resid = m_ok[:, None] & (j < SPLIT)[None, :]
    dense = m_ok[:, None] & (j_ok & (j >= SPLIT))[None, :]
    out_ptrs = out_ptr + m.to(tl.int64)[:, None] * LDO + j[None, :]
    if ADD_TO_OUT:
        acc += tl.load(out_ptrs, mask=resid, other=0.0).to(tl.float32)
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, y, mask=resid)
    tl.store(out_ptrs + DENSE_GAP, y, mask=dense)


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def choose_tiles(rows, k, n, half, interpret=False, arch=None):
    """GPU: the tile table's entry (tiles.json, dpn_fast/kernels/_tiles.py) for compute
    capability `arch` (default: the current device's), the dtype class and the shape (small row
    counts get small row tiles, so a batch of 1 still spreads over the SMs). The CPU
    interpreter pays per program and per K step: one large tile where the shape allows."""
    if interpret:
        cap = 256
        return Tiles(min(cap, max(16, triton.next_power_of_2(rows))),
                     min(cap, max(16, triton.next_power_of_2(n))),
                     min(cap, max(16, triton.next_power_of_2(k))), 1, 4, 1)
    return Tiles(**lookup("conv1x1", current_arch() if arch is None else arch, half, rows=rows,
                          k=k, n=n))


def conv1x1_forward(a, w, out, **kwargs):
    """out rows = epilogue(prologue(a rows) @ w), launched now: plan_conv1x1(...)(). Returns
    out."""
    plan_conv1x1(a, w, out, **kwargs)()
    return out


def plan_conv1x1(a, w, out, *, rows, k, n, lda, ldo, stride=1, in_hw=None, in_scale=None,
                 in_shift=None, bias=None, relu=False, split=None, dense_gap=0, add_to_out=False,
                 tiles=None):
    """The checked launch (a Launch: call it to run) of out rows = epilogue(prologue(a rows) @ w);
    see the module docstring. Every argument is checked here, none when it runs.

    a: input rows, row stride lda (>= k); for stride > 1, the rows of images of in_hw = (h, w)
    positions. rows: output rows (for stride s: images * ceil(h / s) * ceil(w / s)). w: [k, n].
    out: output rows, row stride ldo. split (default n) and dense_gap place the output columns;
    add_to_out adds columns < split to out's values. tiles: default choose_tiles(...) for the
    current device. rows == 0 gives a launch that does nothing.
    """
    name = "conv1x1_forward"
    dtype = check_dtypes(name, ("a", a), (("w", w), ("out", out)),
                         (("in_scale", in_scale), ("in_shift", in_shift), ("bias", bias)))
    if (in_scale is None) != (in_shift is None):
        raise ValueError(f"{name}: give both in_scale and in_shift or neither")
    split = n if split is None else split
    if min(rows, k, n) < 0 or min(k, n) == 0 or not 0 <= split <= n or dense_gap < 0:
        raise ValueError(f"{name}: bad sizes rows={rows} k={k} n={n} split={split} "
                         f"dense_gap={dense_gap}")
    widest_col = split if split == n else n + dense_gap
    if lda < k or ldo < widest_col:
        raise ValueError(f"{name}: row strides lda={lda} < k={k} or ldo={ldo} < the widest "
                         f"output column {widest_col}")
    if stride < 1:
        raise ValueError(f"{name}: stride must be >= 1, got {stride}")
    if stride > 1:
        if in_hw is None:
            raise ValueError(f"{name}: stride {stride} needs in_hw = (h, w) of the input images")
        h, w_in = in_hw
        h_out, w_out = (h - 1) // stride + 1, (w_in - 1) // stride + 1
        if rows % (h_out * w_out):
            raise ValueError(f"{name}: rows={rows} is not a whole number of {h_out}x{w_out} "
                             "output images")
    else:
        h = w_in = h_out = w_out = 1
    check_rows(name, {"a": (a, lda), "w": (w, n), "out": (out, ldo),
                         **{label: (t, None) for label, t in (("in_scale", in_scale),
                                                              ("in_shift", in_shift),
                                                              ("bias", bias)) if t is not None}})
    if rows == 0:
        return NOTHING
    if tiles is None:
        tiles = choose_tiles(rows, k, n, dtype != "float32", INTERPRETED)
    # Unused pointer arguments get `w`: never read (their constexpr flag is off).
    grid = (triton.cdiv(rows, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    args = (a, w, w if in_scale is None else in_scale, w if in_shift is None else in_shift,
            w if bias is None else bias, out, rows, k, n, lda, ldo, h, w_in, h_out, w_out, split,
            dense_gap)
    form = Form(stride, in_scale is not None, bias is not None, relu, add_to_out)
    options = launch_options(form, dtype, alignment(k, n, lda, ldo, split, dense_gap), tiles)
    return Launch(_conv1x1_kernel, grid, args, options, dtype)


class Form(NamedTuple):
    """What a launch computes besides the GEMM: the kernel's flags."""
    stride: int
    in_affine: bool
    has_bias: bool
    relu: bool
    add_to_out: bool


# The forms a DPN block launches (dpn_fast.engines.torch_host): a stage's projection at stride 1
# and 2 (BN + ReLU prologue), 1x1a (prologue, bias + ReLU epilogue), 1x1c (residual add in place).
BLOCK_FORMS = (Form(1, True, False, False, False), Form(2, True, False, False, False),
               Form(1, True, True, True, False), Form(1, False, False, False, True))


def launch_options(form, dtype, align, tiles):
    """The kernel's constexprs and launch options (a Launch's options) for a Form, the
    activations' dtype name, ALIGN and the Tiles."""
    return dict(STRIDE=form.stride, IN_AFFINE=form.in_affine, HAS_BIAS=form.has_bias,
                RELU=form.relu, ADD_TO_OUT=form.add_to_out,
                PRECISION="ieee" if dtype == "float32" else "tf32", ALIGN=align,
                BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                GROUP_M=tiles.group_m, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def embedded_variants(arch, dtype):
    """The launch options compiled ahead of time into the op library for a listed arch of the
    tile table and a dtype name: every BLOCK_FORMS form x tile entry x ALIGN (1, VECTOR_ALIGN)."""
    return [launch_options(form, dtype, align, Tiles(**entry))
            for entry in entries("conv1x1", arch, dtype != "float32")
            for form in BLOCK_FORMS for align in (1, VECTOR_ALIGN)]


def triton_signature(dt):
    """The kernel's parameters as Triton types for activations of Triton dtype `dt` ("fp16"):
    pointers, the i32 sizes (never specialised), the constexprs."""
    flags = ("STRIDE", "IN_AFFINE", "HAS_BIAS", "RELU", "ADD_TO_OUT", "PRECISION", "ALIGN",
             "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    return {"a_ptr": f"*{dt}", "w_ptr": f"*{dt}", "in_scale_ptr": "*fp32",
            "in_shift_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": f"*{dt}",
            **{name: "i32" for name in _SIZES}, **{name: "constexpr" for name in flags}}


def _aot_specs():
    """fp32 and bf16 in the 1x1a form (prologue, bias + ReLU) at the largest GPU tiles. fp16, the
    GPU runs' dtype, is compiled in every form DPN92 launches, with the JIT's specialisation,
    by tests/_triton_ptx.py (compile time is CI time)."""
    block_1x1a = (1, True, True, True, False)
    forms = {"fp32": (block_1x1a,), "bf16": (block_1x1a,)}
    specs = []
    for dt, dt_forms in forms.items():
        signature = triton_signature(dt)
        t = choose_tiles(1 << 20, 1024, 1024, half=dt != "fp32", arch=AOT_MIN_CC)
        tile = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k,
                "GROUP_M": t.group_m, "PRECISION": "ieee" if dt == "fp32" else "tf32",
                "ALIGN": alignment(1024)}
        options = {"num_warps": t.num_warps, "num_stages": t.num_stages}
        for stride, in_affine, has_bias, relu, add in dt_forms:
            specs.append((_conv1x1_kernel, signature,
                          {"STRIDE": stride, "IN_AFFINE": in_affine, "HAS_BIAS": has_bias,
                           "RELU": relu, "ADD_TO_OUT": add, **tile}, options))
    return specs


AOT_MIN_CC = 80  # tensor-core kernels: sm_80+ (dpn_fast.torch refuses older cards)
AOT_SPECS = _aot_specs()  # see tests/_triton_aot.py
