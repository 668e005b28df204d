// Single-precision GEMM on oneDNN's matmul primitive, framework-free. The 1x1 convolutions of a
// DPN block in NCHW are, per image, out[C_out, HW] = W[C_out, C] x in[C, HW]: A is the weight,
// B the activation planes, C the output planes (possibly a channel range of a bigger buffer).
// oneDNN picks its kernels from the CPU's features, not its vendor (unlike the MKL that Paddle's
// own CPU convolutions call).
#pragma once
#include <cstdint>

namespace dpn_fast {

// c[m, n] (+)= sum_k a[m, k] * b[k, n]; row-major, row strides lda, ldb, ldc (elements).
struct GemmShape {
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool accumulate;  // c += a x b (oneDNN's sum post-op) instead of c = a x b
};

// Primitives are created once per shape and thread count and cached (thread-safe); each call
// brings its own scratchpad, so one primitive runs concurrently from several threads. Runs on
// cpu_threads() threads.
void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c);

// Name of the oneDNN implementation chosen for a shape (e.g. "brg_matmul:avx512_core").
const char* gemm_impl_name(const GemmShape& s);

}  // namespace dpn_fast
