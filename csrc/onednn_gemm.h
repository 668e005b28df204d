// GEMMs on oneDNN's matmul primitive, framework-free: single precision, or bf16 operands with
// float32 accumulation and output. The 1x1 convolutions of a
// DPN block in channels-last layout are out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T: A is
// the activations, B the (transposed) weight, C the output rows, possibly a channel range of a
// bigger buffer (ldc its channels per pixel).
// oneDNN picks its kernels from the CPU's features, not its vendor (unlike the MKL that Paddle's
// own CPU convolutions call).
#pragma once
#include <cstdint>
#include <string>

#include "bf16.h"

namespace dpn_fast {

// c[m, n] (+)= sum_k a[m, k] * b[k, n]; row-major, row strides lda, ldb, ldc (elements).
// b_layout: how b is given. kTransposed: as [n, k] (row stride ldb), c = a x b^T: a channels-last
// 1x1 convolution, out[pixels, C_out] = in[pixels, C] x W[C_out, C]^T, whose weight oneDNN then
// repacks on every call. kPacked: that weight packed once (pack_weight; b is
// packed_weight_data(blob), ldb unused).
// scale_shift_relu: c = relu((a x b) * scale[j] + shift[j]) per column j (a BN + ReLU after the
// convolution, as oneDNN post-ops); gemm_f32 then takes the two [n] vectors.
// bf16: a and b are bf16 (b packed with bf16), products summed in float32, the post-ops float32,
// c float32 or, with c_bf16, the result rounded to bf16 (gemm_bf16).
enum class BLayout { kPlain, kTransposed, kPacked };

struct GemmShape {
  int64_t m, n, k;
  int64_t lda, ldb, ldc;
  bool accumulate;  // c += a x b (oneDNN's sum post-op) instead of c = a x b
  BLayout b_layout = BLayout::kPlain;
  bool scale_shift_relu = false;
  bool bf16 = false;
  bool c_bf16 = false;  // bf16 only
};

// Primitives are created once per shape and thread count and cached (thread-safe); each call
// brings its own scratchpad, so one primitive runs concurrently from several threads. Runs on
// cpu_threads() threads.
void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c,
              const float* scale = nullptr, const float* shift = nullptr);
// The same with s.bf16: a [m, k] bf16, b a bf16-packed weight (packed_weight_data); c float32,
// or bf16 with s.c_bf16.
void gemm_bf16(const GemmShape& s, const Bf16* a, const Bf16* b, float* c,
               const float* scale = nullptr, const float* shift = nullptr);
void gemm_bf16(const GemmShape& s, const Bf16* a, const Bf16* b, Bf16* c,
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
// k, then the packed values: a blob made on another CPU is refused (packed_weight_mismatch).
// bf16 (pack_weight's bf16): w rounded to bf16 (round_to_bf16) in the layout oneDNN's bf16 matmul
// (bf16 x bf16 -> float32) picks; its name ends in " bf16" (float32 names carry no data type, so
// blobs packed before bf16 existed still load). Packing bf16 throws unless that matmul runs on
// bf16 instructions (bf16_gemm_supported): an emulation would be slower than float32.
constexpr int64_t kPackReferenceRows = 784;

// Bytes of a blob's header: packed_weight_bytes includes it; a smaller buffer is no blob.
constexpr int64_t kPackedHeaderBytes = 128;

// Bytes of the blob of a packed [n, k] weight, header included.
int64_t packed_weight_bytes(int64_t n, int64_t k, bool bf16 = false);

// Packs w [n, k] (row-major, row stride ldw) into blob (packed_weight_bytes(n, k, bf16) bytes).
void pack_weight(int64_t n, int64_t k, const float* w, int64_t ldw, uint8_t* blob,
                 bool bf16 = false);

// Whether a blob (at least kPackedHeaderBytes) holds bf16 values.
bool packed_weight_is_bf16(const uint8_t* blob);

// "" if blob holds an [n, k] weight packed in the layout this CPU uses (for that data type), else
// what differs.
std::string packed_weight_mismatch(const uint8_t* blob, int64_t n, int64_t k, bool bf16 = false);

// The packed values of a blob: gemm_f32's (float) or gemm_bf16's (Bf16) b for BLayout::kPacked.
const void* packed_weight_data(const uint8_t* blob);

// "" if oneDNN runs bf16 matmuls on this CPU's bf16 instructions (AVX512_BF16 or AMX-BF16), else
// why not.
std::string bf16_gemm_unsupported_reason();

}  // namespace dpn_fast
