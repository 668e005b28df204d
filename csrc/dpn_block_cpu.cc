#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "cpu_threads.h"
#include "dpn_block.h"
#include "dual_path_merge.h"
#include "onednn_gemm.h"

namespace dpn_fast {
namespace {

// Time spent per part of the blocks since the last reset (dpn_fast_dpn_block_profile): the
// benchmarks compare the 1x1 GEMMs' share with the machine's GEMM peak. A few clock reads per
// block, always on.
enum Part { kInputBnRelu, kProjection, kConv1x1a, kGroupedConv, kConv1x1c, kParts };
std::atomic<int64_t> part_nanoseconds[kParts];
std::atomic<int64_t> part_flops[kParts];

class PartTimer {
 public:
  void next(Part part, int64_t flops = 0) {
    const auto now = std::chrono::steady_clock::now();
    part_nanoseconds[part] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    part_flops[part] += flops;
    last_ = now;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

void add_batch_norm(ChannelAffine& affine, const BatchNormParams& bn) {
  const int a = affine.num_acts++;
  affine.scale[a] = bn.gamma;
  affine.shift[a] = bn.beta;
  affine.mean[a] = bn.mean;
  affine.var[a] = bn.var;
  affine.eps[a] = bn.epsilon;
}

// out[b] (+)= weight x in[b] for every image b: a 1x1 convolution of `rows` output channels
// whose planes start out_channel0 channels into an output with out_channels channels per image.
void conv1x1(const float* weight, int64_t rows, int64_t in_channels, const float* in,
             float* out, int64_t out_channels, int64_t out_channel0, int64_t n, int64_t hw,
             bool accumulate) {
  const GemmShape g{rows, hw, in_channels, in_channels, hw, hw, accumulate};
  for (int64_t b = 0; b < n; ++b)
    gemm_f32(g, weight, in + b * in_channels * hw, out + (b * out_channels + out_channel0) * hw);
}

// dst[b, c] = src[b, c, ::2, ::2]: the input of a stride-2 1x1 convolution.
void subsample2(const float* src, float* dst, int64_t planes, int64_t h, int64_t w) {
  const int64_t ho = conv3x3_out_size(h, 2), wo = conv3x3_out_size(w, 2);
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; ++j) dst[(p * ho + i) * wo + j] = src[(p * h + 2 * i) * w + 2 * j];
}

// Offsets (in floats) of the workspace's parts, and its size: one place for both.
struct WorkspaceLayout {
  int64_t act, act_w, act_w_strided, a, g, total;
};

WorkspaceLayout workspace_layout(const DpnBlockShape& s) {
  const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out(), in = s.n * s.in_channels();
  WorkspaceLayout l{};
  int64_t end = in * hw;  // act
  if (s.projection) {
    l.act_w = end;
    end += in * hw;
    if (s.stride != 1) {
      l.act_w_strided = end;
      end += in * hw_out;
    }
  }
  l.a = end;
  l.g = end + s.n * s.bottleneck * hw;
  l.total = l.g + s.n * s.bottleneck * hw_out;
  return l;
}

}  // namespace

int64_t dpn_block_workspace_floats(const DpnBlockShape& s) { return workspace_layout(s).total; }

void dpn_block_forward_cpu(const DpnBlockShape& s, const DpnBlockWeights& wt,
                           const float* resid_in, const float* dense_in, float* resid_out,
                           float* dense_out, float* workspace) {
  if (s.n == 0) return;  // an empty batch: empty outputs
  const WorkspaceLayout l = workspace_layout(s);
  struct {
    float *act, *act_w, *act_w_strided, *a, *g;
  } const ws{workspace + l.act, workspace + l.act_w, workspace + l.act_w_strided,
             workspace + l.a, workspace + l.g};
  const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out(), cin = s.in_channels();
  PartTimer timer;

  // The input's BN + ReLU: one read of (resid, dense) for both BNs of a projection block.
  ChannelAffine affine;
  float* acts[kMaxActs] = {};
  if (s.projection) {
    add_batch_norm(affine, wt.bn_w);
    acts[0] = ws.act_w;
  }
  add_batch_norm(affine, wt.bn_a);
  acts[affine.num_acts - 1] = ws.act;
  dual_path_merge_forward_cpu(resid_in, dense_in, nullptr, affine, nullptr, nullptr, acts,
                              MergeShape{s.n, s.in_resid, s.in_dense, 0, hw, s.in_capacity});
  timer.next(kInputBnRelu);

  if (s.projection) {
    const float* act_w = ws.act_w;
    if (s.stride != 1) {
      subsample2(ws.act_w, ws.act_w_strided, s.n * cin, s.h, s.w);
      act_w = ws.act_w_strided;
    }
    conv1x1(wt.w_proj, s.resid, cin, act_w, resid_out, s.resid, 0, s.n, hw_out, false);
    conv1x1(wt.w_proj + s.resid * cin, 2 * s.inc, cin, act_w, dense_out, s.capacity, 0, s.n,
            hw_out, false);
    timer.next(kProjection, 2 * s.n * (s.resid + 2 * s.inc) * cin * hw_out);
  }

  conv1x1(wt.w_a, s.bottleneck, cin, ws.act, ws.a, s.bottleneck, 0, s.n, hw, false);
  timer.next(kConv1x1a, 2 * s.n * s.bottleneck * cin * hw);
  const GroupedConvShape conv{s.n, s.bottleneck, s.h, s.w, s.bottleneck, s.groups, s.stride,
                              s.h_out(), s.w_out()};
  bn_relu_grouped_conv3x3_bn_relu_infer_cpu(ws.a, wt.w_conv, wt.bn_b, wt.bn_c, ws.g, conv);
  timer.next(kGroupedConv, 2 * s.n * s.bottleneck * (s.bottleneck / s.groups) * 9 * hw_out);

  conv1x1(wt.w_c, s.resid, s.bottleneck, ws.g, resid_out, s.resid, 0, s.n, hw_out, true);
  conv1x1(wt.w_c + s.resid * s.bottleneck, s.inc, s.bottleneck, ws.g, dense_out, s.capacity,
          s.dense_before(), s.n, hw_out, false);
  timer.next(kConv1x1c, 2 * s.n * (s.resid + s.inc) * s.bottleneck * hw_out);
}

void dpn_head_forward_cpu(const DpnHeadShape& s, const float* resid, const float* dense,
                          const BatchNormParams& bn, const float* fc_weight, const float* fc_bias,
                          float* logits, float* pooled) {
  if (s.n == 0) return;  // an empty batch: empty logits
  ChannelAffine affine;
  add_batch_norm(affine, bn);
  const int64_t channels = s.channels();
  const float inv_hw = 1.0f / float(s.hw);
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t row = 0; row < s.n * channels; ++row) {
    const int64_t b = row / channels, c = row % channels;
    const float* x = c < s.resid ? resid + (b * s.resid + c) * s.hw
                                 : dense + (b * s.capacity + c - s.resid) * s.hw;
    float scale, shift;
    affine.at(0, c, &scale, &shift);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < s.hw; ++i) {
      const float v = x[i] * scale + shift;
      sum += v > 0.0f ? v : 0.0f;  // NaN -> 0, as paddle's relu
    }
    pooled[row] = sum * inv_hw;
  }
  for (int64_t b = 0; b < s.n; ++b) std::copy(fc_bias, fc_bias + s.classes, logits + b * s.classes);
  gemm_f32(GemmShape{s.n, s.classes, channels, channels, s.classes, s.classes, true}, pooled,
           fc_weight, logits);
}

}  // namespace dpn_fast

// For benchmarks: seconds and FLOPs spent per part of the blocks since the last reset, in the
// order input BN + ReLU, projection, 1x1a, grouped conv, 1x1c (kParts entries each).
extern "C" void dpn_fast_dpn_block_profile(double* seconds, double* flops, int reset) {
  using namespace dpn_fast;
  for (int p = 0; p < kParts; ++p) {
    seconds[p] = (reset ? part_nanoseconds[p].exchange(0) : part_nanoseconds[p].load()) * 1e-9;
    flops[p] = double(reset ? part_flops[p].exchange(0) : part_flops[p].load());
  }
}
