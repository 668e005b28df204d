#include <algorithm>
#include <atomic>
#include <chrono>
#include <initializer_list>
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

// A block's activation planes: NCHW, or channel-major [C, N, H*W]. The block keeps its workspace
// channel-major where planes are small and the batch has several images (wide_form): each 1x1
// convolution then runs as one GEMM over all the images' columns, reading and writing the
// workspace with no gather or scatter. The stage buffers (resid, dense) stay NCHW.
struct Planes {
  float* data;
  int64_t channels, n, hw;
  bool channel_major;

  int64_t channel_stride() const { return channel_major ? n * hw : hw; }
  int64_t image_stride() const { return channel_major ? hw : channels * hw; }
  float* at(int64_t b, int64_t c) const { return data + b * image_stride() + c * channel_stride(); }
};

// Where a 1x1 convolution's output rows go: `rows` output channels, written (or accumulated)
// from channel `channel0` of `to` on.
struct RowsOut {
  Planes to;
  int64_t rows, channel0;
  bool accumulate;
};

// Planes up to this size take the wide form below when the batch has several images. Measured
// with cold weights (AMD EPYC, Zen 3, oneDNN gemm:jit, batch 8): one GEMM over all images is
// 1.2x (14x14) to 1.5x (7x7) faster than one per image, which packs the weight for each image's
// few columns; at 28x28 and above the per-image GEMMs are as fast or faster.
constexpr int64_t kWideMaxPlane = 400;

bool wide_form(int64_t n, int64_t hw) { return n > 1 && hw <= kWideMaxPlane; }

// weight [sum of outs' rows, in.channels] x in, each image's output rows split among `outs` in
// order. NCHW input: one GEMM per image. Channel-major input (wide form): one GEMM on
// [in.channels, n * hw], straight into a channel-major output, or else through `scratch`
// (scratch_floats(...) floats) scattered to the outputs.
void conv1x1(const float* weight, const Planes& in, std::initializer_list<RowsOut> outs,
             float* scratch) {
  const int64_t k = in.channels, hw = in.hw, cols = in.n * hw;
  if (!in.channel_major) {
    const float* w = weight;
    for (const RowsOut& o : outs) {
      const GemmShape g{o.rows, hw, k, k, in.channel_stride(), o.to.channel_stride(), o.accumulate};
      for (int64_t b = 0; b < in.n; ++b) gemm_f32(g, w, in.at(b, 0), o.to.at(b, o.channel0));
      w += o.rows * k;
    }
    return;
  }
  if (outs.size() == 1 && outs.begin()->to.channel_major) {
    const RowsOut& o = *outs.begin();
    gemm_f32(GemmShape{o.rows, cols, k, k, cols, cols, o.accumulate}, weight, in.data,
             o.to.at(0, o.channel0));
    return;
  }
  int64_t rows = 0;
  for (const RowsOut& o : outs) rows += o.rows;
  gemm_f32(GemmShape{rows, cols, k, k, cols, cols, false}, weight, in.data, scratch);
  const float* src = scratch;
  for (const RowsOut& o : outs) {
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
    for (int64_t r = 0; r < o.rows; ++r)
      for (int64_t b = 0; b < in.n; ++b) {
        const float* from = src + r * cols + b * hw;
        float* to = o.to.at(b, o.channel0 + r);
        if (o.accumulate) {
#pragma omp simd
          for (int64_t i = 0; i < hw; ++i) to[i] += from[i];
        } else {
          std::copy_n(from, hw, to);
        }
      }
    src += o.rows * cols;
  }
}

// Floats of conv1x1's scratch for `rows` output rows on n images of hw, written to NCHW planes.
int64_t scratch_floats(int64_t n, int64_t hw, int64_t rows) {
  return wide_form(n, hw) ? rows * n * hw : 0;
}

// dst[b, c] = src[b, c, ::2, ::2]: the input of a stride-2 1x1 convolution.
void subsample2(const Planes& src, const Planes& dst, int64_t h, int64_t w) {
  const int64_t ho = conv3x3_out_size(h, 2), wo = conv3x3_out_size(w, 2);
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t p = 0; p < src.n * src.channels; ++p) {
    const float* from = src.at(p / src.channels, p % src.channels);
    float* to = dst.at(p / src.channels, p % src.channels);
    for (int64_t i = 0; i < ho; ++i)
      for (int64_t j = 0; j < wo; ++j) to[i * wo + j] = from[2 * i * w + 2 * j];
  }
}

// Offsets (in floats) of the workspace's parts, and its size: one place for both.
struct WorkspaceLayout {
  int64_t act, act_w, act_w_strided, a, g, scratch, total;
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
  l.scratch = l.g + s.n * s.bottleneck * hw_out;
  // conv1x1's scatter space, shared by the block's 1x1 convolutions into NCHW (one at a time).
  int64_t scratch = scratch_floats(s.n, hw_out, s.resid + s.inc);
  if (s.projection) scratch = std::max(scratch, scratch_floats(s.n, hw_out, s.resid + 2 * s.inc));
  l.total = l.scratch + scratch;
  return l;
}

// One block on n images (the shapes and in-place rules of dpn_stage_forward_cpu's block 0);
// workspace: workspace_layout(s).total floats.
void dpn_block_forward_cpu(const DpnBlockShape& s, const DpnBlockWeights& wt,
                           const float* resid_in, const float* dense_in, float* resid_out,
                           float* dense_out, float* workspace) {
  if (s.n == 0) return;  // an empty batch: empty outputs
  const WorkspaceLayout l = workspace_layout(s);
  const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out(), cin = s.in_channels();
  // The workspace's layout per plane size: channel-major where that size's 1x1s are wide.
  const bool wide_in = wide_form(s.n, hw), wide_out = wide_form(s.n, hw_out);
  const Planes act{workspace + l.act, cin, s.n, hw, wide_in};
  const Planes act_w{workspace + l.act_w, cin, s.n, hw, wide_in};
  const Planes act_w_strided{workspace + l.act_w_strided, cin, s.n, hw_out, wide_out};
  const Planes a{workspace + l.a, s.bottleneck, s.n, hw, wide_in};
  const Planes g{workspace + l.g, s.bottleneck, s.n, hw_out, wide_out};
  const Planes resid{resid_out, s.resid, s.n, hw_out, false};
  const Planes dense{dense_out, s.capacity, s.n, hw_out, false};
  float* const scratch = workspace + l.scratch;
  PartTimer timer;

  // The input's BN + ReLU: one read of (resid, dense) for both BNs of a projection block.
  ChannelAffine affine;
  float* acts[kMaxActs] = {};
  if (s.projection) {
    add_batch_norm(affine, wt.bn_w);
    acts[0] = act_w.data;
  }
  add_batch_norm(affine, wt.bn_a);
  acts[affine.num_acts - 1] = act.data;
  MergeShape merge{s.n, s.in_resid, s.in_dense, 0, hw, s.in_capacity};
  merge.act_channel_major = wide_in;
  dual_path_merge_forward_cpu(resid_in, dense_in, nullptr, affine, nullptr, nullptr, acts, merge);
  timer.next(kInputBnRelu);

  if (s.projection) {
    const Planes* proj_in = &act_w;
    if (s.stride != 1) {
      subsample2(act_w, act_w_strided, s.h, s.w);
      proj_in = &act_w_strided;
    }
    conv1x1(wt.w_proj, *proj_in, {{resid, s.resid, 0, false}, {dense, 2 * s.inc, 0, false}},
            scratch);
    timer.next(kProjection, 2 * s.n * (s.resid + 2 * s.inc) * cin * hw_out);
  }

  conv1x1(wt.w_a, act, {{a, s.bottleneck, 0, false}}, scratch);
  timer.next(kConv1x1a, 2 * s.n * s.bottleneck * cin * hw);
  const GroupedConvShape conv{s.n, s.bottleneck, s.h, s.w, s.bottleneck, s.groups, s.stride,
                              s.h_out(), s.w_out()};
  bn_relu_grouped_conv3x3_bn_relu_infer_cpu(a.data, wt.w_conv, wt.bn_b, wt.bn_c, g.data, conv,
                                            wide_in, wide_out);
  timer.next(kGroupedConv, 2 * s.n * s.bottleneck * (s.bottleneck / s.groups) * 9 * hw_out);

  conv1x1(wt.w_c, g, {{resid, s.resid, 0, true}, {dense, s.inc, s.dense_before(), false}},
          scratch);
  timer.next(kConv1x1c, 2 * s.n * (s.resid + s.inc) * s.bottleneck * hw_out);
}

// Columns of a wide-form GEMM (images x positions) at which oneDNN's matmul has reached its rate.
constexpr int64_t kWideColumns = 784;

// Images a stage runs together, each run through all the blocks, so that a run's planes stay in
// cache from block to block instead of the whole batch's stage buffers streaming through memory
// once per block. Large planes (no block takes the wide form): one image. Small planes: enough
// images for kWideColumns columns. DPN92, batch 8, 1 thread (Intel Xeon, Sapphire Rapids
// class): stages 1 and 2 image by image took 51 ms less than batch-wide, stage 3 in runs of 4
// images another ~25 ms less.
int64_t images_per_run(const DpnBlockShape* shapes, int64_t count) {
  const int64_t n = shapes[0].n;
  for (int64_t i = 0; i < count; ++i) {
    const DpnBlockShape& s = shapes[i];
    if (wide_form(n, s.h * s.w) || wide_form(n, s.h_out() * s.w_out())) {
      const int64_t hw = shapes[count - 1].h_out() * shapes[count - 1].w_out();
      return std::min(n, (kWideColumns + hw - 1) / hw);
    }
  }
  return 1;
}

DpnBlockShape with_images(DpnBlockShape s, int64_t n) {
  s.n = n;
  return s;
}

}  // namespace

int64_t dpn_stage_workspace_floats(const DpnBlockShape* shapes, int64_t count) {
  const int64_t images = images_per_run(shapes, count);
  int64_t floats = 0;
  for (int64_t i = 0; i < count; ++i) {
    floats = std::max(floats, workspace_layout(with_images(shapes[i], images)).total);
  }
  return floats;
}

void dpn_stage_forward_cpu(const DpnBlockShape* shapes, const DpnBlockWeights* weights,
                           int64_t count, const float* resid_in, const float* dense_in,
                           float* resid_out, float* dense_out, float* workspace) {
  const int64_t n = shapes[0].n, images = images_per_run(shapes, count);
  // NCHW: images [b, b + k) of each buffer are a contiguous [k, C, H, W] tensor.
  for (int64_t b = 0; b < n; b += images) {
    for (int64_t i = 0; i < count; ++i) {
      const DpnBlockShape s = with_images(shapes[i], std::min(images, n - b));
      const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out();
      const float* r_in = i == 0 ? resid_in : resid_out;
      const float* d_in = i == 0 ? dense_in : dense_out;
      dpn_block_forward_cpu(s, weights[i], r_in ? r_in + b * s.in_resid * hw : nullptr,
                            d_in + b * s.in_capacity * hw, resid_out + b * s.resid * hw_out,
                            dense_out + b * s.capacity * hw_out, workspace);
    }
  }
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
