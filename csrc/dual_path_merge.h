// Dual-path merge (DPN block tail) fused with the next block's head, framework-free core.
//   resid_out = resid + y[:, :R]                      [N, R, H, W]
//   dense_out = concat(dense, y[:, R:])               [N, D + inc, H, W]
//   act[a]    = relu(concat(resid_out, dense_out) * scale[a] + shift[a])   a < num_acts (0..2)
// Head-only form (concat_bn_relu): y == nullptr, inc == 0, no resid_out/dense_out, act only.
// Buffer form (inference): dense_out == dense, a stage-wide buffer (MergeShape::dense_capacity).
// All tensors are contiguous NCHW; per-channel parameters are fp32 whatever the I/O dtype.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DPN_FAST_HOST_DEVICE __host__ __device__
#else
#define DPN_FAST_HOST_DEVICE
#endif

namespace dpn_fast {

struct MergeShape {
  int64_t n;    // batch
  int64_t r;    // residual channels
  int64_t d;    // dense channels in
  int64_t inc;  // dense channels added (y has r + inc); 0 in the head-only form
  int64_t hw;   // spatial size
  // 0: dense [n, d] and dense_out [n, d + inc] are separate tensors. > 0 (forward only): both are
  // one stage-wide buffer of this many channels per batch item holding the d old channels; only
  // the inc new ones are written (at channels d .. d + inc), the old ones are just read.
  int64_t dense_capacity = 0;
  DPN_FAST_HOST_DEVICE int64_t dense_in_stride() const { return dense_capacity ? dense_capacity : d; }
  DPN_FAST_HOST_DEVICE int64_t dense_out_stride() const {
    return dense_capacity ? dense_capacity : d + inc;
  }
  DPN_FAST_HOST_DEVICE int64_t channels() const { return r + d + inc; }  // of the BN'd concat
};

// Per-channel affine maps of the BN(+ReLU) outputs: either already folded (scale, shift) or raw
// eval BatchNorm parameters, folded per channel in the kernel (so no folded copy can go stale).
constexpr int kMaxActs = 2;
struct ChannelAffine {
  int num_acts = 0;
  const float* scale[kMaxActs] = {};  // folded scale, or BN weight when var != nullptr
  const float* shift[kMaxActs] = {};  // folded shift, or BN bias when var != nullptr
  const float* mean[kMaxActs] = {};   // BN running mean (nullptr: scale/shift are folded)
  const float* var[kMaxActs] = {};    // BN running variance
  float eps[kMaxActs] = {};

  // act = relu(x * s + t) for channel c of output a; same formula as paddle's eval BatchNorm.
  DPN_FAST_HOST_DEVICE void at(int a, int64_t c, float* s, float* t) const {
    if (var[a] == nullptr) {
      *s = scale[a][c];
      *t = shift[a][c];
    } else {
      const float inv_std = 1.0f / sqrtf(var[a][c] + eps[a]);
      *s = scale[a][c] * inv_std;
      *t = shift[a][c] - mean[a][c] * *s;
    }
  }
};

// Forward. resid_out/dense_out must be non-null when y is; act[a] is [N, C, H, W] per output.
void dual_path_merge_forward_cpu(const float* resid, const float* dense, const float* y,
                                 const ChannelAffine& affine, float* resid_out, float* dense_out,
                                 float* const* act, const MergeShape& s);

// Backward. x_resid/x_dense: the BN'd concat's two parts (resid_out/dense_out, or the head-only
// form's inputs); read only when affine.num_acts > 0. Any of g_resid_out/g_dense_out/g_act[a] may
// be nullptr (unused output: zero gradient). Writes g_resid [N,R], g_dense [N,D], and g_y
// [N,R+inc] when y was given (inc > 0).
void dual_path_merge_backward_cpu(const float* x_resid, const float* x_dense,
                                  const float* g_resid_out, const float* g_dense_out,
                                  const float* const* g_act, const ChannelAffine& affine,
                                  float* g_resid, float* g_dense, float* g_y, const MergeShape& s);

}  // namespace dpn_fast

// CUDA launchers (csrc/dual_path_merge.cu), C ABI so they can be called without Paddle.
// Pointers as in the CPU functions; `act`/`g_act` point at host arrays of affine->num_acts device
// pointers; `affine` is a host struct of device pointers (nullptr: no BN outputs). dtype is a
// dpn_fast::DType for the activations; `stream` is a cudaStream_t. Returns a dpn_fast::Status.
// dense_capacity as MergeShape::dense_capacity (0: dense and dense_out are separate tensors).
extern "C" int dpn_fast_dual_path_merge_forward_cuda(
    const void* resid, const void* dense, const void* y, const dpn_fast::ChannelAffine* affine,
    void* resid_out, void* dense_out, void* const* act, int64_t n, int64_t r, int64_t d,
    int64_t inc, int64_t hw, int64_t dense_capacity, int dtype, void* stream);

extern "C" int dpn_fast_dual_path_merge_backward_cuda(
    const void* x_resid, const void* x_dense, const void* g_resid_out, const void* g_dense_out,
    const void* const* g_act, const dpn_fast::ChannelAffine* affine, void* g_resid,
    void* g_dense, void* g_y, int64_t n, int64_t r, int64_t d, int64_t inc, int64_t hw, int dtype,
    void* stream);
