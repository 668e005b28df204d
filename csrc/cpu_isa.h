// The CPU cores' per-instruction-set variants (framework-free). A core compiles its register
// tile once per ISA (cpu_isa_variants.inc: namespaces isa_avx512 / isa_avx2 / isa_baseline, each
// under a `#pragma GCC target`) and picks one at run time with detect_isa(); so a library built
// without -march=native (DPN_FAST_NATIVE=OFF) still runs AVX-512 code where the CPU has it.
#pragma once
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DPN_FAST_HAVE_X86_VARIANTS 1
#endif

namespace dpn_fast {

enum class Isa { kAvx512, kAvx2, kBaseline };

// The widest instruction set the CPU supports, capped by DPN_FAST_CPU_ISA ("avx2", "baseline";
// lets the tests run every variant on one machine).
inline Isa detect_isa() {
  const char* cap = std::getenv("DPN_FAST_CPU_ISA");
  const std::string limit = cap ? cap : "";
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  if (limit.empty() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (limit != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// Whether the vdpbf16ps variants (cpu_isa_bf16_variant.inc) run here: AVX512_BF16, and the
// AVX-512 kernels not held back by DPN_FAST_CPU_ISA.
inline bool avx512_bf16_pairs() {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  return detect_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// DPN_FAST_CPU_ISA's spelling of an ISA.
inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace dpn_fast
