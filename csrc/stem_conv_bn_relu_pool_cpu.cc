#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_isa.h"
#include "cpu_threads.h"
#include "stem_conv_bn_relu_pool.h"

namespace dpn_fast {
namespace {

// Workspace sizes allow every variant's tile: output channels padded to a multiple of
// kMaxOcBlock, conv rows to a multiple of kMaxVector columns.
constexpr int64_t kMaxOcBlock = 16;
constexpr int64_t kMaxVector = 16;

struct StemRowArgs {
  const StemShape* shape;
  const float *w, *bias;
  float *planes, *conv;
  int64_t plane_size, plane_cols;
  int64_t kx_offset[kMaxStemKernel];  // tap column kx: its phase plane and column shift
};

}  // namespace

#define DPN_TILE "stem_conv_bn_relu_pool_tile.inc"
#include "cpu_isa_variants.inc"

namespace {

struct ConvVariant {
  void (*conv_row)(const StemRowArgs&, int64_t, int64_t);
  int64_t oc_block;
};

ConvVariant select_variant() {
  switch (detect_isa()) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
    case Isa::kAvx512: return {isa_avx512::conv_row, isa_avx512::kOcBlock};
    case Isa::kAvx2: return {isa_avx2::conv_row, isa_avx2::kOcBlock};
#endif
    default: return {isa_baseline::conv_row, isa_baseline::kOcBlock};
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The workspace, in floats: folded weights [c_out / oc_block][c][k][k][oc_block] and bias (c_out
// padded with zeros), one image's input split by column phase (stride s: column j * s + phase of
// the zero-padded image is plane[phase][.][j], so every tap reads contiguous columns) and one
// image's conv output before pooling.
int64_t plane_rows(const StemShape& s) { return (s.h_conv - 1) * s.stride + s.kernel; }
int64_t plane_cols(const StemShape& s) {
  return round_up(s.w_conv, kMaxVector) + (s.kernel - 1) / s.stride;
}
int64_t weights_size(const StemShape& s) {
  return round_up(s.c_out, kMaxOcBlock) * (s.c * s.kernel * s.kernel + 1);
}
int64_t planes_size(const StemShape& s) { return s.c * s.stride * plane_rows(s) * plane_cols(s); }

// Folds BN into the weights, laid out for a tile of oc_block channels; fills the row arguments.
StemRowArgs prepare(const float* w, const BatchNormParams& bn, float* workspace,
                    int64_t oc_block, const StemShape& s) {
  const int64_t taps = s.c * s.kernel * s.kernel;
  const int64_t oc_pad = round_up(s.c_out, kMaxOcBlock);
  float* w_folded = workspace;
  float* bias = w_folded + oc_pad * taps;
  std::fill(workspace, workspace + weights_size(s), 0.f);
  for (int64_t oc = 0; oc < s.c_out; ++oc) {
    const float scale = bn.gamma[oc] / std::sqrt(bn.var[oc] + bn.epsilon);
    bias[oc] = bn.beta[oc] - bn.mean[oc] * scale;
    float* block = w_folded + oc / oc_block * taps * oc_block;
    for (int64_t t = 0; t < taps; ++t) block[t * oc_block + oc % oc_block] = w[oc * taps + t] * scale;
  }
  StemRowArgs a;
  a.shape = &s;
  a.w = w_folded;
  a.bias = bias;
  a.planes = workspace + weights_size(s);
  a.conv = a.planes + planes_size(s);
  a.plane_cols = plane_cols(s);
  a.plane_size = plane_rows(s) * a.plane_cols;
  for (int64_t kx = 0; kx < s.kernel; ++kx)
    a.kx_offset[kx] = kx % s.stride * a.plane_size + kx / s.stride;
  return a;
}

// One image: planes, then conv + BN + ReLU, then max pool; called inside a parallel region.
void run_image(const float* x, float* out, const StemShape& s, const StemRowArgs& a,
               const ConvVariant& variant) {
  const int64_t pad = s.kernel / 2;
#pragma omp for collapse(2) schedule(static)
  for (int64_t plane = 0; plane < s.c * s.stride; ++plane) {
    for (int64_t r = 0; r < plane_rows(s); ++r) {
      const int64_t ci = plane / s.stride, phase = plane % s.stride, y = r - pad;
      float* dst = a.planes + plane * a.plane_size + r * a.plane_cols;
      for (int64_t j = 0; j < a.plane_cols; ++j) {
        const int64_t col = j * s.stride + phase - pad;
        dst[j] = y >= 0 && y < s.h && col >= 0 && col < s.w ? x[(ci * s.h + y) * s.w + col] : 0.f;
      }
    }
  }

#pragma omp for collapse(2) schedule(static)
  for (int64_t ob = 0; ob < round_up(s.c_out, variant.oc_block) / variant.oc_block; ++ob) {
    for (int64_t oy = 0; oy < s.h_conv; ++oy) variant.conv_row(a, ob, oy);
  }

  // 3x3 / stride 2 / padding 1 max pool, row by row: dst = max over the window's rows of the
  // row's max over columns 2px-1 .. 2px+1. Its inputs are >= 0 (after ReLU) and every window
  // holds at least one of them, so starting from 0 equals Paddle's -inf padding.
#pragma omp for collapse(2) schedule(static)
  for (int64_t oc = 0; oc < s.c_out; ++oc) {
    for (int64_t py = 0; py < s.h_out; ++py) {
      float* __restrict__ dst = out + (oc * s.h_out + py) * s.w_out;
      std::fill(dst, dst + s.w_out, 0.f);
      const int64_t y0 = std::max<int64_t>(2 * py - 1, 0), y1 = std::min(2 * py + 2, s.h_conv);
      for (int64_t y = y0; y < y1; ++y) {
        const float* __restrict__ src = a.conv + (oc * s.h_conv + y) * s.w_conv;
        dst[0] = std::max(dst[0], s.w_conv > 1 ? std::max(src[0], src[1]) : src[0]);
        // Windows 1 .. interior_end - 1 lie inside the row: no bounds checks, vectorised.
        const int64_t interior_end = std::min(s.w_out, (s.w_conv - 2) / 2 + 1);
        for (int64_t px = 1; px < interior_end; ++px) {
          dst[px] = std::max(dst[px], std::max(std::max(src[2 * px - 1], src[2 * px]),
                                               src[2 * px + 1]));
        }
        for (int64_t px = std::max<int64_t>(interior_end, 1); px < s.w_out; ++px) {
          float m = src[2 * px - 1];
          if (2 * px < s.w_conv) m = std::max(m, src[2 * px]);
          dst[px] = std::max(dst[px], m);
        }
      }
    }
  }
}

}  // namespace

StemShape stem_shape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t c_out, int64_t kernel,
                     int64_t stride) {
  const int64_t pad = kernel / 2;
  const int64_t h_conv = (h + 2 * pad - kernel) / stride + 1;
  const int64_t w_conv = (w + 2 * pad - kernel) / stride + 1;
  return {n, c, h, w, c_out, kernel, stride, h_conv, w_conv, (h_conv - 1) / 2 + 1,
          (w_conv - 1) / 2 + 1};
}

int64_t stem_workspace_size(const StemShape& s) {
  return weights_size(s) + planes_size(s) + s.c_out * s.h_conv * s.w_conv;
}

void stem_conv_bn_relu_pool_cpu(const float* x, const float* w, const BatchNormParams& bn,
                                float* out, float* workspace, const StemShape& s) {
  static const ConvVariant variant = select_variant();
  const StemRowArgs args = prepare(w, bn, workspace, variant.oc_block, s);
#pragma omp parallel num_threads(cpu_threads())
  for (int64_t i = 0; i < s.n; ++i) {
    run_image(x + i * s.c * s.h * s.w, out + i * s.c_out * s.h_out * s.w_out, s, args, variant);
  }
}

}  // namespace dpn_fast
