// CUDA cores of the dual-path merge (see csrc/dual_path_merge.h for the maths).
// Per batch item the BN'd concat is three contiguous runs of the tensors involved: channels
// [0, r) (resid, y's first r), [r, r + d) (old dense) and [r + d, C) (y's new dense channels).
// A thread takes kWidth consecutive elements of one item, so 7x7 and 14x14 planes keep every
// thread busy and vectorise like large ones; the BN affine is re-read only where the elements
// cross into the next channel. kWidth is the widest (up to 16 bytes) that every run length and
// base pointer allows. fp32 math for fp16/bf16 I/O.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common.h"
#include "dual_path_merge.h"

namespace {

using dpn_fast::ChannelAffine;
using dpn_fast::kMaxActs;
using dpn_fast::MergeShape;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float relu(float v) { return v > 0.0f ? v : 0.0f; }

// kWidth consecutive elements, loaded/stored as one access.
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

struct ActPlanes {
  void* p[kMaxActs];
};
struct ConstActPlanes {
  const void* p[kMaxActs];
};

// Element offsets of one batch item's runs: [0, resid_end) resid, [resid_end, dense_end) old
// dense, [dense_end, total) new dense. 32-bit: the launchers refuse items of 2^31 elements.
struct ItemRuns {
  int resid_end, dense_end, total;
  __device__ explicit ItemRuns(const MergeShape& s)
      : resid_end(static_cast<int>(s.r * s.hw)),
        dense_end(static_cast<int>((s.r + s.d) * s.hw)),
        total(static_cast<int>(s.channels() * s.hw)) {}
};

// The BN affines of channel c, kept in registers while a pack stays in that channel.
struct AffineCache {
  float sc[kMaxActs] = {}, sh[kMaxActs] = {};
  __device__ void load(const ChannelAffine& affine, int64_t c) {
#pragma unroll  // constant indices keep the parameter struct out of local memory
    for (int a = 0; a < kMaxActs; ++a) {
      if (a < affine.num_acts) affine.at(a, c, &sc[a], &sh[a]);
    }
  }
};

// grid.x covers an item's packs, grid.y strides over the batch.
template <typename T, int kWidth>
__global__ void merge_forward_kernel(const T* __restrict__ resid, const T* __restrict__ dense,
                                     const T* __restrict__ y, ChannelAffine affine,
                                     T* __restrict__ resid_out, T* __restrict__ dense_out,
                                     ActPlanes act, MergeShape s) {
  using P = Pack<T, kWidth>;
  const ItemRuns runs(s);
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;  // element within the item
  if (e >= runs.total) return;
  const int hw = static_cast<int>(s.hw);
  const int64_t cy = s.r + s.inc;
  for (int64_t b = blockIdx.y; b < s.n; b += gridDim.y) {
    const T *src, *add = nullptr;
    T* out = nullptr;
    if (e < runs.resid_end) {
      src = resid + b * runs.resid_end + e;
      if (y != nullptr) {
        add = y + b * cy * s.hw + e;
        out = resid_out + b * runs.resid_end + e;
      }
    } else if (e < runs.dense_end) {
      const int k = e - runs.resid_end;
      src = dense + b * s.dense_in_stride() * s.hw + k;
      // Old channels already in a stage buffer are only read.
      if (y != nullptr && !s.dense_capacity) out = dense_out + b * s.dense_out_stride() * s.hw + k;
    } else {
      const int k = e - runs.dense_end;
      src = y + (b * cy + s.r) * s.hw + k;
      out = dense_out + (b * s.dense_out_stride() + s.d) * s.hw + k;
    }
    const P xs = *reinterpret_cast<const P*>(src);
    P ys;
    if (add) ys = *reinterpret_cast<const P*>(add);
    P o, a0, a1;
    int c = e / hw, pos = e - c * hw;
    AffineCache aff;
    aff.load(affine, c);
#pragma unroll
    for (int j = 0; j < kWidth; ++j, ++pos) {
      if (pos == hw) {  // the pack runs into the next channel
        pos = 0;
        aff.load(affine, ++c);
      }
      o.v[j] = add ? from_float<T>(to_float(xs.v[j]) + to_float(ys.v[j])) : xs.v[j];
      const float x = to_float(o.v[j]);  // BN sees the rounded merge, as the unfused sequence
      a0.v[j] = from_float<T>(relu(x * aff.sc[0] + aff.sh[0]));
      a1.v[j] = from_float<T>(relu(x * aff.sc[1] + aff.sh[1]));
    }
    if (out) *reinterpret_cast<P*>(out) = o;
    const int64_t act_offset = b * runs.total + e;
    if (affine.num_acts >= 1) *reinterpret_cast<P*>(static_cast<T*>(act.p[0]) + act_offset) = a0;
    if (affine.num_acts >= 2) *reinterpret_cast<P*>(static_cast<T*>(act.p[1]) + act_offset) = a1;
  }
}

template <typename T, int kWidth>
__global__ void merge_backward_kernel(const T* __restrict__ x_resid, const T* __restrict__ x_dense,
                                      const T* __restrict__ g_resid_out,
                                      const T* __restrict__ g_dense_out, ConstActPlanes g_act,
                                      ChannelAffine affine, T* __restrict__ g_resid,
                                      T* __restrict__ g_dense, T* __restrict__ g_y, MergeShape s) {
  using P = Pack<T, kWidth>;
  const ItemRuns runs(s);
  const int e = (blockIdx.x * blockDim.x + threadIdx.x) * kWidth;
  if (e >= runs.total) return;
  const int hw = static_cast<int>(s.hw);
  const int64_t cy = s.r + s.inc, dense_out_elems = (s.d + s.inc) * s.hw;
  for (int64_t b = blockIdx.y; b < s.n; b += gridDim.y) {
    // x and g_out: the forward's resid_out / dense_out parts (dense_out holds old + new).
    int64_t out_offset;
    const T *x_base, *g_out_base;
    T *dst0, *dst1 = nullptr;
    if (e < runs.resid_end) {
      out_offset = b * runs.resid_end + e;
      x_base = x_resid;
      g_out_base = g_resid_out;
      dst0 = g_resid + out_offset;
      if (g_y != nullptr) dst1 = g_y + b * cy * s.hw + e;
    } else {
      const int k = e - runs.resid_end;
      out_offset = b * dense_out_elems + k;
      x_base = x_dense;
      g_out_base = g_dense_out;
      dst0 = e < runs.dense_end ? g_dense + b * s.d * s.hw + k
                                : g_y + (b * cy + s.r) * s.hw + (e - runs.dense_end);
    }
    P xs, go, g0, g1, res;
    if (affine.num_acts) xs = *reinterpret_cast<const P*>(x_base + out_offset);
    if (g_out_base) go = *reinterpret_cast<const P*>(g_out_base + out_offset);
    const int64_t act_offset = b * runs.total + e;
    const bool has_g0 = affine.num_acts >= 1 && g_act.p[0];
    const bool has_g1 = affine.num_acts >= 2 && g_act.p[1];
    if (has_g0) g0 = *reinterpret_cast<const P*>(static_cast<const T*>(g_act.p[0]) + act_offset);
    if (has_g1) g1 = *reinterpret_cast<const P*>(static_cast<const T*>(g_act.p[1]) + act_offset);
    int c = e / hw, pos = e - c * hw;
    AffineCache aff;
    aff.load(affine, c);
#pragma unroll
    for (int j = 0; j < kWidth; ++j, ++pos) {
      if (pos == hw) {
        pos = 0;
        aff.load(affine, ++c);
      }
      float g = g_out_base ? to_float(go.v[j]) : 0.0f;
      const float x = affine.num_acts ? to_float(xs.v[j]) : 0.0f;
      if (has_g0 && x * aff.sc[0] + aff.sh[0] > 0.0f) g += to_float(g0.v[j]) * aff.sc[0];
      if (has_g1 && x * aff.sc[1] + aff.sh[1] > 0.0f) g += to_float(g1.v[j]) * aff.sc[1];
      res.v[j] = from_float<T>(g);
    }
    *reinterpret_cast<P*>(dst0) = res;
    if (dst1) *reinterpret_cast<P*>(dst1) = res;
  }
}

// The widest pack (elements, at most 16 bytes) that divides every run length (channels * hw,
// so no pack straddles two tensors) and to whose size every base pointer is aligned.
template <typename T>
int pack_width(const MergeShape& s, const void* const* ptrs, int count) {
  const int64_t runs[] = {s.r * s.hw, s.d * s.hw, s.inc * s.hw, s.dense_capacity * s.hw};
  for (int width = 16 / static_cast<int>(sizeof(T)); width > 1; width /= 2) {
    bool ok = true;
    for (int64_t run : runs) ok = ok && run % width == 0;
    for (int i = 0; i < count; ++i) {
      ok = ok && reinterpret_cast<uintptr_t>(ptrs[i]) % (width * sizeof(T)) == 0;
    }
    if (ok) return width;
  }
  return 1;
}

constexpr int kThreads = 256;

// Runs launch(std::integral_constant<int, width>) for a width pack_width<T> returned.
template <typename T, typename Launch>
void dispatch_width(int width, Launch&& launch) {
  if constexpr (sizeof(T) <= 2) {
    if (width == 8) return launch(std::integral_constant<int, 8>{});
  }
  if (width == 4) return launch(std::integral_constant<int, 4>{});
  if (width == 2) return launch(std::integral_constant<int, 2>{});
  launch(std::integral_constant<int, 1>{});
}

dim3 grid_for(const MergeShape& s, int width) {
  const int64_t packs = s.channels() * s.hw / width;
  return dim3(static_cast<unsigned>((packs + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::min<int64_t>(s.n, 65535)));
}

template <typename T>
int forward_typed(const void* resid, const void* dense, const void* y, const ChannelAffine& aff,
                  void* resid_out, void* dense_out, void* const* act, const MergeShape& s,
                  cudaStream_t stream) {
  ActPlanes planes{};
  for (int a = 0; a < aff.num_acts; ++a) planes.p[a] = act[a];
  const void* ptrs[] = {resid, dense, y, resid_out, dense_out, planes.p[0], planes.p[1]};
  const int width = pack_width<T>(s, ptrs, 7);
  dispatch_width<T>(width, [&](auto w) {
    merge_forward_kernel<T, decltype(w)::value><<<grid_for(s, w), kThreads, 0, stream>>>(
        static_cast<const T*>(resid), static_cast<const T*>(dense), static_cast<const T*>(y), aff,
        static_cast<T*>(resid_out), static_cast<T*>(dense_out), planes, s);
  });
  return cudaGetLastError() == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError;
}

template <typename T>
int backward_typed(const void* x_resid, const void* x_dense, const void* g_resid_out,
                   const void* g_dense_out, const void* const* g_act, const ChannelAffine& aff,
                   void* g_resid, void* g_dense, void* g_y, const MergeShape& s,
                   cudaStream_t stream) {
  ConstActPlanes planes{};
  for (int a = 0; a < aff.num_acts; ++a) planes.p[a] = g_act[a];
  const void* ptrs[] = {x_resid, x_dense, g_resid_out, g_dense_out, planes.p[0], planes.p[1],
                        g_resid, g_dense, g_y};
  const int width = pack_width<T>(s, ptrs, 9);
  dispatch_width<T>(width, [&](auto w) {
    merge_backward_kernel<T, decltype(w)::value><<<grid_for(s, w), kThreads, 0, stream>>>(
        static_cast<const T*>(x_resid), static_cast<const T*>(x_dense),
        static_cast<const T*>(g_resid_out), static_cast<const T*>(g_dense_out), planes, aff,
        static_cast<T*>(g_resid), static_cast<T*>(g_dense), static_cast<T*>(g_y), s);
  });
  return cudaGetLastError() == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError;
}

// Item offsets are 32-bit (an item of 2^31 elements is far beyond DPN's sizes).
bool valid(const MergeShape& s, const ChannelAffine* aff) {
  return s.n >= 0 && s.r > 0 && s.d >= 0 && s.inc >= 0 && s.hw >= 0 && s.dense_capacity >= 0 &&
         std::max(s.channels(), s.dense_capacity) * s.hw < INT_MAX &&
         (aff == nullptr || (aff->num_acts >= 0 && aff->num_acts <= kMaxActs));
}

}  // namespace

extern "C" int dpn_fast_dual_path_merge_forward_cuda(
    const void* resid, const void* dense, const void* y, const dpn_fast::ChannelAffine* affine,
    void* resid_out, void* dense_out, void* const* act, int64_t n, int64_t r, int64_t d,
    int64_t inc, int64_t hw, int64_t dense_capacity, int dtype, void* stream) {
  const MergeShape s{n, r, d, inc, hw, dense_capacity};
  if (!valid(s, affine) || (y == nullptr && inc != 0)) return dpn_fast::kInvalidArgument;
  if (dense_capacity && (dense != dense_out || d + inc > dense_capacity || y == nullptr)) {
    return dpn_fast::kInvalidArgument;
  }
  const ChannelAffine aff = affine ? *affine : ChannelAffine{};
  if (s.n * s.channels() * s.hw == 0) return dpn_fast::kOk;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case dpn_fast::kFloat32:
      return forward_typed<float>(resid, dense, y, aff, resid_out, dense_out, act, s, st);
    case dpn_fast::kFloat16:
      return forward_typed<__half>(resid, dense, y, aff, resid_out, dense_out, act, s, st);
    case dpn_fast::kBFloat16:
      return forward_typed<__nv_bfloat16>(resid, dense, y, aff, resid_out, dense_out, act, s, st);
    default:
      return dpn_fast::kInvalidArgument;
  }
}

extern "C" int dpn_fast_dual_path_merge_backward_cuda(
    const void* x_resid, const void* x_dense, const void* g_resid_out, const void* g_dense_out,
    const void* const* g_act, const dpn_fast::ChannelAffine* affine, void* g_resid,
    void* g_dense, void* g_y, int64_t n, int64_t r, int64_t d, int64_t inc, int64_t hw, int dtype,
    void* stream) {
  const MergeShape s{n, r, d, inc, hw};
  if (!valid(s, affine) || (g_y == nullptr && inc != 0)) return dpn_fast::kInvalidArgument;
  const ChannelAffine aff = affine ? *affine : ChannelAffine{};
  if (s.n * s.channels() * s.hw == 0) return dpn_fast::kOk;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case dpn_fast::kFloat32:
      return backward_typed<float>(x_resid, x_dense, g_resid_out, g_dense_out, g_act, aff, g_resid,
                                   g_dense, g_y, s, st);
    case dpn_fast::kFloat16:
      return backward_typed<__half>(x_resid, x_dense, g_resid_out, g_dense_out, g_act, aff,
                                    g_resid, g_dense, g_y, s, st);
    case dpn_fast::kBFloat16:
      return backward_typed<__nv_bfloat16>(x_resid, x_dense, g_resid_out, g_dense_out, g_act, aff,
                                           g_resid, g_dense, g_y, s, st);
    default:
      return dpn_fast::kInvalidArgument;
  }
}
