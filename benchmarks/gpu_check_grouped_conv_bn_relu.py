"""GPU check of grouped_conv_bn_relu's CUDA launchers and Triton kernel, without Paddle.

For a GPU machine that has torch (+ triton) but no Paddle. Builds the Paddle-free kernel library
with CMake, calls the C ABI launchers through ctypes on torch tensors, compares against torch's
conv2d + batch_norm + relu (cuDNN) in float64, and times both at DPN92's shapes:

    python benchmarks/gpu_check_grouped_conv_bn_relu.py [--arch 90]
"""
import argparse
import ctypes
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
# (n, c, c_out, h, w, groups, stride): DPN92 stage shapes + odd ones.
CASES = [(n, c, c, hw, hw, 32, s) for n in (1, 8)
         for c, hw, s in [(96, 56, 1), (192, 56, 2), (192, 28, 1), (384, 28, 2), (384, 14, 1),
                          (768, 14, 2), (768, 7, 1)]]
CASES += [(3, 96, 96, 9, 11, 32, 1), (3, 40, 40, 7, 5, 8, 2), (1, 15, 20, 6, 13, 5, 1),
          (2, 1280, 1280, 7, 7, 40, 1), (2, 1600, 1600, 14, 14, 50, 2)]


def build_library(arch):
    build = os.path.join(ROOT, "build", "gpu-check")
    subprocess.run(["cmake", "-S", ROOT, "-B", build, "-DDPN_FAST_WITH_PADDLE=OFF",
                    "-DDPN_FAST_WITH_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"], check=True)
    subprocess.run(["cmake", "--build", build, "--target", "dpn_fast_kernels", "-j"], check=True)
    lib = ctypes.CDLL(os.path.join(build, "libdpn_fast_kernels.so"))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dpn_fast_grouped_conv_bn_relu_infer_cuda.argtypes = (
        [ptr] * 6 + [ctypes.c_float] + [ptr] * 3 + [i64] * 7 + [ctypes.c_int, ptr])
    lib.dpn_fast_grouped_conv_bn_relu_train_cuda.argtypes = (
        [ptr] * 6 + [ctypes.c_float] * 2 + [ptr] * 4 + [i64] * 7 + [ctypes.c_int, ptr])
    lib.dpn_fast_bn_relu_train_backward_cuda.argtypes = [ptr] * 9 + [i64] * 3 + [ctypes.c_int, ptr]
    lib.dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda.argtypes = (
        [ptr] * 6 + [ctypes.c_float] + [ptr] * 4 + [ctypes.c_float] + [ptr] * 4 + [i64] * 7
        + [ctypes.c_int, ptr])
    return lib


def p(t):
    return ctypes.c_void_p(t.data_ptr())


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def make(case, dtype, seed=0):
    n, c, c_out, h, w, groups, _ = case
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(x=r(n, c, h, w).to(dtype), weight=(r(c_out, c // groups, 3, 3) / (3 * (c // groups) ** 0.5)).to(dtype),
                gamma=r(c_out).abs() + 0.5, beta=r(c_out) * 0.5, mean=r(c_out) * 0.2,
                var=r(c_out).abs() + 0.5)


def make_input_bn(c, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(gamma=r(c).abs() + 0.5, beta=r(c) * 0.5 + 0.3, mean=r(c) * 0.2, var=r(c).abs() + 0.5)


def input_bn_relu(x, ib):
    """relu(eval BN(x)) in float64: the prologue's reference (padding pads its result)."""
    shape = (1, -1, 1, 1)
    return F.relu((x.double() - ib["mean"].double().view(shape))
                  / torch.sqrt(ib["var"].double().view(shape) + 1e-5)
                  * ib["gamma"].double().view(shape) + ib["beta"].double().view(shape))


def reference(t, stride, groups, training, dtype=torch.float64, x=None):
    """(y, out, running mean, running var) in float64; running stats as Paddle updates them
    (momentum 0.9, biased batch variance; torch would use the unbiased one)."""
    x, w = (t["x"] if x is None else x).to(dtype), t["weight"].to(dtype)
    mean, var = t["mean"].double(), t["var"].double()
    y = F.conv2d(x, w, stride=stride, padding=1, groups=groups)
    if training:
        batch_mean, batch_var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        mean, var = 0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * batch_var
        norm_mean, norm_var = batch_mean, batch_var
    else:
        norm_mean, norm_var = mean, var
    shape = (1, -1, 1, 1)
    out = F.relu((y - norm_mean.view(shape)) / torch.sqrt(norm_var.view(shape) + 1e-5)
                 * t["gamma"].double().view(shape) + t["beta"].double().view(shape))
    return y, out, mean, var


def check(name, actual, expected, dtype):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    ok = err <= TOL[dtype] * scale and torch.isfinite(actual).all().item()
    print(f"  {name}: max err {err:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def run_infer(lib, t, case, out):
    n, c, c_out, h, w, groups, stride = case
    w_folded = torch.empty(t["weight"].numel(), device="cuda")
    bias = torch.empty(c_out, device="cuda")
    return lib.dpn_fast_grouped_conv_bn_relu_infer_cuda(
        p(t["x"]), p(t["weight"]), p(t["gamma"]), p(t["beta"]), p(t["mean"]), p(t["var"]), 1e-5,
        p(w_folded), p(bias), p(out), n, c, h, w, c_out, groups, stride, DTYPES[t["x"].dtype],
        stream())


def run_prologue_infer(lib, t, ib, case, out):
    n, c, c_out, h, w, groups, stride = case
    in_scale_shift = torch.empty(2 * c, device="cuda")
    w_folded = torch.empty(t["weight"].numel(), device="cuda")
    bias = torch.empty(c_out, device="cuda")
    return lib.dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda(
        p(t["x"]), p(t["weight"]), p(ib["gamma"]), p(ib["beta"]), p(ib["mean"]), p(ib["var"]),
        1e-5, p(t["gamma"]), p(t["beta"]), p(t["mean"]), p(t["var"]), 1e-5, p(in_scale_shift),
        p(w_folded), p(bias), p(out), n, c, h, w, c_out, groups, stride, DTYPES[t["x"].dtype],
        stream())


def time_ms(fn, iters=50):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="90")
    args = parser.parse_args()
    lib = build_library(args.arch)
    ok = True
    for case in CASES:
        n, c, c_out, h, w, groups, stride = case
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        for dtype in DTYPES:
            print(f"case {case} {dtype}")
            t = make(case, dtype)
            _, ref_out, _, _ = reference(t, stride, groups, training=False)
            out = torch.full((n, c_out, ho, wo), float("nan"), device="cuda", dtype=dtype)
            assert run_infer(lib, t, case, out) == 0
            ok &= check("eval out", out, ref_out, dtype)
            # Eval with the input BN + ReLU prologue.
            ib = make_input_bn(c)
            _, ref_pro, _, _ = reference(t, stride, groups, training=False,
                                         x=input_bn_relu(t["x"], ib))
            out_pro = torch.full_like(out, float("nan"))
            assert run_prologue_infer(lib, t, ib, case, out_pro) == 0
            ok &= check("eval out with input BN+ReLU", out_pro, ref_pro, dtype)
            # Training forward + BN/ReLU backward.
            y = torch.full_like(out, float("nan"))
            out_t = torch.full_like(out, float("nan"))
            saved_mean = torch.empty(c_out, device="cuda")
            saved_invstd = torch.empty(c_out, device="cuda")
            run_mean, run_var = t["mean"].clone(), t["var"].clone()
            assert lib.dpn_fast_grouped_conv_bn_relu_train_cuda(
                p(t["x"]), p(t["weight"]), p(t["gamma"]), p(t["beta"]), p(run_mean), p(run_var),
                1e-5, 0.9, p(y), p(out_t), p(saved_mean), p(saved_invstd), n, c, h, w, c_out,
                groups, stride, DTYPES[dtype], stream()) == 0
            ref_y, ref_train, ref_mean, ref_var = reference(t, stride, groups, training=True)
            ok &= check("train y", y, ref_y, dtype)
            ok &= check("train out", out_t, ref_train, dtype)
            ok &= check("running mean", run_mean, ref_mean, dtype)
            ok &= check("running var", run_var, ref_var, dtype)
            dout = torch.randn_like(out_t)
            y64 = ref_y.detach().clone().requires_grad_(True)
            gamma64 = t["gamma"].double().requires_grad_(True)
            beta64 = t["beta"].double().requires_grad_(True)
            o64 = F.relu(F.batch_norm(y64, None, None, gamma64, beta64, training=True, eps=1e-5))
            dy64, dg64, db64 = torch.autograd.grad(o64, [y64, gamma64, beta64], dout.double())
            dy = torch.full_like(y, float("nan"))
            dgamma, dbeta = torch.empty(c_out, device="cuda"), torch.empty(c_out, device="cuda")
            assert lib.dpn_fast_bn_relu_train_backward_cuda(
                p(y), p(out_t), p(dout), p(t["gamma"]), p(saved_mean), p(saved_invstd), p(dy),
                p(dgamma), p(dbeta), n, c_out, ho * wo, DTYPES[dtype], stream()) == 0
            ok &= check("dy", dy, dy64, dtype)
            ok &= check("dgamma", dgamma, dg64, dtype)
            ok &= check("dbeta", dbeta, db64, dtype)
            if dtype != torch.float32:
                continue
            fused = time_ms(lambda: run_infer(lib, t, case, out))
            mean, var = t["mean"].clone(), t["var"].clone()
            cudnn = time_ms(lambda: F.relu(F.batch_norm(
                F.conv2d(t["x"], t["weight"], stride=stride, padding=1, groups=groups), mean, var,
                t["gamma"], t["beta"], training=False, eps=1e-5)))
            line = f"  time fp32 eval: cuDNN+BN+ReLU {cudnn:.4f} ms, fused cuda {fused:.4f} ms"
            fused_pro = time_ms(lambda: run_prologue_infer(lib, t, ib, case, out_pro))
            in_mean, in_var = ib["mean"].clone(), ib["var"].clone()
            cudnn_pro = time_ms(lambda: F.relu(F.batch_norm(F.conv2d(F.relu(F.batch_norm(
                t["x"], in_mean, in_var, ib["gamma"], ib["beta"], training=False, eps=1e-5)),
                t["weight"], stride=stride, padding=1, groups=groups), mean, var, t["gamma"],
                t["beta"], training=False, eps=1e-5)))
            line += (f"; with input BN+ReLU: torch {cudnn_pro:.4f} ms, fused cuda "
                     f"{fused_pro:.4f} ms")
            try:
                sys.path.insert(0, os.path.join(ROOT, "kernels"))
                from grouped_conv_bn_relu import grouped_conv_bias_relu_forward
                scale = t["gamma"] / torch.sqrt(t["var"] + 1e-5)
                wf = (t["weight"] * scale[:, None, None, None]).contiguous()
                bias = t["beta"] - t["mean"] * scale
                tri_out = torch.full_like(out, float("nan"))
                grouped_conv_bias_relu_forward(t["x"], wf, bias, tri_out, n, c, h, w, c_out, groups,
                                               stride)
                ok &= check("triton eval out", tri_out, ref_out, dtype)
                tri = time_ms(lambda: grouped_conv_bias_relu_forward(
                    t["x"], wf, bias, tri_out, n, c, h, w, c_out, groups, stride))
                line += f", triton {tri:.4f} ms"
            except ImportError as err:
                line += f" (triton skipped: {err})"
            print(line)
    print("ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
