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

}  // namespace dpn_fast
