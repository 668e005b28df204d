// CUDA cores of the dual-path merge (see csrc/dual_path_merge.h for the maths).
// One block row = one (batch, channel) plane of hw elements: the channel's source pointers and
// BN affine are resolved once per plane, then threads stride over hw with vector loads where
// every plane involved is aligned (hw * sizeof(T) a multiple of 16 bytes).
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

// 16-byte vector of T.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

struct ActPlanes {
  void* p[kMaxActs];
};
struct ConstActPlanes {
  const void* p[kMaxActs];
};

// Grid: x strides over the hw elements of a plane (in vectors), y/z over the n * C planes.
template <typename T, int kWidth>
__global__ void merge_forward_kernel(const T* __restrict__ resid, const T* __restrict__ dense,
                                     const T* __restrict__ y, ChannelAffine affine,
                                     T* __restrict__ resid_out, T* __restrict__ dense_out,
                                     ActPlanes act, MergeShape s) {
  const int64_t channels = s.channels(), cy = s.r + s.inc, cd = s.d + s.inc;
  const int64_t planes = s.n * channels;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t b = plane / channels, c = plane % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
    for (int a = 0; a < affine.num_acts; ++a) affine.at(a, c, &sc[a], &sh[a]);
    const T *src, *add = nullptr;
    T* out = nullptr;
    if (c < s.r) {
      src = resid + (b * s.r + c) * s.hw;
      if (y != nullptr) {
        add = y + (b * cy + c) * s.hw;
        out = resid_out + (b * s.r + c) * s.hw;
      }
    } else {
      const int64_t k = c - s.r;
      src = k < s.d ? dense + (b * s.d + k) * s.hw : y + (b * cy + s.r + k - s.d) * s.hw;
      if (y != nullptr) out = dense_out + (b * cd + k) * s.hw;
    }
    T* act0 = affine.num_acts >= 1 ? static_cast<T*>(act.p[0]) + plane * s.hw : nullptr;
    T* act1 = affine.num_acts >= 2 ? static_cast<T*>(act.p[1]) + plane * s.hw : nullptr;
    const int64_t vectors = s.hw / kWidth;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < vectors;
         i += (int64_t)gridDim.x * blockDim.x) {
      using V = Vec<T>;
      T xs[kWidth], ys[kWidth];
      if (kWidth > 1) {
        *reinterpret_cast<V*>(xs) = reinterpret_cast<const V*>(src)[i];
        if (add) *reinterpret_cast<V*>(ys) = reinterpret_cast<const V*>(add)[i];
      } else {
        xs[0] = src[i];
        if (add) ys[0] = add[i];
      }
      T o[kWidth], a0[kWidth], a1[kWidth];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float x = add ? to_float(xs[j]) + to_float(ys[j]) : to_float(xs[j]);
        o[j] = from_float<T>(x);
        // BN of the rounded merge, as the unfused sequence computes it.
        const float xr = to_float(o[j]);
        a0[j] = from_float<T>(relu(xr * sc[0] + sh[0]));
        a1[j] = from_float<T>(relu(xr * sc[1] + sh[1]));
      }
      if (kWidth > 1) {
        if (out) reinterpret_cast<V*>(out)[i] = *reinterpret_cast<V*>(o);
        if (act0) reinterpret_cast<V*>(act0)[i] = *reinterpret_cast<V*>(a0);
        if (act1) reinterpret_cast<V*>(act1)[i] = *reinterpret_cast<V*>(a1);
      } else {
        if (out) out[i] = o[0];
        if (act0) act0[i] = a0[0];
        if (act1) act1[i] = a1[0];
      }
    }
  }
}

template <typename T, int kWidth>
__global__ void merge_backward_kernel(const T* __restrict__ x_resid, const T* __restrict__ x_dense,
                                      const T* __restrict__ g_resid_out,
                                      const T* __restrict__ g_dense_out, ConstActPlanes g_act,
                                      ChannelAffine affine, T* __restrict__ g_resid,
                                      T* __restrict__ g_dense, T* __restrict__ g_y, MergeShape s) {
  const int64_t channels = s.channels(), cy = s.r + s.inc, cd = s.d + s.inc;
  const int64_t planes = s.n * channels;
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t b = plane / channels, c = plane % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
    for (int a = 0; a < affine.num_acts; ++a) affine.at(a, c, &sc[a], &sh[a]);
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
    const T* ga[kMaxActs];
    for (int a = 0; a < kMaxActs; ++a) {
      ga[a] = a < affine.num_acts && g_act.p[a] ? static_cast<const T*>(g_act.p[a]) + plane * s.hw
                                                : nullptr;
    }
    const int64_t vectors = s.hw / kWidth;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < vectors;
         i += (int64_t)gridDim.x * blockDim.x) {
      using V = Vec<T>;
      auto load = [&](const T* p, T* dst) {
        if (kWidth > 1) {
          *reinterpret_cast<V*>(dst) = reinterpret_cast<const V*>(p)[i];
        } else {
          dst[0] = p[i];
        }
      };
      T xs[kWidth], go[kWidth], g0[kWidth], g1[kWidth], res[kWidth];
      if (x) load(x, xs);
      if (g_out) load(g_out, go);
      if (ga[0]) load(ga[0], g0);
      if (ga[1]) load(ga[1], g1);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        float g = g_out ? to_float(go[j]) : 0.0f;
        if (ga[0] && to_float(xs[j]) * sc[0] + sh[0] > 0.0f) g += to_float(g0[j]) * sc[0];
        if (ga[1] && to_float(xs[j]) * sc[1] + sh[1] > 0.0f) g += to_float(g1[j]) * sc[1];
        res[j] = from_float<T>(g);
      }
      if (kWidth > 1) {
        reinterpret_cast<V*>(dst0)[i] = *reinterpret_cast<V*>(res);
        if (dst1) reinterpret_cast<V*>(dst1)[i] = *reinterpret_cast<V*>(res);
      } else {
        dst0[i] = res[0];
        if (dst1) dst1[i] = res[0];
      }
    }
  }
}

// Planes are vector-aligned when the base pointers are and each plane's byte size is a multiple
// of 16 (cudaMalloc'd tensors are 256-byte aligned; hw = 49/196 at DPN's stages 4/3 is odd, so
// those run scalar, 3136/784 vectorised).
bool vector_aligned(const void* const* ptrs, int count, int64_t hw, int elem_bytes) {
  if ((hw * elem_bytes) % 16 != 0) return false;
  for (int i = 0; i < count; ++i) {
    if (ptrs[i] != nullptr && reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  }
  return true;
}

dim3 grid_for(const MergeShape& s, int64_t vectors, int threads) {
  const int64_t planes = s.n * s.channels();
  const int64_t x = std::min<int64_t>((vectors + threads - 1) / threads, 64);
  const int64_t y = std::min<int64_t>(planes, 65535);
  return dim3(static_cast<unsigned>(std::max<int64_t>(x, 1)), static_cast<unsigned>(y), 1);
}

int threads_for(int64_t vectors) {
  return vectors >= 256 ? 256 : vectors >= 128 ? 128 : vectors >= 64 ? 64 : 32;
}

template <typename T>
int forward_typed(const void* resid, const void* dense, const void* y, const ChannelAffine& aff,
                  void* resid_out, void* dense_out, void* const* act, const MergeShape& s,
                  cudaStream_t stream) {
  ActPlanes planes{};
  for (int a = 0; a < aff.num_acts; ++a) planes.p[a] = act[a];
  const void* ptrs[] = {resid, dense, y, resid_out, dense_out, planes.p[0], planes.p[1]};
  constexpr int kWide = Vec<T>::kSize;
  if (vector_aligned(ptrs, 7, s.hw, sizeof(T))) {
    const int64_t vectors = s.hw / kWide;
    const int threads = threads_for(vectors);
    merge_forward_kernel<T, kWide><<<grid_for(s, vectors, threads), threads, 0, stream>>>(
        static_cast<const T*>(resid), static_cast<const T*>(dense), static_cast<const T*>(y), aff,
        static_cast<T*>(resid_out), static_cast<T*>(dense_out), planes, s);
  } else {
    const int threads = threads_for(s.hw);
    merge_forward_kernel<T, 1><<<grid_for(s, s.hw, threads), threads, 0, stream>>>(
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
  constexpr int kWide = Vec<T>::kSize;
  if (vector_aligned(ptrs, 9, s.hw, sizeof(T))) {
    const int64_t vectors = s.hw / kWide;
    const int threads = threads_for(vectors);
    merge_backward_kernel<T, kWide><<<grid_for(s, vectors, threads), threads, 0, stream>>>(
        static_cast<const T*>(x_resid), static_cast<const T*>(x_dense),
        static_cast<const T*>(g_resid_out), static_cast<const T*>(g_dense_out), planes, aff,
        static_cast<T*>(g_resid), static_cast<T*>(g_dense), static_cast<T*>(g_y), s);
  } else {
    const int threads = threads_for(s.hw);
    merge_backward_kernel<T, 1><<<grid_for(s, s.hw, threads), threads, 0, stream>>>(
        static_cast<const T*>(x_resid), static_cast<const T*>(x_dense),
        static_cast<const T*>(g_resid_out), static_cast<const T*>(g_dense_out), planes, aff,
        static_cast<T*>(g_resid), static_cast<T*>(g_dense), static_cast<T*>(g_y), s);
  }
  return cudaGetLastError() == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError;
}

bool valid(const MergeShape& s, const ChannelAffine* aff) {
  return s.n >= 0 && s.r > 0 && s.d >= 0 && s.inc >= 0 && s.hw >= 0 &&
         (aff == nullptr || (aff->num_acts >= 0 && aff->num_acts <= kMaxActs));
}

}  // namespace

extern "C" int dpn_fast_dual_path_merge_forward_cuda(
    const void* resid, const void* dense, const void* y, const dpn_fast::ChannelAffine* affine,
    void* resid_out, void* dense_out, void* const* act, int64_t n, int64_t r, int64_t d,
    int64_t inc, int64_t hw, int dtype, void* stream) {
  const MergeShape s{n, r, d, inc, hw};
  if (!valid(s, affine) || (y == nullptr && inc != 0)) return dpn_fast::kInvalidArgument;
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
