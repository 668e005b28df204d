// CUDA cores of the dual-path merge (see csrc/dual_path_merge.h for the maths).
// Each (batch, channel) plane of hw elements resolves its source/destination pointers and BN
// affine once, then threads stride over hw, with 16-byte loads/stores where every plane
// involved is aligned (hw * sizeof(T) a multiple of 16 bytes). fp32 math for fp16/bf16 I/O.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

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

// kWidth consecutive elements, loaded/stored as one access (16 bytes when vectorised).
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T v[kWidth];
};

template <typename T>
constexpr int kVectorWidth = 16 / sizeof(T);

struct ActPlanes {
  void* p[kMaxActs];
};
struct ConstActPlanes {
  const void* p[kMaxActs];
};

// Block (x, y): x threads stride over the packs of a plane, y planes per block (small planes,
// e.g. 7x7, share a block); the grid's y strides over the n * C (batch, channel) planes.
template <typename T, int kWidth>
__global__ void merge_forward_kernel(const T* __restrict__ resid, const T* __restrict__ dense,
                                     const T* __restrict__ y, ChannelAffine affine,
                                     T* __restrict__ resid_out, T* __restrict__ dense_out,
                                     ActPlanes act, MergeShape s) {
  using P = Pack<T, kWidth>;
  const int64_t channels = s.channels(), cy = s.r + s.inc;
  const int64_t planes = s.n * channels, packs = s.hw / kWidth;
  for (int64_t plane = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; plane < planes;
       plane += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = plane / channels, c = plane % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
#pragma unroll  // constant indices keep the parameter struct out of local memory
    for (int a = 0; a < kMaxActs; ++a) {
      if (a < affine.num_acts) affine.at(a, c, &sc[a], &sh[a]);
    }
    const T *src, *add = nullptr;
    T* out = nullptr;
    if (c < s.r) {
      src = resid + (b * s.r + c) * s.hw;
      if (y != nullptr) {
        add = y + (b * cy + c) * s.hw;
        out = resid_out + (b * s.r + c) * s.hw;
      }
    } else {
      const int64_t k = c - s.r;  // channel within dense_out
      src = k < s.d ? dense + (b * s.dense_in_stride() + k) * s.hw
                    : y + (b * cy + s.r + k - s.d) * s.hw;
      // Old channels already in a stage buffer are only read.
      if (y != nullptr && !(s.dense_capacity && k < s.d)) {
        out = dense_out + (b * s.dense_out_stride() + k) * s.hw;
      }
    }
    P* act0 = affine.num_acts >= 1 ? reinterpret_cast<P*>(static_cast<T*>(act.p[0]) + plane * s.hw)
                                   : nullptr;
    P* act1 = affine.num_acts >= 2 ? reinterpret_cast<P*>(static_cast<T*>(act.p[1]) + plane * s.hw)
                                   : nullptr;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < packs;
         i += (int64_t)gridDim.x * blockDim.x) {
      const P xs = reinterpret_cast<const P*>(src)[i];
      P ys;
      if (add) ys = reinterpret_cast<const P*>(add)[i];
      P o, a0, a1;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        o.v[j] = add ? from_float<T>(to_float(xs.v[j]) + to_float(ys.v[j])) : xs.v[j];
        const float x = to_float(o.v[j]);  // BN sees the rounded merge, as the unfused sequence
        a0.v[j] = from_float<T>(relu(x * sc[0] + sh[0]));
        a1.v[j] = from_float<T>(relu(x * sc[1] + sh[1]));
      }
      if (out) reinterpret_cast<P*>(out)[i] = o;
      if (act0) act0[i] = a0;
      if (act1) act1[i] = a1;
    }
  }
}

template <typename T, int kWidth>
__global__ void merge_backward_kernel(const T* __restrict__ x_resid, const T* __restrict__ x_dense,
                                      const T* __restrict__ g_resid_out,
                                      const T* __restrict__ g_dense_out, ConstActPlanes g_act,
                                      ChannelAffine affine, T* __restrict__ g_resid,
                                      T* __restrict__ g_dense, T* __restrict__ g_y, MergeShape s) {
  using P = Pack<T, kWidth>;
  const int64_t channels = s.channels(), cy = s.r + s.inc, cd = s.d + s.inc;
  const int64_t planes = s.n * channels, packs = s.hw / kWidth;
  for (int64_t plane = blockIdx.y * (int64_t)blockDim.y + threadIdx.y; plane < planes;
       plane += (int64_t)gridDim.y * blockDim.y) {
    const int64_t b = plane / channels, c = plane % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
#pragma unroll  // constant indices keep the parameter struct out of local memory
    for (int a = 0; a < kMaxActs; ++a) {
      if (a < affine.num_acts) affine.at(a, c, &sc[a], &sh[a]);
    }
    const T *x = nullptr, *g_out;
    T *dst0, *dst1 = nullptr;
    if (c < s.r) {
      const int64_t off = (b * s.r + c) * s.hw;
      if (affine.num_acts) x = x_resid + off;
      g_out = g_resid_out ? g_resid_out + off : nullptr;
      dst0 = g_resid + off;
      if (g_y != nullptr) dst1 = g_y + (b * cy + c) * s.hw;
    } else {
      const int64_t k = c - s.r, off = (b * cd + k) * s.hw;
      if (affine.num_acts) x = x_dense + off;
      g_out = g_dense_out ? g_dense_out + off : nullptr;
      dst0 = k < s.d ? g_dense + (b * s.d + k) * s.hw : g_y + (b * cy + s.r + k - s.d) * s.hw;
    }
    const P* ga[kMaxActs];
#pragma unroll
    for (int a = 0; a < kMaxActs; ++a) {
      ga[a] = a < affine.num_acts && g_act.p[a]
                  ? reinterpret_cast<const P*>(static_cast<const T*>(g_act.p[a]) + plane * s.hw)
                  : nullptr;
    }
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < packs;
         i += (int64_t)gridDim.x * blockDim.x) {
      P xs, go, g0, g1, res;
      if (x) xs = reinterpret_cast<const P*>(x)[i];
      if (g_out) go = reinterpret_cast<const P*>(g_out)[i];
      if (ga[0]) g0 = ga[0][i];
      if (ga[1]) g1 = ga[1][i];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        float g = g_out ? to_float(go.v[j]) : 0.0f;
        if (ga[0] && to_float(xs.v[j]) * sc[0] + sh[0] > 0.0f) g += to_float(g0.v[j]) * sc[0];
        if (ga[1] && to_float(xs.v[j]) * sc[1] + sh[1] > 0.0f) g += to_float(g1.v[j]) * sc[1];
        res.v[j] = from_float<T>(g);
      }
      reinterpret_cast<P*>(dst0)[i] = res;
      if (dst1) reinterpret_cast<P*>(dst1)[i] = res;
    }
  }
}

// Planes are vector-aligned when the base pointers are and each plane's byte size is a multiple
// of 16 (cudaMalloc'd tensors are 256-byte aligned). At DPN's 224x224 shapes fp32 vectorises
// everywhere but 7x7; fp16/bf16 at 56x56 and 28x28.
bool vector_aligned(const void* const* ptrs, int count, int64_t hw, int elem_bytes) {
  if ((hw * elem_bytes) % 16 != 0) return false;
  for (int i = 0; i < count; ++i) {
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  }
  return true;
}

struct Launch {
  dim3 grid, block;
};

// 256 threads a block: up to 256 along a plane's packs, the rest over further planes.
Launch launch_for(const MergeShape& s, int64_t packs) {
  const int threads_x = packs >= 256 ? 256 : packs >= 128 ? 128 : packs >= 64 ? 64 : 32;
  const int threads_y = 256 / threads_x;
  const int64_t planes = s.n * s.channels();
  const int64_t grid_x = std::min<int64_t>((packs + threads_x - 1) / threads_x, 64);
  const int64_t grid_y = std::min<int64_t>((planes + threads_y - 1) / threads_y, 65535);
  return {dim3(static_cast<unsigned>(std::max<int64_t>(grid_x, 1)),
               static_cast<unsigned>(std::max<int64_t>(grid_y, 1))),
          dim3(threads_x, threads_y)};
}

template <typename T>
int forward_typed(const void* resid, const void* dense, const void* y, const ChannelAffine& aff,
                  void* resid_out, void* dense_out, void* const* act, const MergeShape& s,
                  cudaStream_t stream) {
  ActPlanes planes{};
  for (int a = 0; a < aff.num_acts; ++a) planes.p[a] = act[a];
  const void* ptrs[] = {resid, dense, y, resid_out, dense_out, planes.p[0], planes.p[1]};
  constexpr int kWide = kVectorWidth<T>;
  if (vector_aligned(ptrs, 7, s.hw, sizeof(T))) {
    const Launch l = launch_for(s, s.hw / kWide);
    merge_forward_kernel<T, kWide><<<l.grid, l.block, 0, stream>>>(
        static_cast<const T*>(resid), static_cast<const T*>(dense), static_cast<const T*>(y), aff,
        static_cast<T*>(resid_out), static_cast<T*>(dense_out), planes, s);
  } else {
    const Launch l = launch_for(s, s.hw);
    merge_forward_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(
        static_cast<const T*>(resid), static_cast<const T*>(dense), static_cast<const T*>(y), aff,
        static_cast<T*>(resid_out), static_cast<T*>(dense_out), planes, s);
  }
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
  constexpr int kWide = kVectorWidth<T>;
  if (vector_aligned(ptrs, 9, s.hw, sizeof(T))) {
    const Launch l = launch_for(s, s.hw / kWide);
    merge_backward_kernel<T, kWide><<<l.grid, l.block, 0, stream>>>(
        static_cast<const T*>(x_resid), static_cast<const T*>(x_dense),
        static_cast<const T*>(g_resid_out), static_cast<const T*>(g_dense_out), planes, aff,
        static_cast<T*>(g_resid), static_cast<T*>(g_dense), static_cast<T*>(g_y), s);
  } else {
    const Launch l = launch_for(s, s.hw);
    merge_backward_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(
        static_cast<const T*>(x_resid), static_cast<const T*>(x_dense),
        static_cast<const T*>(g_resid_out), static_cast<const T*>(g_dense_out), planes, aff,
        static_cast<T*>(g_resid), static_cast<T*>(g_dense), static_cast<T*>(g_y), s);
  }
  return cudaGetLastError() == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError;
}

bool valid(const MergeShape& s, const ChannelAffine* aff) {
  return s.n >= 0 && s.r > 0 && s.d >= 0 && s.inc >= 0 && s.hw >= 0 && s.dense_capacity >= 0 &&
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
