"""GPU check of the dual-path merge's CUDA and Triton kernels, without Paddle (torch as host).

For a GPU machine with torch, triton, cmake and nvcc (no Paddle there). From the repo root:
    python tests/gpu/check_dual_path_merge.py [--arch 90] [--no-bench]
Builds the framework-free CUDA library (CMake target dpn_fast_kernels), then checks forward and
backward for fp32/fp16/bf16 against a float64 torch reference at DPN92's merge shapes plus odd
ones, with NaN-poisoned outputs, and times fused vs torch's unfused sequence (cuDNN batch_norm).
Exit status 0 when every check passes. Not collected by pytest (no test_ prefix).
"""
import argparse
import ctypes
import importlib.util
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = {"float32": (torch.float32, 0), "float16": (torch.float16, 1), "bfloat16": (torch.bfloat16, 2)}
ATOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
# DPN92 (resid, dense_before, inc, hw) per stage (widest merge) + odd shapes.
SHAPES = [(256, 64, 16, 56), (512, 160, 32, 28), (1024, 504, 24, 14), (2048, 512, 128, 7),
          (2048, 256, 128, 7), (3, 5, 2, 7), (13, 11, 3, 9), (8, 1, 1, 1)]


class ChannelAffine(ctypes.Structure):  # csrc/dual_path_merge.h
    _fields_ = [("num_acts", ctypes.c_int), ("scale", ctypes.c_void_p * 2),
                ("shift", ctypes.c_void_p * 2), ("mean", ctypes.c_void_p * 2),
                ("var", ctypes.c_void_p * 2), ("eps", ctypes.c_float * 2)]


def build(arch):
    build_dir = "/tmp/dpn_fast_kernels_build"
    subprocess.run(["cmake", "-S", ROOT, "-B", build_dir, "-DDPN_FAST_WITH_PADDLE=OFF",
                    "-DDPN_FAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build_dir, "--target", "dpn_fast_kernels", "-j8"], check=True)
    lib = ctypes.CDLL(os.path.join(build_dir, "libdpn_fast_kernels.so"))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.dpn_fast_dual_path_merge_forward_cuda.argtypes = [
        vp, vp, vp, ctypes.POINTER(ChannelAffine), vp, vp, ctypes.POINTER(vp),
        i64, i64, i64, i64, i64, i64, ctypes.c_int, vp]
    lib.dpn_fast_dual_path_merge_backward_cuda.argtypes = [
        vp, vp, vp, vp, ctypes.POINTER(vp), ctypes.POINTER(ChannelAffine), vp, vp, vp,
        i64, i64, i64, i64, i64, ctypes.c_int, vp]
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


def affine_struct(scale=None, shift=None, bn=None):
    """Folded [A, C] scale/shift, or bn = list of (weight, bias, mean, var, eps)."""
    a = ChannelAffine()
    if bn is not None:
        a.num_acts = len(bn)
        for i, (w, b, m, v, eps) in enumerate(bn):
            a.scale[i], a.shift[i], a.mean[i], a.var[i], a.eps[i] = ptr(w), ptr(b), ptr(m), ptr(v), eps
    elif scale is not None:
        a.num_acts = scale.shape[0]
        for i in range(a.num_acts):
            a.scale[i], a.shift[i] = ptr(scale[i]), ptr(shift[i])
    return a


def cuda_forward(lib, resid, dense, y, affine, dtype_code):
    n, r, h, w = resid.shape
    d, inc = dense.shape[1], (y.shape[1] - r if y is not None else 0)
    c = r + d + inc
    nan = float("nan")
    resid_out = torch.full_like(resid, nan) if y is not None else None
    dense_out = torch.full((n, d + inc, h, w), nan, dtype=resid.dtype, device="cuda") if y is not None else None
    act = torch.full((max(affine.num_acts, 1), n, c, h, w), nan, dtype=resid.dtype, device="cuda")
    planes = (ctypes.c_void_p * 2)(*[act[i].data_ptr() for i in range(affine.num_acts)])
    status = lib.dpn_fast_dual_path_merge_forward_cuda(
        ptr(resid), ptr(dense), ptr(y), ctypes.byref(affine), ptr(resid_out), ptr(dense_out),
        planes, n, r, d, inc, h * w, 0, dtype_code, torch.cuda.current_stream().cuda_stream)
    assert status == 0, f"forward status {status}"
    return resid_out, dense_out, act[:affine.num_acts]


def cuda_backward(lib, x_resid, x_dense, g_resid_out, g_dense_out, g_act, affine, y_channels,
                  d, dtype_code):
    n, r, h, w = x_resid.shape
    inc = y_channels - r if y_channels else 0
    nan = float("nan")
    g_resid = torch.full((n, r, h, w), nan, dtype=x_resid.dtype, device="cuda")
    g_dense = torch.full((n, d, h, w), nan, dtype=x_resid.dtype, device="cuda")
    g_y = torch.full((n, y_channels, h, w), nan, dtype=x_resid.dtype, device="cuda") if y_channels else None
    planes = (ctypes.c_void_p * 2)(*[g_act[i].data_ptr() for i in range(affine.num_acts)])
    status = lib.dpn_fast_dual_path_merge_backward_cuda(
        ptr(x_resid), ptr(x_dense), ptr(g_resid_out), ptr(g_dense_out), planes,
        ctypes.byref(affine), ptr(g_resid), ptr(g_dense), ptr(g_y), n, r, d, inc, h * w,
        dtype_code, torch.cuda.current_stream().cuda_stream)
    assert status == 0, f"backward status {status}"
    return g_resid, g_dense, g_y


def reference(resid, dense, y, scale, shift):
    """Unfused torch sequence in the inputs' dtype (rounding as the kernels)."""
    r = resid.shape[1]
    resid_out = resid + y[:, :r]
    dense_out = torch.cat([dense, y[:, r:]], 1)
    x = torch.cat([resid_out, dense_out], 1).float()
    acts = [F.relu(x * s[None, :, None, None] + t[None, :, None, None]).to(resid.dtype)
            for s, t in zip(scale, shift)]
    return resid_out, dense_out, acts


FAILURES = []


def check(name, got, want64, want_same_dtype, dtype):
    got64 = got.double()
    if not torch.isfinite(got64).all():
        FAILURES.append(f"{name}: non-finite values (unwritten output?)")
        return
    err = (got64 - want64).abs().max().item() if got.numel() else 0.0
    ref_err = (want_same_dtype.double() - want64).abs().max().item() if got.numel() else 0.0
    bound = 2 * ref_err + ATOL[dtype] * max(1.0, want64.abs().max().item() if got.numel() else 1.0)
    if err > bound:
        FAILURES.append(f"{name}: err {err:.3e} > {bound:.3e}")


def run_checks(lib):
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype_name, (dtype, code) in DTYPES.items():
        for (r, d, inc, hw) in SHAPES:
            for n in (1, 3):
                for num_acts in (0, 1, 2):
                    c = r + d + inc
                    randn = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
                    resid64, dense64, y64 = randn(n, r, hw, hw).double(), randn(n, d, hw, hw).double(), randn(n, r + inc, hw, hw).double()
                    resid, dense, y = (t.to(dtype) for t in (resid64, dense64, y64))
                    scale, shift = randn(max(num_acts, 1), c), randn(max(num_acts, 1), c)
                    aff = affine_struct(scale[:num_acts], shift[:num_acts]) if num_acts else ChannelAffine()
                    out = cuda_forward(lib, resid, dense, y, aff, code)
                    torch.cuda.synchronize()
                    ref = reference(resid, dense, y, scale[:num_acts], shift[:num_acts])
                    ref64 = reference(resid.double(), dense.double(), y.double(), scale[:num_acts].double(), shift[:num_acts].double())
                    tag = f"fwd {dtype_name} {(r, d, inc, hw)} n={n} acts={num_acts}"
                    check(tag + " resid_out", out[0], ref64[0], ref[0], dtype_name)
                    check(tag + " dense_out", out[1], ref64[1], ref[1], dtype_name)
                    for a in range(num_acts):
                        check(tag + f" act{a}", out[2][a], ref64[2][a], ref[2][a], dtype_name)
                    # Backward vs autograd of the float64 reference (inputs rounded like ours).
                    leaves = [t.double().requires_grad_() for t in (resid, dense, y)]
                    r_out, d_out, acts = reference(*leaves, scale[:num_acts].double(), shift[:num_acts].double())
                    g_ro, g_do = randn(*r_out.shape).to(dtype), randn(*d_out.shape).to(dtype)
                    g_act = randn(max(num_acts, 1), n, c, hw, hw).to(dtype)
                    loss = (r_out * g_ro.double()).sum() + (d_out * g_do.double()).sum()
                    loss = loss + sum((acts[a] * g_act[a].double()).sum() for a in range(num_acts))
                    loss.backward()
                    grads = cuda_backward(lib, out[0], out[1], g_ro, g_do, g_act, aff, r + inc, d, code)
                    torch.cuda.synchronize()
                    for name, got, leaf in zip(("resid", "dense", "y"), grads, leaves):
                        want = leaf.grad
                        check(f"bwd {tag} grad {name}", got, want, want.to(dtype), dtype_name)
        # Stage-buffer form (dense_capacity): old channels read in place, only new ones written.
        r, d, inc, hw, n, cap = 32, 20, 8, 7, 2, 40
        resid, y = torch.randn(n, r, hw, hw, device="cuda").to(dtype), torch.randn(n, r + inc, hw, hw, device="cuda").to(dtype)
        buffer = torch.randn(n, cap, hw, hw, device="cuda").to(dtype)
        before = buffer.clone()
        scale, shift = torch.randn(1, r + d + inc, device="cuda"), torch.randn(1, r + d + inc, device="cuda")
        resid_out = torch.full_like(resid, float("nan"))
        act = torch.full((1, n, r + d + inc, hw, hw), float("nan"), dtype=dtype, device="cuda")
        planes = (ctypes.c_void_p * 2)(act.data_ptr())
        status = lib.dpn_fast_dual_path_merge_forward_cuda(
            ptr(resid), ptr(buffer), ptr(y), ctypes.byref(affine_struct(scale, shift)), ptr(resid_out),
            ptr(buffer), planes, n, r, d, inc, hw * hw, cap, code, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        want = reference(resid, before[:, :d], y, scale, shift)
        if status != 0 or not torch.equal(buffer[:, :d], before[:, :d]) or not torch.equal(buffer[:, d + inc:], before[:, d + inc:]):
            FAILURES.append(f"buffer form {dtype_name}: status {status} or untouched channels changed")
        check(f"buffer form {dtype_name} new dense", buffer[:, d:d + inc], want[1][:, d:].double(), want[1][:, d:], dtype_name)
        check(f"buffer form {dtype_name} act", act[0], want[2][0].double(), want[2][0], dtype_name)
        # Raw-BatchNorm mode (in-kernel folding), two BNs, head-only form (no y).
        r, d, hw, n = 64, 48, 14, 2
        c = r + d
        bns = []
        for _ in range(2):
            w, b, m = (torch.randn(c, device="cuda") for _ in range(3))
            v = torch.rand(c, device="cuda") + 0.5
            bns.append((w, b, m, v, 1e-5))
        resid, dense = torch.randn(n, r, hw, hw, device="cuda").to(dtype), torch.randn(n, d, hw, hw, device="cuda").to(dtype)
        _, _, acts = cuda_forward(lib, resid, dense, None, affine_struct(bn=bns), code)
        x = torch.cat([resid, dense], 1).double()
        for a, (w, b, m, v, eps) in enumerate(bns):
            want64 = F.relu(F.batch_norm(x, m.double(), v.double(), w.double(), b.double(), False, 0.1, eps))
            want = F.relu(F.batch_norm(x.to(dtype).float(), m, v, w, b, False, 0.1, eps)).to(dtype)
            check(f"head bn {dtype_name} act{a}", acts[a], want64, want, dtype_name)


def time_ms(fn, iters=200):
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def load_triton_kernels():
    spec = importlib.util.spec_from_file_location("dpm_triton", os.path.join(ROOT, "kernels", "dual_path_merge.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(lib):
    tk = load_triton_kernels()
    print(f"{'shape':>24} {'n':>2} {'dtype':>8} {'unfused ms':>10} {'cuda ms':>8} {'triton ms':>9} {'x cuda':>6}")
    for (r, d, inc, hw) in SHAPES[:4]:
        for n in (1, 8):
            for dtype_name in ("float32", "float16"):
                dtype, code = DTYPES[dtype_name]
                c = r + d + inc
                resid, dense, y = (torch.randn(n, k, hw, hw, device="cuda", dtype=dtype) for k in (r, d, r + inc))
                w, b, m = (torch.randn(c, device="cuda") for _ in range(3))
                v = torch.rand(c, device="cuda") + 0.5
                aff = affine_struct(bn=[(w, b, m, v, 1e-5)])

                def unfused():
                    ro = resid + y[:, :r]
                    do = torch.cat([dense, y[:, r:]], 1)
                    return ro, do, F.relu(F.batch_norm(torch.cat([ro, do], 1), m, v, w, b, False, 0.1, 1e-5))

                ro, do = torch.empty_like(resid), torch.empty(n, d + inc, hw, hw, device="cuda", dtype=dtype)
                act = torch.empty(1, n, c, hw, hw, device="cuda", dtype=dtype)
                planes = (ctypes.c_void_p * 2)(act.data_ptr())
                stream = torch.cuda.current_stream().cuda_stream

                def fused():
                    lib.dpn_fast_dual_path_merge_forward_cuda(ptr(resid), ptr(dense), ptr(y), ctypes.byref(aff), ptr(ro), ptr(do), planes, n, r, d, inc, hw * hw, 0, code, stream)

                scale = (w * torch.rsqrt(v + 1e-5))[None]
                shift = (b - m * scale[0])[None]

                def triton_fused():
                    tk.merge_forward(resid, dense, y, scale, shift, ro, do, act, n, r, d, inc, hw * hw, 1)

                t_ref, t_cuda, t_tri = time_ms(unfused), time_ms(fused), time_ms(triton_fused)
                print(f"{str((r, d, inc, hw)):>24} {n:>2} {dtype_name:>8} {t_ref:10.4f} {t_cuda:8.4f} {t_tri:9.4f} {t_ref / t_cuda:6.2f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="90")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_BACKEND", "nvidia")
    lib = build(args.arch)
    run_checks(lib)
    print("\n".join(FAILURES) if FAILURES else "all CUDA checks passed")
    if not args.no_bench:
        bench(lib)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
