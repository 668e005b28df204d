// Single-precision GEMM on oneDNN's matmul primitive, framework-free. The 1x1 convolutions of a
// DPN block in channels-last layout are out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T: A is
// the activations, B the (transposed) weight, C the output rows, possibly a channel range of a
// bigger buffer (ldc its channels per pixel).
// oneDNN picks its kernels from the CPU's features, not its vendor (unlike the MKL that Paddle's
// own CPU convolutions call).
#pragma once
#include <cstdint>

namespace dpn_fast {

// c[m, n] (+)= sum_k a[m, k] * b[k, n]; row-major, row strides lda, ldb, ldc (elements).
// b_transposed: b is given as [n, k] (row stride ldb), c = a x b^T: a channels-last 1x1
// convolution, out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T.
// scale_shift_relu: c = relu((a x b) * scale[j] + shift[j]) per column j (a BN + ReLU after the
// convolution, as oneDNN post-ops); gemm_f32 then takes the two [n] vectors.
struct GemmShape {
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool accumulate;  // c += a x b (oneDNN's sum post-op) instead of c = a x b
  bool b_transposed = false;
  bool scale_shift_relu = false;
};

// Primitives are created once per shape and thread count and cached (thread-safe); each call
// brings its own scratchpad, so one primitive runs concurrently from several threads. Runs on
// cpu_threads() threads.
void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c,
              const float* scale = nullptr, const float* shift = nullptr);

// Name of the oneDNN implementation chosen for a shape (e.g. "brg_matmul:avx512_core").
const char* gemm_impl_name(const GemmShape& s);

}  // namespace dpn_fast
