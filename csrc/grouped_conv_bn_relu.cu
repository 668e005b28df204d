// CUDA cores of the grouped 3x3 conv + BatchNorm + ReLU (no Paddle headers; C ABI launchers).
// Conv: one thread per output position computes up to 32 output channels of its group (8 where
// that leaves fewer blocks than a GPU has SMs' worth, e.g. 7x7 at batch 1), the chunk's weights
// staged in shared memory (fp32) and read as warp-wide broadcasts; fp32
// accumulation, fp32/fp16/bf16 activations. Positions are numbered across the batch, so the
// 7x7 and 14x14 planes of DPN's late stages fill whole blocks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"
#include "grouped_conv_bn_relu.h"

namespace {

constexpr int kConvThreads = 128;
constexpr int kOcChunk = 32;       // output channels a thread computes (at most)
constexpr int kSmallOcChunk = 8;   // ... when the grid is too small to fill the GPU
constexpr int kReduceThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// out[b, g*cout_g + oc, p] = act(bias + sum_{ic, tap} w[oc][ic][tap] * x'[b, g*cin_g + ic, tap(p)])
// x' = relu(x * in_scale + in_shift) per input channel when in_scale is set (input pixels only:
// the zero padding pads x'), else x. grid: (blocks of n * h_out * w_out positions, groups * oc
// chunks).
template <typename T, typename TW, int kChunk>
__global__ void __launch_bounds__(kConvThreads)
    grouped_conv3x3_kernel(const T* __restrict__ x, const TW* __restrict__ w,
                           const float* __restrict__ bias, const float* __restrict__ in_scale,
                           const float* __restrict__ in_shift, T* __restrict__ out, int64_t n,
                           int c, int h,
                           int wd, int c_out, int h_out, int w_out, int groups, int stride,
                           int cin_g, int cout_g, bool relu) {
  extern __shared__ float w_smem[];  // [kChunk][cin_g][9]
  const int chunks = (cout_g + kChunk - 1) / kChunk;
  const int g = blockIdx.y / chunks;
  const int oc0 = (blockIdx.y % chunks) * kChunk;
  const int nc = min(kChunk, cout_g - oc0);
  const int taps = cin_g * 9;
  const TW* w_chunk = w + (int64_t)(g * cout_g + oc0) * taps;
  for (int i = threadIdx.x; i < nc * taps; i += blockDim.x) w_smem[i] = to_float(w_chunk[i]);
  __syncthreads();

  const int64_t hw_out = (int64_t)h_out * w_out;
  const int64_t position = (int64_t)blockIdx.x * kConvThreads + threadIdx.x;
  if (position >= n * hw_out) return;
  const int64_t b = position / hw_out;
  const int p = (int)(position - b * hw_out);
  const int oh = p / w_out, ow = p % w_out;
  const int ih0 = oh * stride - 1, iw0 = ow * stride - 1;

  float acc[kChunk];
#pragma unroll
  for (int o = 0; o < kChunk; ++o) acc[o] = 0.0f;
  const T* x_group = x + (b * c + (int64_t)g * cin_g) * h * wd;
  for (int ic = 0; ic < cin_g; ++ic) {
    const T* xc = x_group + (int64_t)ic * h * wd;
    const bool activate = in_scale != nullptr;
    const float scale = activate ? in_scale[g * cin_g + ic] : 1.0f;
    const float shift = activate ? in_shift[g * cin_g + ic] : 0.0f;
    float xv[9];
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int ih = ih0 + kh;
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int iw = iw0 + kw;
        float v = 0.0f;
        if (ih >= 0 && ih < h && iw >= 0 && iw < wd) {
          v = to_float(__ldg(xc + ih * wd + iw));
          if (activate) v = fmaxf(fmaf(v, scale, shift), 0.0f);
        }
        xv[kh * 3 + kw] = v;
      }
    }
    const float* w_ic = w_smem + ic * 9;
#pragma unroll
    for (int o = 0; o < kChunk; ++o) {
      if (o < nc) {
#pragma unroll
        for (int t = 0; t < 9; ++t) acc[o] = fmaf(w_ic[o * taps + t], xv[t], acc[o]);
      }
    }
  }
#pragma unroll
  for (int o = 0; o < kChunk; ++o) {
    if (o < nc) {
      const int ch = g * cout_g + oc0 + o;
      float v = acc[o] + (bias ? bias[ch] : 0.0f);
      if (relu) v = fmaxf(v, 0.0f);
      out[(b * c_out + ch) * hw_out + p] = from_float<T>(v);
    }
  }
}

template <typename T, typename TW>
cudaError_t launch_conv(const void* x, const void* w, const float* bias, void* out, int64_t n,
                        int64_t c, int64_t h, int64_t wd, int64_t c_out, int64_t groups,
                        int64_t stride, bool relu, cudaStream_t stream,
                        const float* in_scale = nullptr, const float* in_shift = nullptr) {
  const int64_t h_out = dpn_fast::conv3x3_out_size(h, stride);
  const int64_t w_out = dpn_fast::conv3x3_out_size(wd, stride);
  const int cin_g = (int)(c / groups), cout_g = (int)(c_out / groups);
  const int64_t position_blocks = (n * h_out * w_out + kConvThreads - 1) / kConvThreads;
  int sms = 0, device = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const bool small = position_blocks * groups * ((cout_g + kOcChunk - 1) / kOcChunk) < sms;
  const int chunk = small ? kSmallOcChunk : kOcChunk;
  const int chunks = (cout_g + chunk - 1) / chunk;
  const size_t smem = sizeof(float) * chunk * cin_g * 9;
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // > 42 input channels per group
  const dim3 grid((unsigned)position_blocks, (unsigned)(groups * chunks));
  auto kernel = small ? grouped_conv3x3_kernel<T, TW, kSmallOcChunk>
                      : grouped_conv3x3_kernel<T, TW, kOcChunk>;
  kernel<<<grid, kConvThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const TW*>(w), bias, in_scale, in_shift,
      static_cast<T*>(out), n, (int)c,
      (int)h, (int)wd, (int)c_out, (int)h_out, (int)w_out, (int)groups, (int)stride, cin_g, cout_g,
      relu);
  return cudaGetLastError();
}

// w_folded[oc][i] = w[oc][i] * scale[oc]; bias[oc] = beta - mean * scale (fp32).
template <typename TW>
__global__ void fold_bn_kernel(const TW* __restrict__ w, const float* __restrict__ gamma,
                               const float* __restrict__ beta, const float* __restrict__ mean,
                               const float* __restrict__ var, float eps, int64_t c_out,
                               int64_t taps, float* __restrict__ w_folded,
                               float* __restrict__ bias) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < c_out * taps;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t oc = i / taps;
    const float scale = gamma[oc] * rsqrtf(var[oc] + eps);
    w_folded[i] = to_float(w[i]) * scale;
    if (i % taps == 0) bias[oc] = beta[oc] - mean[oc] * scale;
  }
}

// scale[ch] = gamma / sqrt(var + eps); shift[ch] = beta - mean * scale (input-side BN).
__global__ void fold_input_bn_kernel(const float* __restrict__ gamma,
                                     const float* __restrict__ beta,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ var, float eps, int64_t c,
                                     float* __restrict__ scale, float* __restrict__ shift) {
  for (int64_t ch = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; ch < c;
       ch += (int64_t)gridDim.x * blockDim.x) {
    scale[ch] = gamma[ch] * rsqrtf(var[ch] + eps);
    shift[ch] = beta[ch] - mean[ch] * scale[ch];
  }
}

__device__ double block_sum(double v, double* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const double total = smem[0];
  __syncthreads();
  return total;
}

// One block per channel: batch statistics of y, saved mean / invstd, running statistics update.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    channel_stats_kernel(const T* __restrict__ y, int64_t n, int64_t c, int64_t hw, float eps,
                         float momentum, float* __restrict__ saved_mean,
                         float* __restrict__ saved_invstd, float* __restrict__ running_mean,
                         float* __restrict__ running_var) {
  __shared__ double smem[kReduceThreads];
  const int64_t ch = blockIdx.x;
  float s = 0.0f, ss = 0.0f;
  for (int64_t b = 0; b < n; ++b) {
    const T* yc = y + (b * c + ch) * hw;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
      const float v = to_float(yc[i]);
      s += v;
      ss += v * v;
    }
  }
  const double count = double(n) * hw;
  const double mean = block_sum(s, smem) / count;
  const double var = fmax(block_sum(ss, smem) / count - mean * mean, 0.0);
  if (threadIdx.x == 0) {
    saved_mean[ch] = float(mean);
    saved_invstd[ch] = float(rsqrt(var + eps));
    running_mean[ch] = float(momentum * running_mean[ch] + (1.0 - momentum) * mean);
    running_var[ch] = float(momentum * running_var[ch] + (1.0 - momentum) * var);
  }
}

template <typename T>
__global__ void bn_relu_apply_kernel(const T* __restrict__ y, const float* __restrict__ gamma,
                                     const float* __restrict__ beta,
                                     const float* __restrict__ mean,
                                     const float* __restrict__ invstd, int64_t c, int64_t hw,
                                     int64_t total, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ch = (i / hw) % c;
    const float k = gamma[ch] * invstd[ch];
    out[i] = from_float<T>(fmaxf((to_float(y[i]) - mean[ch]) * k + beta[ch], 0.0f));
  }
}

// One block per channel: dbeta = sum dz, dgamma = sum dz * xhat, dz = dout * (out > 0), and the
// apply pass's dy = k * (dz - shift - (y - mean) * slope) coefficients. xhat is centred on the
// exact batch mean, mean + offset: centred on the float saved mean alone, every xhat shifts by
// offset * invstd and dy by gamma * offset * invstd^2 * dgamma / M (M = n * hw), which for
// near-constant channels over few samples dwarfs dy itself (as in bn_relu_train_backward_cpu;
// docs/pitfalls.md).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    bn_relu_grad_stats_kernel(const T* __restrict__ y, const T* __restrict__ out,
                              const T* __restrict__ dout, const float* __restrict__ mean,
                              const float* __restrict__ invstd, int64_t n, int64_t c, int64_t hw,
                              float* __restrict__ dgamma, float* __restrict__ dbeta,
                              float* __restrict__ shift, float* __restrict__ slope) {
  __shared__ double smem[kReduceThreads];
  const int64_t ch = blockIdx.x;
  const float m = mean[ch];
  float s = 0.0f, sx = 0.0f;
  // In double, as on the CPU: the sum is M times an offset under half an ulp of the mean, while
  // its terms are of the channel's spread, whose float rounding would build up over a thread's
  // M / 256 terms. One fp64 add and conversion per element beside three loads should stay cheap
  // even at consumer GPUs' 1/64 fp64 rate (not yet timed on a GPU).
  double sc = 0.0;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t off = (b * c + ch) * hw;
    for (int64_t i = threadIdx.x; i < hw; i += blockDim.x) {
      const float dz = to_float(out[off + i]) > 0.0f ? to_float(dout[off + i]) : 0.0f;
      const float centred = to_float(y[off + i]) - m;
      s += dz;
      sx += dz * centred;
      sc += centred;
    }
  }
  const double sum_dz = block_sum(s, smem);
  const double sum_dz_centred = block_sum(sx, smem);
  const double sum_centred = block_sum(sc, smem);
  if (threadIdx.x == 0) {
    const double count = double(n) * hw;
    const double inv = invstd[ch];
    const double offset = sum_centred / count;
    const double sum_dz_xhat = (sum_dz_centred - offset * sum_dz) * inv;
    dbeta[ch] = float(sum_dz);
    dgamma[ch] = float(sum_dz_xhat);
    // shift takes the offset's share in double.
    const double mean_dz_xhat = sum_dz_xhat / count;
    slope[ch] = float(inv * mean_dz_xhat);
    shift[ch] = float(sum_dz / count - offset * inv * mean_dz_xhat);
  }
}

template <typename T>
__global__ void bn_relu_grad_apply_kernel(const T* __restrict__ y, const T* __restrict__ out,
                                          const T* __restrict__ dout,
                                          const float* __restrict__ gamma,
                                          const float* __restrict__ mean,
                                          const float* __restrict__ invstd,
                                          const float* __restrict__ shift,
                                          const float* __restrict__ slope, int64_t c, int64_t hw,
                                          int64_t total, T* __restrict__ dy) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ch = (i / hw) % c;
    const float dz = to_float(out[i]) > 0.0f ? to_float(dout[i]) : 0.0f;
    dy[i] = from_float<T>(gamma[ch] * invstd[ch] *
                          (dz - shift[ch] - (to_float(y[i]) - mean[ch]) * slope[ch]));
  }
}

unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return (unsigned)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

int status(cudaError_t err) { return err == cudaSuccess ? dpn_fast::kOk : dpn_fast::kCudaError; }

bool shape_ok(int64_t c, int64_t c_out, int64_t groups, int64_t stride) {
  return groups > 0 && c % groups == 0 && c_out % groups == 0 && (stride == 1 || stride == 2) &&
         c / groups * 9 * kOcChunk * sizeof(float) <= 48 * 1024;
}

template <typename T>
int infer_impl(const void* x, const void* w, const float* gamma, const float* beta,
               const float* mean, const float* var, float eps, float* w_folded, float* bias,
               void* out, int64_t n, int64_t c, int64_t h, int64_t wd, int64_t c_out,
               int64_t groups, int64_t stride, cudaStream_t stream) {
  const int64_t taps = c / groups * 9;
  fold_bn_kernel<T><<<elementwise_blocks(c_out * taps), 256, 0, stream>>>(
      static_cast<const T*>(w), gamma, beta, mean, var, eps, c_out, taps, w_folded, bias);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return dpn_fast::kCudaError;
  return status(launch_conv<T, float>(x, w_folded, bias, out, n, c, h, wd, c_out, groups, stride,
                                      true, stream));
}

template <typename T>
int bn_relu_infer_impl(const void* x, const void* w, const float* in_gamma, const float* in_beta,
                       const float* in_mean, const float* in_var, float in_eps,
                       const float* gamma, const float* beta, const float* mean, const float* var,
                       float eps, float* in_scale_shift, float* w_folded, float* bias, void* out,
                       int64_t n, int64_t c, int64_t h, int64_t wd, int64_t c_out, int64_t groups,
                       int64_t stride, cudaStream_t stream) {
  const int64_t taps = c / groups * 9;
  float* in_scale = in_scale_shift;
  float* in_shift = in_scale_shift + c;
  fold_input_bn_kernel<<<elementwise_blocks(c), 256, 0, stream>>>(in_gamma, in_beta, in_mean,
                                                                   in_var, in_eps, c, in_scale,
                                                                   in_shift);
  fold_bn_kernel<T><<<elementwise_blocks(c_out * taps), 256, 0, stream>>>(
      static_cast<const T*>(w), gamma, beta, mean, var, eps, c_out, taps, w_folded, bias);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return dpn_fast::kCudaError;
  return status(launch_conv<T, float>(x, w_folded, bias, out, n, c, h, wd, c_out, groups, stride,
                                      true, stream, in_scale, in_shift));
}

template <typename T>
int train_impl(const void* x, const void* w, const float* gamma, const float* beta,
               float* running_mean, float* running_var, float eps, float momentum, void* y,
               void* out, float* saved_mean, float* saved_invstd, int64_t n, int64_t c,
               int64_t h, int64_t wd, int64_t c_out, int64_t groups, int64_t stride,
               cudaStream_t stream) {
  cudaError_t err = launch_conv<T, T>(x, w, nullptr, y, n, c, h, wd, c_out, groups, stride, false,
                                      stream);
  if (err != cudaSuccess) return dpn_fast::kCudaError;
  const int64_t hw = dpn_fast::conv3x3_out_size(h, stride) * dpn_fast::conv3x3_out_size(wd, stride);
  channel_stats_kernel<T><<<(unsigned)c_out, kReduceThreads, 0, stream>>>(
      static_cast<const T*>(y), n, c_out, hw, eps, momentum, saved_mean, saved_invstd,
      running_mean, running_var);
  const int64_t total = n * c_out * hw;
  bn_relu_apply_kernel<T><<<elementwise_blocks(total), 256, 0, stream>>>(
      static_cast<const T*>(y), gamma, beta, saved_mean, saved_invstd, c_out, hw, total,
      static_cast<T*>(out));
  return status(cudaGetLastError());
}

template <typename T>
int backward_impl(const void* y, const void* out, const void* dout, const float* gamma,
                  const float* mean, const float* invstd, void* dy, float* dgamma, float* dbeta,
                  float* shift_slope, int64_t n, int64_t c, int64_t hw, cudaStream_t stream) {
  float* shift = shift_slope;
  float* slope = shift_slope + c;
  bn_relu_grad_stats_kernel<T><<<(unsigned)c, kReduceThreads, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(out), static_cast<const T*>(dout), mean,
      invstd, n, c, hw, dgamma, dbeta, shift, slope);
  const int64_t total = n * c * hw;
  bn_relu_grad_apply_kernel<T><<<elementwise_blocks(total), 256, 0, stream>>>(
      static_cast<const T*>(y), static_cast<const T*>(out), static_cast<const T*>(dout), gamma,
      mean, invstd, shift, slope, c, hw, total, static_cast<T*>(dy));
  return status(cudaGetLastError());
}

}  // namespace

#define DPN_FAST_DISPATCH_DTYPE(dtype, FN, ...)                              \
  switch (dtype) {                                                           \
    case dpn_fast::kFloat32: return FN<float>(__VA_ARGS__);                  \
    case dpn_fast::kFloat16: return FN<__half>(__VA_ARGS__);                 \
    case dpn_fast::kBFloat16: return FN<__nv_bfloat16>(__VA_ARGS__);         \
    default: return dpn_fast::kInvalidArgument;                              \
  }

extern "C" int dpn_fast_grouped_conv_bias_relu_cuda(const void* x, const void* w, const float* bias,
                                                    void* out, int64_t n, int64_t c, int64_t h,
                                                    int64_t w_in, int64_t c_out, int64_t groups,
                                                    int64_t stride, int dtype, void* stream) {
  if (!shape_ok(c, c_out, groups, stride)) return dpn_fast::kInvalidArgument;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case dpn_fast::kFloat32:
      return status(launch_conv<float, float>(x, w, bias, out, n, c, h, w_in, c_out, groups, stride, true, s));
    case dpn_fast::kFloat16:
      return status(launch_conv<__half, __half>(x, w, bias, out, n, c, h, w_in, c_out, groups, stride, true, s));
    case dpn_fast::kBFloat16:
      return status(launch_conv<__nv_bfloat16, __nv_bfloat16>(x, w, bias, out, n, c, h, w_in, c_out, groups, stride, true, s));
    default:
      return dpn_fast::kInvalidArgument;
  }
}

extern "C" int dpn_fast_grouped_conv_bn_relu_infer_cuda(
    const void* x, const void* w, const float* gamma, const float* beta, const float* mean,
    const float* var, float epsilon, float* w_folded, float* bias, void* out, int64_t n, int64_t c,
    int64_t h, int64_t w_in, int64_t c_out, int64_t groups, int64_t stride, int dtype,
    void* stream) {
  if (!shape_ok(c, c_out, groups, stride)) return dpn_fast::kInvalidArgument;
  DPN_FAST_DISPATCH_DTYPE(dtype, infer_impl, x, w, gamma, beta, mean, var, epsilon, w_folded, bias,
                          out, n, c, h, w_in, c_out, groups, stride,
                          static_cast<cudaStream_t>(stream));
}

extern "C" int dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda(
    const void* x, const void* w, const float* in_gamma, const float* in_beta,
    const float* in_mean, const float* in_var, float in_epsilon, const float* gamma,
    const float* beta, const float* mean, const float* var, float epsilon, float* in_scale_shift,
    float* w_folded, float* bias, void* out, int64_t n, int64_t c, int64_t h, int64_t w_in,
    int64_t c_out, int64_t groups, int64_t stride, int dtype, void* stream) {
  if (!shape_ok(c, c_out, groups, stride)) return dpn_fast::kInvalidArgument;
  DPN_FAST_DISPATCH_DTYPE(dtype, bn_relu_infer_impl, x, w, in_gamma, in_beta, in_mean, in_var,
                          in_epsilon, gamma, beta, mean, var, epsilon, in_scale_shift, w_folded,
                          bias, out, n, c, h, w_in, c_out, groups, stride,
                          static_cast<cudaStream_t>(stream));
}

extern "C" int dpn_fast_grouped_conv_bn_relu_train_cuda(
    const void* x, const void* w, const float* gamma, const float* beta, float* running_mean,
    float* running_var, float epsilon, float momentum, void* y, void* out, float* saved_mean,
    float* saved_invstd, int64_t n, int64_t c, int64_t h, int64_t w_in, int64_t c_out,
    int64_t groups, int64_t stride, int dtype, void* stream) {
  if (!shape_ok(c, c_out, groups, stride)) return dpn_fast::kInvalidArgument;
  DPN_FAST_DISPATCH_DTYPE(dtype, train_impl, x, w, gamma, beta, running_mean, running_var, epsilon,
                          momentum, y, out, saved_mean, saved_invstd, n, c, h, w_in, c_out, groups,
                          stride, static_cast<cudaStream_t>(stream));
}

extern "C" int dpn_fast_bn_relu_train_backward_cuda(const void* y, const void* out,
                                                    const void* dout, const float* gamma,
                                                    const float* saved_mean,
                                                    const float* saved_invstd, void* dy,
                                                    float* dgamma, float* dbeta,
                                                    float* shift_slope, int64_t n, int64_t c,
                                                    int64_t hw, int dtype, void* stream) {
  DPN_FAST_DISPATCH_DTYPE(dtype, backward_impl, y, out, dout, gamma, saved_mean, saved_invstd, dy,
                          dgamma, dbeta, shift_slope, n, c, hw, static_cast<cudaStream_t>(stream));
}
