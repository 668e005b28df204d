#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_threads.h"
#include "dual_path_merge.h"

namespace dpn_fast {
namespace {

// Rows (one (batch, channel) plane of hw elements) smaller than this in total run on one thread.
constexpr int64_t kParallelMinElements = 1 << 15;

inline float relu(float v) { return v > 0.0f ? v : 0.0f; }  // NaN -> 0, as paddle's relu

// One channel plane: x = a (+ b); optionally stores x, and up to two relu(x * s + t).
// Specialised so that each variant is a branch-free loop GCC vectorises.
template <bool kAdd, bool kStore, int kActs>
void forward_row(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                 float* __restrict__ act0, float* __restrict__ act1, const float* s,
                 const float* t, int64_t hw) {
  const float s0 = s[0], t0 = t[0], s1 = s[1], t1 = t[1];
  for (int64_t i = 0; i < hw; ++i) {
    const float x = kAdd ? a[i] + b[i] : a[i];
    if (kStore) out[i] = x;
    if (kActs >= 1) act0[i] = relu(x * s0 + t0);
    if (kActs >= 2) act1[i] = relu(x * s1 + t1);
  }
}

using ForwardRow = void (*)(const float*, const float*, float*, float*, float*, const float*,
                            const float*, int64_t);

template <bool kAdd, bool kStore>
ForwardRow pick_forward_row(int num_acts) {
  switch (num_acts) {
    case 0: return forward_row<kAdd, kStore, 0>;
    case 1: return forward_row<kAdd, kStore, 1>;
    default: return forward_row<kAdd, kStore, 2>;
  }
}

// One channel plane of the backward: g = g_out + sum_a [x*s_a + t_a > 0] g_act_a * s_a, written to
// up to two destinations (the resid part of the merge feeds both resid and y).
template <bool kGradOut, int kActs>
void backward_row(const float* __restrict__ x, const float* __restrict__ g_out,
                  const float* __restrict__ g_act0, const float* __restrict__ g_act1,
                  float* __restrict__ dst0, float* __restrict__ dst1, const float* s,
                  const float* t, int64_t hw) {
  const float s0 = s[0], t0 = t[0], s1 = s[1], t1 = t[1];
  for (int64_t i = 0; i < hw; ++i) {
    float g = kGradOut ? g_out[i] : 0.0f;
    if (kActs >= 1) g += x[i] * s0 + t0 > 0.0f ? g_act0[i] * s0 : 0.0f;
    if (kActs >= 2) g += x[i] * s1 + t1 > 0.0f ? g_act1[i] * s1 : 0.0f;
    dst0[i] = g;
    if (dst1 != nullptr) dst1[i] = g;
  }
}

// Raw BatchNorm parameters folded to scale/shift for all channels up front (a vectorised loop),
// so rows of small planes (7x7) don't each pay a sqrt and a division.
ChannelAffine folded(const ChannelAffine& affine, int64_t channels, std::vector<float>& storage) {
  ChannelAffine out = affine;
  for (int a = 0; a < affine.num_acts; ++a) {
    if (affine.var[a] == nullptr) continue;
    storage.resize(2 * kMaxActs * channels);
    float* __restrict__ scale = storage.data() + 2 * a * channels;
    float* __restrict__ shift = scale + channels;
    const float *w = affine.scale[a], *b = affine.shift[a], *m = affine.mean[a], *v = affine.var[a];
    const float eps = affine.eps[a];
    for (int64_t c = 0; c < channels; ++c) {
      scale[c] = w[c] / std::sqrt(v[c] + eps);
      shift[c] = b[c] - m[c] * scale[c];
    }
    out.scale[a] = scale;
    out.shift[a] = shift;
    out.mean[a] = out.var[a] = nullptr;
  }
  return out;
}

using BackwardRow = void (*)(const float*, const float*, const float*, const float*, float*,
                             float*, const float*, const float*, int64_t);

template <bool kGradOut>
BackwardRow pick_backward_row(int num_acts) {
  switch (num_acts) {
    case 0: return backward_row<kGradOut, 0>;
    case 1: return backward_row<kGradOut, 1>;
    default: return backward_row<kGradOut, 2>;
  }
}

}  // namespace

void dual_path_merge_forward_cpu(const float* resid, const float* dense, const float* y,
                                 const ChannelAffine& raw_affine, float* resid_out,
                                 float* dense_out, float* const* act, const MergeShape& s) {
  const int64_t channels = s.channels(), cy = s.r + s.inc;
  std::vector<float> storage;
  const ChannelAffine affine = folded(raw_affine, channels, storage);
  const int num_acts = affine.num_acts;
  const bool merge = y != nullptr;
  const ForwardRow add_row = merge ? pick_forward_row<true, true>(num_acts) : nullptr;
  const ForwardRow copy_row = pick_forward_row<false, true>(num_acts);
  const ForwardRow read_row = pick_forward_row<false, false>(num_acts);
  const int64_t rows = s.n * channels;
#pragma omp parallel for num_threads(cpu_threads()) schedule(static) \
    if (rows * s.hw >= kParallelMinElements)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / channels, c = row % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
    for (int a = 0; a < num_acts; ++a) affine.at(a, c, &sc[a], &sh[a]);
    float* act0 = num_acts >= 1 ? act[0] + row * s.hw : nullptr;
    float* act1 = num_acts >= 2 ? act[1] + row * s.hw : nullptr;
    if (c < s.r) {
      const float* src = resid + (b * s.r + c) * s.hw;
      if (merge) {
        add_row(src, y + (b * cy + c) * s.hw, resid_out + (b * s.r + c) * s.hw, act0, act1, sc, sh,
                s.hw);
      } else {
        read_row(src, nullptr, nullptr, act0, act1, sc, sh, s.hw);
      }
    } else {
      const int64_t k = c - s.r;  // channel within dense_out
      const float* src = k < s.d ? dense + (b * s.dense_in_stride() + k) * s.hw
                                 : y + (b * cy + s.r + k - s.d) * s.hw;
      // Nothing to store without a merge, or for old channels already in a stage buffer.
      if (!merge || (s.dense_capacity && k < s.d)) {
        read_row(src, nullptr, nullptr, act0, act1, sc, sh, s.hw);
      } else {
        copy_row(src, nullptr, dense_out + (b * s.dense_out_stride() + k) * s.hw, act0, act1, sc,
                 sh, s.hw);
      }
    }
  }
}

void dual_path_merge_backward_cpu(const float* x_resid, const float* x_dense,
                                  const float* g_resid_out, const float* g_dense_out,
                                  const float* const* g_act, const ChannelAffine& raw_affine,
                                  float* g_resid, float* g_dense, float* g_y, const MergeShape& s) {
  const int64_t channels = s.channels(), cy = s.r + s.inc, cd = s.d + s.inc;
  // An unused BN output has no gradient: drop it from the sum (compact the live ones first).
  std::vector<float> storage;
  const ChannelAffine affine = folded(raw_affine, channels, storage);
  ChannelAffine live;
  const float* g_live[kMaxActs] = {};
  for (int a = 0; a < affine.num_acts; ++a) {
    if (g_act[a] == nullptr) continue;
    const int i = live.num_acts++;
    live.scale[i] = affine.scale[a];
    live.shift[i] = affine.shift[a];
    live.mean[i] = affine.mean[a];
    live.var[i] = affine.var[a];
    live.eps[i] = affine.eps[a];
    g_live[i] = g_act[a];
  }
  const int num_acts = live.num_acts;
  const BackwardRow with_out = pick_backward_row<true>(num_acts);
  const BackwardRow without_out = pick_backward_row<false>(num_acts);
  const int64_t rows = s.n * channels;
#pragma omp parallel for num_threads(cpu_threads()) schedule(static) \
    if (rows * s.hw >= kParallelMinElements)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / channels, c = row % channels;
    float sc[kMaxActs] = {}, sh[kMaxActs] = {};
    for (int a = 0; a < num_acts; ++a) live.at(a, c, &sc[a], &sh[a]);
    const float* ga0 = num_acts >= 1 ? g_live[0] + row * s.hw : nullptr;
    const float* ga1 = num_acts >= 2 ? g_live[1] + row * s.hw : nullptr;
    const float *x, *g_out;
    float *dst0, *dst1 = nullptr;
    if (c < s.r) {
      const int64_t off = (b * s.r + c) * s.hw;
      x = num_acts ? x_resid + off : nullptr;
      g_out = g_resid_out ? g_resid_out + off : nullptr;
      dst0 = g_resid + off;
      if (g_y != nullptr) dst1 = g_y + (b * cy + c) * s.hw;
    } else {
      const int64_t k = c - s.r, off = (b * cd + k) * s.hw;
      x = num_acts ? x_dense + off : nullptr;
      g_out = g_dense_out ? g_dense_out + off : nullptr;
      dst0 = k < s.d ? g_dense + (b * s.d + k) * s.hw : g_y + (b * cy + s.r + k - s.d) * s.hw;
    }
    (g_out ? with_out : without_out)(x, g_out, ga0, ga1, dst0, dst1, sc, sh, s.hw);
  }
}

}  // namespace dpn_fast
