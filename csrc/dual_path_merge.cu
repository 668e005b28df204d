#include <cuda_runtime.h>

#include "common.h"
#include "dual_path_merge.h"

namespace {

__global__ void merge_forward_f32(const float* __restrict__ resid, const float* __restrict__ dense,
                                  const float* __restrict__ y, float* __restrict__ resid_out,
                                  float* __restrict__ dense_out, int64_t r, int64_t d, int64_t inc,
                                  int64_t hw, int64_t total) {
  const int64_t cy = r + inc, cd = d + inc, cout = r + cd;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % hw, c = (i / hw) % cout, b = i / (hw * cout);
    if (c < r) {
      resid_out[(b * r + c) * hw + p] = resid[(b * r + c) * hw + p] + y[(b * cy + c) * hw + p];
    } else {
      const int64_t k = c - r;
      dense_out[(b * cd + k) * hw + p] =
          k < d ? dense[(b * d + k) * hw + p] : y[(b * cy + r + k - d) * hw + p];
    }
  }
}

}  // namespace

extern "C" int dpn_fast_dual_path_merge_forward_cuda(const void* resid, const void* dense,
                                                     const void* y, void* resid_out,
                                                     void* dense_out, int64_t n, int64_t r,
                                                     int64_t d, int64_t inc, int64_t hw,
                                                     int dtype, void* stream) {
  if (dtype != dpn_fast::kFloat32) return dpn_fast::kInvalidArgument;
  const int64_t total = n * (r + d + inc) * hw;
  const int threads = 256;
  const int blocks = (int)((total + threads - 1) / threads < 65535 ? (total + threads - 1) / threads : 65535);
  merge_forward_f32<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(resid), static_cast<const float*>(dense),
      static_cast<const float*>(y), static_cast<float*>(resid_out), static_cast<float*>(dense_out),
      r, d, inc, hw, total);
  return cudaGetLastError() == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError;
}
