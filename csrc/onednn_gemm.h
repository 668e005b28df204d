// Single-precision GEMM on oneDNN's matmul primitive, framework-free. The 1x1 convolutions of a
// DPN block in channels-last layout are out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T: A is
// the activations, B the (transposed) weight, C the output rows, possibly a channel range of a
// bigger buffer (ldc its channels per pixel).
// oneDNN picks its kernels from the CPU's features, not its vendor (unlike the MKL that Paddle's
// own CPU convolutions call).
#pragma once
#include <cstdint>
#include <string>

namespace dpn_fast {

// c[m, n] (+)= sum_k a[m, k] * b[k, n]; row-major, row strides lda, ldb, ldc (elements).
// b_layout: how b is given. kTransposed: as [n, k] (row stride ldb), c = a x b^T: a channels-last
// 1x1 convolution, out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T, whose weight oneDNN then
// repacks on every call. kPacked: that weight packed once (pack_weight; b is
// packed_weight_data(blob), ldb unused).
// scale_shift_relu: c = relu((a x b) * scale[j] + shift[j]) per column j (a BN + ReLU after the
// convolution, as oneDNN post-ops); gemm_f32 then takes the two [n] vectors.
enum class BLayout { kPlain, kTransposed, kPacked };

struct GemmShape {
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool accumulate;  // c += a x b (oneDNN's sum post-op) instead of c = a x b
  BLayout b_layout = BLayout::kPlain;
  bool scale_shift_relu = false;
};

// Primitives are created once per shape and thread count and cached (thread-safe); each call
// brings its own scratchpad, so one primitive runs concurrently from several threads. Runs on
// cpu_threads() threads.
void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c,
              const float* scale = nullptr, const float* shift = nullptr);

// Name of the oneDNN implementation chosen for a shape (e.g. "brg_matmul:avx512_core").
const char* gemm_impl_name(const GemmShape& s);

// A 1x1 convolution's weight W [n, k] laid out once for this CPU: oneDNN's packed format, the one
// its matmul picks for weights of format `any`, which its kernels then read without repacking.
// The format must not depend on the number of pixels (m: image size and batch are unknown when
// weights are packed): it is the one picked for kPackReferenceRows rows on one thread, and every
// GEMM on packed weights checks at primitive creation that oneDNN runs it with the
// implementation that picked it (else it throws: a slower fallback, not a wrong answer).
// The format follows the CPU's features, so a blob is a header naming its layout (the
// implementation, e.g. "brg_matmul:avx512_core", and oneDNN's format tag, e.g. "BA16a64b"), n and
// k, then the packed floats: a blob made on another CPU is refused (packed_weight_mismatch).
constexpr int64_t kPackReferenceRows = 784;

// Bytes of the blob of a packed [n, k] weight, header included.
int64_t packed_weight_bytes(int64_t n, int64_t k);

// Packs w [n, k] (row-major, row stride ldw) into blob (packed_weight_bytes(n, k) bytes).
void pack_weight(int64_t n, int64_t k, const float* w, int64_t ldw, uint8_t* blob);

// "" if blob holds an [n, k] weight packed in the layout this CPU uses, else what differs.
std::string packed_weight_mismatch(const uint8_t* blob, int64_t n, int64_t k);

// The packed floats of a blob: gemm_f32's b for BLayout::kPacked.
const float* packed_weight_data(const uint8_t* blob);

}  // namespace dpn_fast
