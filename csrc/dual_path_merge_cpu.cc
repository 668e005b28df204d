#include <cstring>

#include "dual_path_merge.h"

namespace dpn_fast {

void dual_path_merge_forward_cpu(const float* resid, const float* dense, const float* y,
                                 float* resid_out, float* dense_out, const MergeShape& s) {
  const int64_t cy = s.r + s.inc, cd = s.d + s.inc;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.n; ++b) {
    for (int64_t c = 0; c < s.r + cd; ++c) {
      if (c < s.r) {
        const float* a = resid + (b * s.r + c) * s.hw;
        const float* t = y + (b * cy + c) * s.hw;
        float* o = resid_out + (b * s.r + c) * s.hw;
        for (int64_t i = 0; i < s.hw; ++i) o[i] = a[i] + t[i];
      } else {
        const int64_t k = c - s.r;
        const float* src = k < s.d ? dense + (b * s.d + k) * s.hw : y + (b * cy + s.r + k - s.d) * s.hw;
        std::memcpy(dense_out + (b * cd + k) * s.hw, src, sizeof(float) * s.hw);
      }
    }
  }
}

}  // namespace dpn_fast
