"""dpn_fast.kernels.nhwc_conv1x1 under Triton's CPU interpreter (numpy host; no torch).

Each DPN block form at small odd shapes, n = 1 and 2, fp32 and fp16 (bf16 arithmetic is wrong in
the interpreter; the AOT compile covers it), against float64, with the project's rule: error <=
2x the plain sequence's error at that dtype + atol (tests/utils.py). Buffers are wider than what a
launch reads or writes, NaN where nothing may be read and NaN or known values where nothing may be
written: reading past K, or writing outside the given columns, fails.
"""
import numpy as np
import pytest

pytest.importorskip("triton")

from _interpreter import (INTERPRETED, host, nan_array, needs_interpreter,  # noqa: E402
                          run_module_interpreted)
from utils import assert_matches_reference  # noqa: E402

DTYPES = ("float32", "float16")


@pytest.mark.skipif(INTERPRETED, reason="the driver of the interpreted run")
def test_under_interpreter():
    run_module_interpreted(__file__)


@pytest.fixture(scope="module")
def kernels():
    from dpn_fast.kernels import nhwc_conv1x1
    return nhwc_conv1x1


def gemm_reference(a, w, in_affine, bias, relu, precision):
    """The unfused sequence at `precision`: float64, or float32 arithmetic with every op's result
    rounded to the dtype (as a framework runs BN + ReLU, a conv, a bias add, a ReLU)."""
    if precision == "float64":
        cast = lambda x: np.asarray(x, np.float64)  # noqa: E731
    else:
        cast = lambda x: np.asarray(x, np.float32).astype(precision).astype(np.float32)  # noqa: E731
    a = cast(a)
    if in_affine is not None:
        scale, shift = in_affine
        a = cast(np.maximum(a * cast(scale) + cast(shift), 0))
    y = cast(a @ cast(w))
    if bias is not None:
        y = cast(y + cast(bias))
    return np.maximum(y, 0) if relu else y


def stride_rows(rows, n, h, w, stride):
    """The rows a 1x1 conv of `stride` reads: (b, stride * oh, stride * ow)."""
    return rows.reshape(n, h, w, -1)[:, ::stride, ::stride].reshape(-1, rows.shape[1])


def make(rng, shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w,k,lda,n_out,stride", [
    (2, 5, 7, 37, 45, 24, 1),   # 1x1a: a stage buffer's resid | dense prefix, bias + ReLU
    (1, 7, 5, 20, 20, 19, 2),   # projection of a down block: odd sizes, a row gather
    (2, 3, 3, 12, 12, 9, 2),
])
def test_prologue_forms(kernels, dtype, n, h, w, k, lda, n_out, stride):
    rng = np.random.default_rng(n * 100 + k)
    buffer = nan_array((n * h * w, lda), dtype)      # columns past k: NaN, must not be read
    buffer[:, :k] = make(rng, (n * h * w, k))
    weight = make(rng, (k, n_out), 1 / np.sqrt(k))
    scale, shift = rng.uniform(0.5, 1.5, k), 0.3 * make(rng, k)
    bias = 0.3 * make(rng, n_out) if stride == 1 else None
    relu = stride == 1
    h_out, w_out = (h - 1) // stride + 1, (w - 1) // stride + 1
    rows = n * h_out * w_out
    ldo = n_out + 3  # the output's last 3 columns belong to someone else: must stay NaN
    out = nan_array((rows, ldo), dtype)
    kernels.conv1x1_forward(
        host(buffer), host(weight.astype(dtype)), host(out), rows=rows, k=k, n=n_out, lda=lda,
        ldo=ldo, stride=stride, in_hw=(h, w), in_scale=host(scale.astype(np.float32)),
        in_shift=host(shift.astype(np.float32)),
        bias=None if bias is None else host(bias.astype(np.float32)), relu=relu)
    a = stride_rows(buffer[:, :k].astype(np.float64), n, h, w, stride)
    ref = {p: gemm_reference(a, weight.astype(dtype), (scale, shift), bias, relu, p)
           for p in ("float64", dtype)}
    assert_matches_reference(out[:, :n_out], ref["float64"], ref[dtype], dtype)
    assert np.isnan(out[:, n_out:]).all()


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,w", [(2, 3, 5), (1, 7, 7)])
def test_residual_add_and_dense_append(kernels, dtype, n, h, w):
    """1x1c: y[:, :r] added into resid in place, y[:, r:] written behind the d dense channels the
    stage already has; the old dense channels and the spare capacity untouched."""
    r, d, inc, spare, k = 10, 7, 6, 5, 13
    rows = n * h * w
    rng = np.random.default_rng(rows)
    ldo = r + d + inc + spare
    stage = nan_array((rows, ldo), dtype)
    stage[:, :r + d] = make(rng, (rows, r + d))
    before = stage.copy()
    a = np.maximum(make(rng, (rows, k)), 0).astype(dtype)  # the grouped conv's ReLU output
    weight = make(rng, (k, r + inc), 1 / np.sqrt(k))
    kernels.conv1x1_forward(host(a), host(weight.astype(dtype)), host(stage), rows=rows, k=k,
                            n=r + inc, lda=k, ldo=ldo, split=r, dense_gap=d, add_to_out=True)
    for p in ("float64", dtype):
        y = gemm_reference(a, weight.astype(dtype), None, None, False, p)
        resid = before[:, :r].astype(np.float64)
        if p == "float64":
            ref64 = (resid + y[:, :r], y[:, r:])
        else:
            plain = (np.asarray(resid + y[:, :r], np.float32).astype(p).astype(np.float32),
                     y[:, r:])
    assert_matches_reference(stage[:, :r], ref64[0], plain[0], dtype, "resid")
    np.testing.assert_array_equal(stage[:, r:r + d], before[:, r:r + d])
    assert_matches_reference(stage[:, r + d:r + d + inc], ref64[1], plain[1], dtype, "dense")
    assert np.isnan(stage[:, r + d + inc:]).all()


@needs_interpreter
def test_many_tiles_and_k_steps(kernels):
    """Several row and column tiles in GROUP_M order and several K steps (small explicit tiles),
    so tile edges, the K loop and the program-to-tile mapping are all exercised."""
    rows, k, n_out = 35, 40, 24
    rng = np.random.default_rng(3)
    a = make(rng, (rows, k)).astype(np.float32)
    weight = make(rng, (k, n_out), 1 / np.sqrt(k)).astype(np.float32)
    bias = make(rng, n_out).astype(np.float32)
    out = nan_array((rows, n_out), np.float32)
    kernels.conv1x1_forward(host(a), host(weight), host(out), rows=rows, k=k, n=n_out, lda=k,
                            ldo=n_out, bias=host(bias), relu=True,
                            tiles=kernels.Tiles(16, 16, 16, 2, 4, 1))
    ref = {p: gemm_reference(a, weight, None, bias, True, p) for p in ("float64", "float32")}
    assert_matches_reference(out, ref["float64"], ref["float32"])


@needs_interpreter
@pytest.mark.parametrize("form", ["1x1a", "proj", "1x1c"])
def test_dpn92_stage3_shapes(kernels, form):
    """DPN92's stage-3 GEMMs at n = 1 (14x14 positions) in fp16, sizes multiples of 8 but not 16
    (the kernel's aligned variant), GPU-sized 64x64x64 tiles: an unmasked main K loop and a
    masked tail (K = 1096 = 17 * 64 + 8), partial row and column tiles. Stage buffer: 1024
    resid + 528 dense channels."""
    dtype, width, rng = "float16", 1552, np.random.default_rng(7)
    tiles = kernels.Tiles(64, 64, 64, 8, 4, 1)
    if form == "1x1c":  # the second block: 72 dense channels before it
        rows, k, n_out, split, dense = 196, 384, 1048, 1024, 72
        stage = nan_array((rows, width), dtype)
        stage[:, :split + dense] = make(rng, (rows, split + dense))
        before = stage.copy()
        a = np.maximum(make(rng, (rows, k)), 0).astype(dtype)
        weight = make(rng, (k, n_out), 1 / np.sqrt(k)).astype(dtype)
        kernels.conv1x1_forward(host(a), host(weight), host(stage), rows=rows, k=k, n=n_out,
                                lda=k, ldo=width, split=split, dense_gap=dense, add_to_out=True,
                                tiles=tiles)
        y64 = gemm_reference(a, weight, None, None, False, "float64")
        y16 = gemm_reference(a, weight, None, None, False, dtype)
        resid = before[:, :split].astype(np.float64)
        assert_matches_reference(stage[:, :split], resid + y64[:, :split],
                                 (resid + y16[:, :split]).astype(dtype), dtype, "resid")
        np.testing.assert_array_equal(stage[:, split:split + dense], before[:, split:split + dense])
        assert_matches_reference(stage[:, split + dense:split + dense + n_out - split],
                                 y64[:, split:], y16[:, split:], dtype, "dense")
        assert np.isnan(stage[:, split + dense + n_out - split:]).all()
        return
    if form == "1x1a":  # the second block's: reads the stage buffer's resid | 72 dense channels
        n, h, w, k, lda, n_out, stride = 1, 14, 14, 1096, width, 384, 1
    else:  # the down block's projection: stage 2's rows (28x28, 704 channels), stride 2
        n, h, w, k, lda, n_out, stride = 1, 28, 28, 704, 704, 1072, 2
    src = nan_array((n * h * w, lda), dtype)
    src[:, :k] = make(rng, (n * h * w, k))
    weight = make(rng, (k, n_out), 1 / np.sqrt(k)).astype(dtype)
    scale, shift = rng.uniform(0.5, 1.5, k), 0.3 * make(rng, k)
    bias = 0.3 * make(rng, n_out) if form == "1x1a" else None
    rows = n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    out = nan_array((rows, n_out + 8), dtype)
    kernels.conv1x1_forward(
        host(src), host(weight), host(out), rows=rows, k=k, n=n_out, lda=lda, ldo=n_out + 8,
        stride=stride, in_hw=(h, w), in_scale=host(scale.astype(np.float32)),
        in_shift=host(shift.astype(np.float32)),
        bias=None if bias is None else host(bias.astype(np.float32)), relu=form == "1x1a",
        tiles=tiles)
    a = stride_rows(src[:, :k].astype(np.float64), n, h, w, stride)
    ref = {p: gemm_reference(a, weight, (scale, shift), bias, form == "1x1a", p)
           for p in ("float64", dtype)}
    assert_matches_reference(out[:, :n_out], ref["float64"], ref[dtype], dtype)
    assert np.isnan(out[:, n_out:]).all()


@needs_interpreter
def test_planned_launch_checks_once_and_runs_again(kernels):
    """plan_conv1x1 checks its arguments and returns a launch that can run many times (a forward
    planned once per input shape); no rows gives a launch that does nothing."""
    rng = np.random.default_rng(5)
    a = make(rng, (9, 16)).astype(np.float32)
    weight = make(rng, (16, 8)).astype(np.float32)
    out = nan_array((9, 8), np.float32)
    launch = kernels.plan_conv1x1(host(a), host(weight), host(out), rows=9, k=16, n=8, lda=16,
                                  ldo=8)
    assert launch.options["ALIGN"] == 8
    launch()
    first = out.copy()
    out[:] = np.nan
    launch()
    np.testing.assert_array_equal(out, first)
    ref = {p: gemm_reference(a, weight, None, None, False, p) for p in ("float64", "float32")}
    assert_matches_reference(out, ref["float64"], ref["float32"])
    out[:] = np.nan
    kernels.plan_conv1x1(host(a), host(weight), host(out), rows=0, k=16, n=8, lda=16, ldo=8)()
    assert np.isnan(out).all()


def test_tile_table_by_arch_and_rows(kernels):
    """The shipped table: small row counts (batch 1's last stages) get small row tiles, so the
    GEMM spreads over the SMs; an arch between the listed ones takes the one below it, an
    older one the oldest; every list ends with an entry that holds for any shape."""
    from dpn_fast.kernels import _tiles
    choose = kernels.choose_tiles
    assert choose(49, 2432, 1600, half=True, arch=90).block_m == 32      # stage 4, n = 1
    assert choose(196, 1096, 384, half=True, arch=90)[:3] == (64, 64, 64)  # stage 3, n = 1
    assert choose(12544, 1096, 384, half=True, arch=90)[:2] == (128, 128)  # stage 3, n = 64
    assert choose(12544, 1096, 48, half=True, arch=80)[:2] == (128, 64)
    assert choose(196, 1096, 384, half=True, arch=89) == choose(196, 1096, 384, True, arch=80)
    assert choose(196, 1096, 384, half=True, arch=75) == choose(196, 1096, 384, True, arch=80)
    assert choose(196, 1096, 384, half=True, arch=120) == choose(196, 1096, 384, True, arch=90)
    table = _tiles._table()
    for kernel in ("conv1x1", "grouped_conv3x3"):
        spec = table[kernel]
        for arch in (key for key in spec if key.startswith("sm_")):
            for dtype_class in ("half", "fp32"):
                entries = spec[arch][dtype_class]
                assert all(len(e["tiles"]) == len(spec["fields"]) for e in entries)
                assert not any(k.startswith("max_") for k in entries[-1]), (kernel, arch)
    with pytest.raises(ValueError, match="sizes"):
        _tiles.lookup("conv1x1", 90, True, rows=1)


@needs_interpreter
def test_interpreter_tiles_are_one_program_for_small_shapes(kernels):
    assert kernels.INTERPRETED
    tiles = kernels.choose_tiles(70, 37, 24, half=False, interpret=True)
    assert (tiles.block_m, tiles.block_n, tiles.block_k) == (128, 32, 64)


@needs_interpreter
def test_bad_arguments_raise_typed_errors(kernels):
    a = np.zeros((6, 8), np.float16)
    w = np.zeros((8, 4), np.float16)
    out = np.zeros((6, 4), np.float16)
    call = kernels.conv1x1_forward
    with pytest.raises(TypeError, match="w dtype float32"):
        call(host(a), host(w.astype(np.float32)), host(out), rows=6, k=8, n=4, lda=8, ldo=4)
    with pytest.raises(TypeError, match="activations must be"):
        call(host(a.astype(np.float64)), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4)
    with pytest.raises(TypeError, match="bias must be float32"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4, bias=host(w[0]))
    with pytest.raises(ValueError, match="lda=7 < k=8"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=7, ldo=4)
    with pytest.raises(ValueError, match="widest output column 6"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4, split=2, dense_gap=2)
    with pytest.raises(ValueError, match="needs in_hw"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4, stride=2)
    with pytest.raises(ValueError, match="not a whole number of 2x2"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4, stride=2, in_hw=(3, 3))
    with pytest.raises(ValueError, match="both in_scale and in_shift"):
        call(host(a), host(w), host(out), rows=6, k=8, n=4, lda=8, ldo=4,
             in_scale=host(np.ones(8, np.float32)))
