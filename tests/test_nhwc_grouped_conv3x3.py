"""dpn_fast.kernels.nhwc_grouped_conv3x3 under Triton's CPU interpreter (numpy host; no torch).

Group widths 3 to 48 (several groups a chunk where narrow, a last chunk with fewer groups),
stride 1 and 2, odd and non-square sizes and DPN92's own, n = 1 and 2, fp32 and fp16 (bf16
arithmetic is wrong in the interpreter; the AOT compile covers it), against float64 with the
project's rule (error <= 2x the plain sequence's error at that dtype + atol, tests/utils.py).
Rows are in the slot layout: the input's padding channels hold random finite values (they must
not leak into the result), the output's must come out zero; rows are wider than the layout,
NaN past it (must not be read, must stay NaN).
"""
import numpy as np
import pytest

pytest.importorskip("triton")

from _interpreter import (INTERPRETED, host, nan_array, needs_interpreter,  # noqa: E402
                          run_module_interpreted)
from utils import assert_matches_reference  # noqa: E402


@pytest.mark.skipif(INTERPRETED, reason="the driver of the interpreted run")
def test_under_interpreter():
    run_module_interpreted(__file__)


@pytest.fixture(scope="module")
def kernels():
    from dpn_fast.kernels import nhwc_grouped_conv3x3
    return nhwc_grouped_conv3x3


def conv_reference(x, weight, bias, groups, stride, precision):
    """relu(grouped conv3x3 (padding 1) + bias) of NHWC x: in float64, or in float32 arithmetic
    with the conv's and the bias add's results rounded to `precision` (the plain sequence)."""
    if precision == "float64":
        cast = lambda a: np.asarray(a, np.float64)  # noqa: E731
    else:
        cast = lambda a: np.asarray(a, np.float32).astype(precision).astype(np.float32)  # noqa: E731
    x, weight = cast(x), cast(weight)
    n, h, w, c = x.shape
    cin_g = c // groups
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded = np.zeros((n, h + 2, w + 2, c), x.dtype)
    padded[:, 1:-1, 1:-1] = x
    y = np.zeros((n, h_out, w_out, c), x.dtype)
    for kh in range(3):
        for kw in range(3):
            window = padded[:, kh:kh + stride * h_out:stride, kw:kw + stride * w_out:stride]
            window = window.reshape(n, h_out, w_out, groups, cin_g)
            tap = weight[:, :, kh, kw].reshape(groups, cin_g, cin_g)  # (group, out, in)
            y += np.einsum("nhwgi,goi->nhwgo", window, tap).reshape(n, h_out, w_out, c)
    y = cast(y)
    return np.maximum(cast(y + cast(bias)), 0)


CASES = [  # n, h, w, c, groups, stride, extra row width of x and out
    (2, 5, 7, 15, 5, 1, (5, 3)),     # 3 channels a group: 5 groups a chunk, one chunk
    (1, 7, 6, 96, 32, 2, (5, 3)),    # 3 a group, 32 groups: 7 chunks, the last with 2 groups
    (2, 6, 5, 36, 6, 1, (5, 3)),     # 6 a group: 5 groups a chunk (32 lanes), the last with 1
    (1, 5, 5, 24, 2, 2, (5, 3)),     # 12 a group
    (2, 3, 4, 72, 3, 1, (5, 3)),     # 24 a group: 32 lanes
    (1, 4, 3, 96, 2, 2, (5, 3)),     # 48 a group: 64 lanes
    # DPN92's shapes (small images), row strides multiples of 8: the kernel's aligned variant.
    (1, 14, 14, 96, 32, 1, (8, 16)),  # stage 1: 3 a group
    (1, 9, 9, 192, 32, 2, (0, 8)),    # stage 2's down block: 6 a group
    (1, 7, 7, 768, 32, 2, (0, 0)),    # stage 4's down block: 24 a group
]


def run_conv(kernels, x, weight, bias, groups, stride, dtype, tiles, pad_rng, extra=(5, 3)):
    """The kernel on x [n, h, w, c] in the slot layout, rows `extra` channels wider; returns
    (out [rows, c], padding of out). Checks what lies past the layout's width stays NaN."""
    n, h, w, c = x.shape
    columns, width = kernels.slot_layout(c, groups, tiles)
    padding = np.setdiff1d(np.arange(width), columns)
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    ldx, ldo = width + extra[0], width + extra[1]
    x_rows = nan_array((n * h * w, ldx), dtype)  # past the layout: NaN, must not be read
    x_rows[:, columns] = x.reshape(-1, c)
    x_rows[:, padding] = pad_rng.standard_normal((n * h * w, padding.size))  # finite, ignored
    out = nan_array((n * h_out * w_out, ldo), dtype)
    bias_slots = np.zeros(width, np.float32)
    bias_slots[columns] = bias
    packed = kernels.pack_weights(weight, groups, tiles).astype(dtype)
    kernels.grouped_conv3x3_forward(host(x_rows), host(packed), host(bias_slots), host(out),
                                    images=n, h=h, w=w, c=c, groups=groups, stride=stride,
                                    ldx=ldx, ldo=ldo, tiles=tiles)
    assert np.isnan(out[:, width:]).all()
    return out[:, columns], out[:, padding]


@needs_interpreter
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("n,h,w,c,groups,stride,extra", CASES)
def test_matches_float64(kernels, dtype, n, h, w, c, groups, stride, extra):
    rng = np.random.default_rng(c * 10 + stride)
    cin_g = c // groups
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    weight = rng.standard_normal((c, cin_g, 3, 3)) / np.sqrt(9 * cin_g)
    bias = 0.3 * rng.standard_normal(c)
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    tiles = kernels.choose_tiles(cin_g, n * h_out * w_out, dtype == "float16", interpret=True)
    out, padding = run_conv(kernels, x, weight, bias, groups, stride, dtype, tiles, rng, extra)
    ref64 = conv_reference(x, weight.astype(dtype), bias, groups, stride, "float64")
    plain = conv_reference(x, weight.astype(dtype), bias, groups, stride, dtype)
    assert_matches_reference(out, ref64.reshape(-1, c), plain.reshape(-1, c), dtype)
    np.testing.assert_array_equal(padding, 0)


@needs_interpreter
def test_several_position_tiles(kernels):
    """Small position tiles: several tiles of two chunks each (the chunk the fastest-varying
    program index), a partial last tile."""
    n, h, w, c, groups, stride = 2, 5, 5, 18, 6, 1
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    weight = rng.standard_normal((c, 3, 3, 3)) / np.sqrt(27)
    bias = rng.standard_normal(c).astype(np.float32)
    tiles = kernels.Tiles(16, 16, 5, 4, 1)
    out, padding = run_conv(kernels, x, weight, bias, groups, stride, np.float32, tiles, rng)
    ref = {p: conv_reference(x, weight.astype(np.float32), bias, groups, stride, p).reshape(-1, c)
           for p in ("float64", "float32")}
    assert_matches_reference(out, ref["float64"], ref["float32"])
    np.testing.assert_array_equal(padding, 0)


def test_tiles_fill_lanes_with_whole_groups(kernels):
    chosen = {g: kernels.chunk_lanes(g) for g in (3, 5, 6, 12, 24, 48)}
    assert {g: (t.block_c, t.groups_per_program) for g, t in chosen.items()} == {
        3: (16, 5), 5: (16, 3), 6: (32, 5), 12: (32, 2), 24: (32, 1), 48: (64, 1)}
    with pytest.raises(ValueError, match="1 to 64"):
        kernels.chunk_lanes(65)
    # GPU tiles: the same chunks, 128-256 positions a program where the lanes are narrow.
    for arch in (80, 90):
        tiles = {g: kernels.choose_tiles(g, 1 << 20, half=True, arch=arch) for g in chosen}
        assert all(tiles[g][1:3] == chosen[g] for g in chosen)
        assert (tiles[3].block_p, tiles[6].block_p, tiles[24].block_p) == (256, 128, 128)


def test_slot_layout_aligns_every_chunk(kernels):
    """DPN92's first stage: 96 channels in 3-channel groups -> 7 chunks of 5 groups (the last of
    2), each in a 16-channel slot starting at a multiple of 16."""
    columns, width = kernels.slot_layout(96, 32, kernels.chunk_lanes(3))
    assert width == 112
    np.testing.assert_array_equal(columns[:16], list(range(15)) + [16])
    assert columns[-1] == 6 * 16 + 5 and len(set(columns.tolist())) == 96
    # 24-channel groups need no padding: 24-channel slots are 16-byte aligned already.
    columns, width = kernels.slot_layout(768, 32, kernels.chunk_lanes(24))
    assert width == 768 and (columns == np.arange(768)).all()


def test_packed_weights_are_block_diagonal(kernels):
    c, groups = 9, 3
    weight = np.arange(c * 3 * 9, dtype=np.float64).reshape(c, 3, 3, 3) + 1
    tiles = kernels.Tiles(16, 16, 2, 4, 1)  # 2 groups (6 channels) a program: 2 programs
    packed = kernels.pack_weights(weight, groups, tiles)
    assert packed.shape == (2, 9, 16, 16)
    # Program 1 holds channels 6..8 (group 2) in lanes 0..2.
    np.testing.assert_array_equal(packed[1, 4, 0:3, 0:3], weight[6:9, :, 1, 1].T)
    np.testing.assert_array_equal(packed[0, :, 0:3, 3:6], 0)  # across groups: zero
    np.testing.assert_array_equal(packed[0, 0, 3:6, 3:6], weight[3:6, :, 0, 0].T)
    assert np.count_nonzero(packed) == c * 3 * 9
    with pytest.raises(ValueError, match="grouped 3x3 conv of 4 groups"):
        kernels.pack_weights(weight, 4, tiles)


@needs_interpreter
def test_bad_arguments_raise_typed_errors(kernels):
    x = np.zeros((4, 16), np.float16)  # 6 channels of 3 a group: one 16-channel slot
    tiles = kernels.choose_tiles(3, 4, half=True, interpret=True)
    packed = np.zeros((1, 9, 16, 16), np.float16)
    bias = np.zeros(16, np.float32)
    args = dict(images=1, h=2, w=2, c=6, groups=2, stride=1, ldx=16, ldo=16, tiles=tiles)
    call = kernels.grouped_conv3x3_forward
    with pytest.raises(TypeError, match="packed_w dtype float32"):
        call(host(x), host(packed.astype(np.float32)), host(bias), host(x), **args)
    with pytest.raises(TypeError, match="bias must be float32"):
        call(host(x), host(packed), host(x[0]), host(x), **args)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        call(host(x), host(packed), host(bias), host(x), **{**args, "stride": 3})
    with pytest.raises(ValueError, match="bad sizes"):
        call(host(x), host(packed), host(bias), host(x), **{**args, "groups": 4})
    with pytest.raises(ValueError, match="do not fit 16 lanes"):
        call(host(x), host(packed), host(bias), host(x),
             **{**args, "tiles": kernels.Tiles(16, 16, 6, 4, 1)})
    with pytest.raises(ValueError, match="below the slot layout's width 16"):
        call(host(x), host(packed), host(bias), host(x), **{**args, "ldo": 15})
