// Dual-path merge, framework-free core.
//   resid_out = resid + y[:, :R]
//   dense_out = concat(dense, y[:, R:])
#pragma once
#include <cstdint>

namespace dpn_fast {

struct MergeShape {
  int64_t n;    // batch
  int64_t r;    // residual channels
  int64_t d;    // dense channels in
  int64_t inc;  // dense channels added (y has r + inc)
  int64_t hw;   // spatial size
};

void dual_path_merge_forward_cpu(const float* resid, const float* dense, const float* y,
                                 float* resid_out, float* dense_out, const MergeShape& s);

}  // namespace dpn_fast

// CUDA launcher (csrc/dual_path_merge.cu), C ABI so it can be called without Paddle.
// `stream` is a cudaStream_t. Returns a dpn_fast::Status.
extern "C" int dpn_fast_dual_path_merge_forward_cuda(const void* resid, const void* dense,
                                                     const void* y, void* resid_out,
                                                     void* dense_out, int64_t n, int64_t r,
                                                     int64_t d, int64_t inc, int64_t hw,
                                                     int dtype, void* stream);
