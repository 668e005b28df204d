// bf16 values on CPU, framework-free: the 16-bit type as its bit pattern and float32's rounding to
// it, shared by the GEMMs' operands and the kernels that read or write bf16 activations.
#pragma once
#include <cstdint>

namespace dpn_fast {

// bf16 as its bit pattern: the upper half of a float32.
using Bf16 = uint16_t;

// v rounded to bf16, to nearest even (as Paddle's cast to bfloat16); NaN stays NaN. Written for
// `#pragma omp simd` loops.
inline Bf16 round_to_bf16(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return Bf16(v != v ? (bits >> 16) | 0x40u : rounded);
}

// The float32 value of bf16 `v`.
inline float bf16_value(Bf16 v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

// v rounded to bf16, kept as float32: the value a bf16 kernel multiplies.
inline float bf16_rounded(float v) { return bf16_value(round_to_bf16(v)); }

// Two bf16 values in one 32-bit word, the first in the low half: what vdpbf16ps multiplies
// pairwise (two channels of an activation, two taps of a kernel row).
using Bf16Pair = uint32_t;

// first and second rounded to bf16, as one Bf16Pair.
inline Bf16Pair bf16_pair(float first, float second) {
  return uint32_t(round_to_bf16(first)) | uint32_t(round_to_bf16(second)) << 16;
}

}  // namespace dpn_fast
