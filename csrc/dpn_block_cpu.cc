#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "cpu_threads.h"
#include "dpn_block.h"
#include "onednn_gemm.h"

namespace dpn_fast {
namespace {

// With DPN_FAST_PROFILE=1 in the environment when the library loads: time and FLOPs per part of
// the blocks since the last reset (dpn_fast_dpn_block_profile), for the benchmarks, which compare
// the 1x1 GEMMs' rate with the machine's GEMM peak. Off, the blocks read no clock and touch no
// shared counter.
const bool profile_enabled = [] {
  const char* env = std::getenv("DPN_FAST_PROFILE");
  return env != nullptr && std::strcmp(env, "1") == 0;
}();

enum Part { kInputBnRelu, kProjection, kConv1x1a, kGroupedConv, kConv1x1c, kParts };
std::atomic<int64_t> part_nanoseconds[kParts];
std::atomic<int64_t> part_flops[kParts];

class PartTimer {
 public:
  PartTimer() {
    if (profile_enabled) last_ = std::chrono::steady_clock::now();
  }

  void next(Part part, int64_t flops = 0) {
    if (!profile_enabled) return;
    const auto now = std::chrono::steady_clock::now();
    part_nanoseconds[part] +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    part_flops[part] += flops;
    last_ = now;
  }

 private:
  std::chrono::steady_clock::time_point last_;
};

// NaN -> 0, as paddle's relu.
inline float relu(float v) { return v > 0.0f ? v : 0.0f; }

// Where a block reads its input: the stage's resid and dense buffers, channels-last, or the
// stem's output (dense only, NCHW, float) for a stage's first block.
struct BlockInput {
  const float* resid;  // [n, hw, in_resid] or nullptr
  const void* dense;   // [n, hw, in_capacity], or NCHW [n, in_capacity, hw] if nchw
  bool nchw;
  bool dense_bf16;     // dense holds Bf16 (dense_is_bf16), else float
};

inline void store(float* out, float v) { *out = v; }
inline void store(Bf16* out, float v) { *out = round_to_bf16(v); }
inline float load(const float* p) { return *p; }
inline float load(const Bf16* p) { return bf16_value(*p); }

// The dense buffer's element `offset`: Bf16 elements if bf16, else floats.
inline void* dense_at(void* dense, int64_t offset, bool bf16) {
  return bf16 ? static_cast<void*>(static_cast<Bf16*>(dense) + offset)
              : static_cast<void*>(static_cast<float*>(dense) + offset);
}
inline const void* dense_at(const void* dense, int64_t offset, bool bf16) {
  return dense_at(const_cast<void*>(dense), offset, bf16);
}

// One output of bn_relu_rows: relu(bn(input)) at the positions a convolution of `stride` reads
// ([::2, ::2] for 2), [positions, in_channels] channels-last, as float or (bf16 GEMMs) Bf16.
template <typename Out>
struct BnReluOut {
  FoldedBatchNorm bn;
  Out* out;
  int64_t stride;
};

// out[p, c] = relu(bn(concat(resid, dense)[q, c])) for each output, q running over the input
// positions of n images: one read of the input for all outputs (a projection block's two). Dense:
// in.dense's element type.
template <typename Out, typename Dense>
void bn_relu_rows(const DpnBlockShape& s, const BlockInput& in,
                  std::initializer_list<BnReluOut<Out>> outs) {
  const int64_t hw = s.h * s.w, cin = s.in_channels();
  // Dense channel c of pixel q: NHWC q * in_capacity + c, NCHW c * hw + q (per image).
  const int64_t dense_pixel = in.nchw ? 1 : s.in_capacity, dense_channel = in.nchw ? hw : 1;
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t q = 0; q < s.n * hw; ++q) {
    const int64_t b = q / hw, i = q % hw / s.w, j = q % s.w;
    const float* r = in.resid + q * s.in_resid;
    const Dense* d =
        static_cast<const Dense*>(in.dense) + b * hw * s.in_capacity + (q % hw) * dense_pixel;
    for (const BnReluOut<Out>& o : outs) {
      if (i % o.stride != 0 || j % o.stride != 0) continue;
      const int64_t ho = conv3x3_out_size(s.h, o.stride), wo = conv3x3_out_size(s.w, o.stride);
      Out* out = o.out + ((b * ho + i / o.stride) * wo + j / o.stride) * cin;
      const float* scale = o.bn.scale;
      const float* shift = o.bn.shift;
#pragma omp simd
      for (int64_t c = 0; c < s.in_resid; ++c) store(out + c, relu(r[c] * scale[c] + shift[c]));
      out += s.in_resid;
      scale += s.in_resid;
      shift += s.in_resid;
#pragma omp simd
      for (int64_t c = 0; c < s.in_dense; ++c)
        store(out + c, relu(load(d + c * dense_channel) * scale[c] + shift[c]));
    }
  }
}

// The block's input BN + ReLU into act (and act_w, a projection's): one read of (resid, dense)
// for both BNs of a projection.
template <typename Out, typename Dense>
void input_bn_relu(const DpnBlockShape& s, const DpnBlockWeights& wt, const BlockInput& in,
                   Out* act_w, Out* act) {
  if (s.projection) {
    bn_relu_rows<Out, Dense>(s, in, {{wt.bn_w, act_w, s.stride}, {wt.bn_a, act, 1}});
  } else {
    bn_relu_rows<Out, Dense>(s, in, {{wt.bn_a, act, 1}});
  }
}

// out[p, 0 .. rows) (+)= in[p, :] x weight[rows, k]^T for `pixels` positions: a 1x1
// convolution, channels-last; weight plain or packed (DpnBlockWeights), `in` float, or Bf16 with
// bf16 GEMMs. out_channels: channels per position of `out`, which is float, or with bf16 GEMMs and
// out_bf16, Bf16. epilogue: a BN + ReLU on the result (oneDNN post-ops), or none.
void conv1x1(const DpnBlockWeights& wt, const void* in, int64_t pixels, int64_t k,
             const void* weight, int64_t rows, void* out, int64_t out_channels, bool accumulate,
             const FoldedBatchNorm* epilogue = nullptr, bool out_bf16 = false) {
  GemmShape g{pixels, rows, k, k, k, out_channels, accumulate};
  g.b_layout = wt.packed ? BLayout::kPacked : BLayout::kTransposed;
  g.scale_shift_relu = epilogue != nullptr;
  g.bf16 = wt.bf16_stage;
  g.c_bf16 = out_bf16;
  const float* scale = epilogue ? epilogue->scale : nullptr;
  const float* shift = epilogue ? epilogue->shift : nullptr;
  const auto* in_bf16 = static_cast<const Bf16*>(in);
  const auto* weight_bf16 = static_cast<const Bf16*>(weight);
  if (out_bf16) {
    gemm_bf16(g, in_bf16, weight_bf16, static_cast<Bf16*>(out), scale, shift);
  } else if (wt.bf16_stage) {
    gemm_bf16(g, in_bf16, weight_bf16, static_cast<float*>(out), scale, shift);
  } else {
    gemm_f32(g, static_cast<const float*>(in), static_cast<const float*>(weight),
             static_cast<float*>(out), scale, shift);
  }
}

// Offsets (in floats) of the workspace's parts, and its size: one place for both. With bf16 GEMMs
// act, act_w, a and g hold Bf16 (half their space unused).
struct WorkspaceLayout {
  int64_t act, act_w, a, g, total;
};

WorkspaceLayout workspace_layout(const DpnBlockShape& s) {
  const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out(), in = s.n * s.in_channels();
  WorkspaceLayout l{};
  l.act_w = in * hw;  // after act
  l.a = l.act_w + (s.projection ? in * (s.stride == 1 ? hw : hw_out) : 0);
  l.g = l.a + s.n * s.bottleneck * hw + kNhwcInputSlack;  // the grouped conv reads past a's end
  l.total = l.g + s.n * s.bottleneck * hw_out;
  return l;
}

// One block on n images (the shapes and in-place rules of dpn_stage_forward_cpu's block 0);
// workspace: workspace_layout(s).total floats.
void dpn_block_forward_cpu(const DpnBlockShape& s, const DpnBlockWeights& wt,
                           const BlockInput& in, float* resid_out, void* dense_out,
                           float* workspace) {
  if (s.n == 0) return;  // an empty batch: empty outputs
  const WorkspaceLayout l = workspace_layout(s);
  const int64_t pixels = s.n * s.h * s.w, pixels_out = s.n * s.h_out() * s.w_out();
  const int64_t cin = s.in_channels();
  float* const act = workspace + l.act;
  float* const act_w = workspace + l.act_w;
  float* const a = workspace + l.a;
  float* const g = workspace + l.g;
  Bf16* const act_bf16 = reinterpret_cast<Bf16*>(act);
  Bf16* const act_w_bf16 = reinterpret_cast<Bf16*>(act_w);
  Bf16* const a_bf16 = reinterpret_cast<Bf16*>(a);
  Bf16* const g_bf16 = reinterpret_cast<Bf16*>(g);
  // The activations between the GEMMs: float, or Bf16 with bf16 GEMMs.
  void* const gemm_act = wt.bf16_stage ? static_cast<void*>(act_bf16) : act;
  void* const gemm_act_w = wt.bf16_stage ? static_cast<void*>(act_w_bf16) : act_w;
  void* const bottleneck_a = wt.bf16_stage ? static_cast<void*>(a_bf16) : a;
  void* const bottleneck_g = wt.bf16_stage ? static_cast<void*>(g_bf16) : g;
  PartTimer timer;

  if (in.dense_bf16) {
    input_bn_relu<Bf16, Bf16>(s, wt, in, act_w_bf16, act_bf16);
  } else if (wt.bf16_stage) {
    input_bn_relu<Bf16, float>(s, wt, in, act_w_bf16, act_bf16);
  } else {
    input_bn_relu<float, float>(s, wt, in, act_w, act);
  }
  timer.next(kInputBnRelu);

  if (s.projection) {
    conv1x1(wt, gemm_act_w, pixels_out, cin, wt.w_proj_resid, s.resid, resid_out, s.resid,
            false);
    conv1x1(wt, gemm_act_w, pixels_out, cin, wt.w_proj_dense, 2 * s.inc, dense_out, s.capacity,
            false, nullptr, wt.bf16_stage);
    timer.next(kProjection, 2 * pixels_out * (s.resid + 2 * s.inc) * cin);
  }

  // 1x1a with the grouped conv's input BN + ReLU as its epilogue.
  conv1x1(wt, gemm_act, pixels, cin, wt.w_a, s.bottleneck, bottleneck_a, s.bottleneck, false,
          &wt.bn_b, wt.bf16_stage);
  timer.next(kConv1x1a, 2 * pixels * s.bottleneck * cin);

  const GroupedConvShape conv{s.n, s.bottleneck, s.h, s.w, s.bottleneck, s.groups, s.stride,
                              s.h_out(), s.w_out()};
  const auto* w_conv_blob = static_cast<const uint8_t*>(wt.w_conv);
  if (wt.bf16_stage) {
    grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(a_bf16, w_conv_blob, wt.bn_c, g_bf16, conv);
  } else if (wt.packed) {
    grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(a, w_conv_blob, wt.bn_c, g, conv);
  } else {
    grouped_conv3x3_bn_relu_nhwc_infer_cpu(a, static_cast<const float*>(wt.w_conv), wt.bn_c, g,
                                           conv);
  }
  timer.next(kGroupedConv, 2 * s.n * s.bottleneck * (s.bottleneck / s.groups) * 9 * s.h_out() *
                               s.w_out());

  // 1x1c: the residual rows accumulate into resid, the dense rows land after the dense before.
  conv1x1(wt, bottleneck_g, pixels_out, s.bottleneck, wt.w_c_resid, s.resid, resid_out, s.resid,
          true);
  conv1x1(wt, bottleneck_g, pixels_out, s.bottleneck, wt.w_c_dense, s.inc,
          dense_at(dense_out, s.dense_before(), wt.bf16_stage), s.capacity, false, nullptr,
          wt.bf16_stage);
  timer.next(kConv1x1c, 2 * pixels_out * (s.resid + s.inc) * s.bottleneck);
}

// Positions a run of images should span: where oneDNN's matmul has reached its rate.
constexpr int64_t kRunPixels = 784;

// Images a stage runs together, each run through all the blocks, so that a run's planes stay in
// cache from block to block instead of the whole batch's stage buffers streaming through memory
// once per block: enough images for kRunPixels positions at the stage's output size (one at
// 56x56 and 28x28, 4 at 14x14, 16 at 7x7). DPN92, batch 8, 1 thread (Intel Xeon, Sapphire
// Rapids class): stages 1 and 2 image by image took 51 ms less than batch-wide, stage 3 in runs
// of 4 images another ~25 ms less.
int64_t images_per_run(const DpnBlockShape* shapes, int64_t count) {
  const int64_t hw = shapes[count - 1].h_out() * shapes[count - 1].w_out();
  return std::max<int64_t>(1, std::min(shapes[0].n, (kRunPixels + hw - 1) / hw));
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
                           int64_t count, const float* resid_in, const void* dense_in,
                           float* resid_out, void* dense_out, float* workspace) {
  const int64_t n = shapes[0].n, images = images_per_run(shapes, count);
  const bool bf16 = weights[0].bf16_stage;
  // Images [b, b + k) of each buffer are a contiguous [k, ...] tensor (NHWC and NCHW alike).
  for (int64_t b = 0; b < n; b += images) {
    for (int64_t i = 0; i < count; ++i) {
      const DpnBlockShape s = with_images(shapes[i], std::min(images, n - b));
      const int64_t hw = s.h * s.w, hw_out = s.h_out() * s.w_out();
      const float* r_in = i == 0 ? resid_in : resid_out;
      const void* d_in = i == 0 ? dense_in : dense_out;
      const bool d_in_bf16 = dense_is_bf16(s, weights[i]);
      const BlockInput in{r_in ? r_in + b * s.in_resid * hw : nullptr,
                          dense_at(d_in, b * s.in_capacity * hw, d_in_bf16), s.in_resid == 0,
                          d_in_bf16};
      dpn_block_forward_cpu(s, weights[i], in, resid_out + b * s.resid * hw_out,
                            dense_at(dense_out, b * s.capacity * hw_out, bf16), workspace);
    }
  }
}

namespace {

// pooled[b, c] = mean over the positions of relu(bn(concat(resid, dense))).
template <typename Dense>
void head_features(const DpnHeadShape& s, const float* resid, const Dense* dense,
                   const FoldedBatchNorm& bn, float* pooled) {
  const int64_t channels = s.channels();
  const float* scale = bn.scale;
  const float* shift = bn.shift;
  const float inv_hw = 1.0f / float(s.hw);
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t b = 0; b < s.n; ++b) {
    float* sum = pooled + b * channels;
    std::fill(sum, sum + channels, 0.0f);
    for (int64_t p = 0; p < s.hw; ++p) {
      const float* r = resid + (b * s.hw + p) * s.resid;
      const Dense* d = dense + (b * s.hw + p) * s.capacity;
#pragma omp simd
      for (int64_t c = 0; c < s.resid; ++c) sum[c] += relu(r[c] * scale[c] + shift[c]);
#pragma omp simd
      for (int64_t c = 0; c < s.dense; ++c)
        sum[s.resid + c] += relu(load(d + c) * scale[s.resid + c] + shift[s.resid + c]);
    }
    for (int64_t c = 0; c < channels; ++c) sum[c] *= inv_hw;
  }
}

// logits = fc_bias + pooled x fc_weight.
void head_classifier(const DpnHeadShape& s, const DpnHeadWeights& wt, const float* pooled,
                     float* logits) {
  const int64_t channels = s.channels();
  for (int64_t b = 0; b < s.n; ++b) {
    std::copy(wt.fc_bias, wt.fc_bias + s.classes, logits + b * s.classes);
  }
  GemmShape g{s.n, s.classes, channels, channels, s.classes, s.classes, true};
  if (wt.packed) {
    g.b_layout = BLayout::kPacked;
    g.ldb = channels;
  }
  gemm_f32(g, pooled, wt.fc_weight, logits);
}

}  // namespace

void dpn_head_forward_cpu(const DpnHeadShape& s, const float* resid, const void* dense,
                          const DpnHeadWeights& wt, float* logits, float* workspace) {
  if (s.n == 0) return;  // an empty batch: empty logits
  if (s.dense_bf16) {
    head_features(s, resid, static_cast<const Bf16*>(dense), wt.bn, workspace);
  } else {
    head_features(s, resid, static_cast<const float*>(dense), wt.bn, workspace);
  }
  head_classifier(s, wt, workspace, logits);
}

}  // namespace dpn_fast

// Seconds and FLOPs spent per part of the blocks since the last reset, in the order input BN +
// ReLU, projection, 1x1a, grouped conv, 1x1c (kParts entries each). Returns 0, and zeros, unless
// DPN_FAST_PROFILE=1 was set before the library loaded.
extern "C" int dpn_fast_dpn_block_profile(double* seconds, double* flops, int reset) {
  using namespace dpn_fast;
  for (int p = 0; p < kParts; ++p) {
    seconds[p] = (reset ? part_nanoseconds[p].exchange(0) : part_nanoseconds[p].load()) * 1e-9;
    flops[p] = double(reset ? part_flops[p].exchange(0) : part_flops[p].load());
  }
  return profile_enabled ? 1 : 0;
}
