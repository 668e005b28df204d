#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bf16.h"
#include "cpu_isa.h"
#ifdef DPN_FAST_HAVE_X86_VARIANTS
#include <immintrin.h>
#endif
#include "cpu_threads.h"
#include "stem_conv_bn_relu_pool.h"

namespace dpn_fast {
namespace {

// Workspace sizes allow every variant's tile: output channels padded to a multiple of
// kMaxOcBlock, conv rows to a multiple of kMaxVector columns.
constexpr int64_t kMaxOcBlock = 16;
constexpr int64_t kMaxVector = 16;

// The bf16 kernel pairs the taps of a kernel row (Bf16Pair): (0, 1), (2, 3), ..., the last of an
// odd kernel with a zero weight.
inline int64_t tap_pairs(int64_t kernel) { return (kernel + 1) / 2; }

// The convolution's operands, laid out by prepare for the variant that runs it:
// - floats: weights [c_out / oc_block][c][k][k][oc_block], planes: one per input channel and
//   column phase (stride s: column j * s + phase of the zero-padded image is plane[phase][.][j],
//   so every tap reads contiguous columns);
// - bf16 tap pairs: weights [c_out / oc_block][c][k][tap_pairs(k)][oc_block] and planes of pairs,
//   plane[phase][.][j] = (column j * s + phase, column j * s + phase + 1), so the pair of taps
//   (kx, kx + 1) of an output column reads plane[kx % s] where the float kernel's tap kx reads.
struct StemRowArgs {
  const StemShape* shape;
  const void* w;
  const float *scale, *shift;  // BN per output channel, applied to the sums
  void* planes;
  float* conv;
  int64_t plane_size, plane_cols;
  int64_t kx_offset[kMaxStemKernel];  // tap column kx: its phase plane and column shift
};

}  // namespace

#define DPN_TILE "stem_conv_bn_relu_pool_tile.inc"
#include "cpu_isa_variants.inc"
#define DPN_TILE "stem_conv_bn_relu_pool_tile.inc"
#include "cpu_isa_bf16_variant.inc"

namespace {

struct ConvVariant {
  void (*conv_row)(const StemRowArgs&, int64_t, int64_t);
  int64_t oc_block;
  bool tap_pairs;  // the bf16 kernel's operands (StemRowArgs)
};

ConvVariant select_variant(bool bf16) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  if (bf16 && avx512_bf16_pairs()) {
    return {isa_avx512_bf16::conv_row, isa_avx512_bf16::kOcBlock, true};
  }
#endif
  switch (detect_isa()) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
    case Isa::kAvx512: return {isa_avx512::conv_row, isa_avx512::kOcBlock, false};
    case Isa::kAvx2: return {isa_avx2::conv_row, isa_avx2::kOcBlock, false};
#endif
    default: return {isa_baseline::conv_row, isa_baseline::kOcBlock, false};
  }
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The workspace, in floats (a Bf16Pair takes one): the weights (StemRowArgs) and the BN's scale
// and shift (c_out padded with zeros), one image's planes (StemRowArgs) and one image's conv
// output before pooling.
int64_t plane_rows(const StemShape& s) { return (s.h_conv - 1) * s.stride + s.kernel; }
int64_t plane_cols(const StemShape& s) {
  return round_up(s.w_conv, kMaxVector) + (s.kernel - 1) / s.stride;
}
int64_t weights_size(const StemShape& s) {
  return round_up(s.c_out, kMaxOcBlock) * (s.c * s.kernel * s.kernel + 2);
}
int64_t planes_size(const StemShape& s) { return s.c * s.stride * plane_rows(s) * plane_cols(s); }

// Lays the weights out for `variant` (rounded to bf16 if bf16), folds the BN into a scale and a
// shift; fills the row arguments.
StemRowArgs prepare(const float* w, const BatchNormParams& bn, bool bf16, float* workspace,
                    const ConvVariant& variant, const StemShape& s) {
  const int64_t taps = s.c * s.kernel * s.kernel, oc_block = variant.oc_block;
  const int64_t oc_pad = round_up(s.c_out, kMaxOcBlock);
  float* scale = workspace + oc_pad * taps;
  float* shift = scale + oc_pad;
  std::fill(workspace, workspace + weights_size(s), 0.f);
  fold_batch_norm(bn, s.c_out, scale, shift);
  if (variant.tap_pairs) {
    const int64_t pairs = tap_pairs(s.kernel);
    auto* w_pairs = reinterpret_cast<Bf16Pair*>(workspace);
    for (int64_t oc = 0; oc < s.c_out; ++oc) {
      Bf16Pair* block = w_pairs + oc / oc_block * s.c * s.kernel * pairs * oc_block;
      for (int64_t row = 0; row < s.c * s.kernel; ++row) {  // (ci, ky)
        const float* taps_row = w + (oc * s.c * s.kernel + row) * s.kernel;
        for (int64_t p = 0; p < pairs; ++p) {
          const float second = 2 * p + 1 < s.kernel ? taps_row[2 * p + 1] : 0.f;
          block[(row * pairs + p) * oc_block + oc % oc_block] = bf16_pair(taps_row[2 * p], second);
        }
      }
    }
  } else {
    for (int64_t oc = 0; oc < s.c_out; ++oc) {
      float* block = workspace + oc / oc_block * taps * oc_block;
      for (int64_t t = 0; t < taps; ++t) {
        const float v = w[oc * taps + t];
        block[t * oc_block + oc % oc_block] = bf16 ? bf16_rounded(v) : v;
      }
    }
  }
  StemRowArgs a;
  a.shape = &s;
  a.w = workspace;
  a.scale = scale;
  a.shift = shift;
  a.planes = workspace + weights_size(s);
  a.conv = workspace + weights_size(s) + planes_size(s);
  a.plane_cols = plane_cols(s);
  a.plane_size = plane_rows(s) * a.plane_cols;
  for (int64_t kx = 0; kx < s.kernel; ++kx)
    a.kx_offset[kx] = kx % s.stride * a.plane_size + kx / s.stride;
  return a;
}

// Whether the kernel reads plane `phase`: every phase for floats; for tap pairs, those of the
// pairs' first taps (stride 2: phase 0 only).
bool phase_read(const StemShape& s, const ConvVariant& variant, int64_t phase) {
  for (int64_t kx = 0; kx < s.kernel; kx += variant.tap_pairs ? 2 : 1) {
    if (kx % s.stride == phase) return true;
  }
  return false;
}

// Row r of plane (ci, phase): columns j of the zero-padded image's row, col = j * stride + phase
// - pad (and col + 1 for pairs), rounded to bf16 if bf16. The columns inside the image run
// without bounds checks, vectorised.
template <typename Tap>
void fill_plane_row(const float* x, const StemShape& s, int64_t ci, int64_t phase, int64_t r,
                    bool bf16, Tap* dst, int64_t cols) {
  constexpr bool pairs = std::is_same_v<Tap, Bf16Pair>;
  const int64_t pad = s.kernel / 2, y = r - pad, reach = pairs ? 2 : 1;
  if (y < 0 || y >= s.h) {
    std::fill(dst, dst + cols, Tap{});
    return;
  }
  const float* x_row = x + (ci * s.h + y) * s.w;
  const int64_t offset = phase - pad;  // column j reads image column j * stride + offset
  auto at = [&](int64_t col) { return col >= 0 && col < s.w ? x_row[col] : 0.f; };
  auto edge = [&](int64_t j) -> Tap {
    const int64_t col = j * s.stride + offset;
    if constexpr (pairs) {
      return bf16_pair(at(col), at(col + 1));
    } else {
      return bf16 ? bf16_rounded(at(col)) : at(col);
    }
  };
  // Columns j in [inside_begin, inside_end) read only inside the image.
  const int64_t inside_begin =
      std::min(cols, (std::max<int64_t>(-offset, 0) + s.stride - 1) / s.stride);
  const int64_t max_step = s.w - reach - offset;  // j * stride <= max_step: inside on the right
  const int64_t inside_end =
      max_step < 0 ? inside_begin
                   : std::max(inside_begin, std::min(cols, max_step / s.stride + 1));
  for (int64_t j = 0; j < inside_begin; ++j) dst[j] = edge(j);
  if constexpr (pairs) {
#pragma omp simd
    for (int64_t j = inside_begin; j < inside_end; ++j) {
      dst[j] = bf16_pair(x_row[j * s.stride + offset], x_row[j * s.stride + offset + 1]);
    }
  } else if (bf16) {
#pragma omp simd
    for (int64_t j = inside_begin; j < inside_end; ++j) {
      dst[j] = bf16_rounded(x_row[j * s.stride + offset]);
    }
  } else {
#pragma omp simd
    for (int64_t j = inside_begin; j < inside_end; ++j) dst[j] = x_row[j * s.stride + offset];
  }
  for (int64_t j = inside_end; j < cols; ++j) dst[j] = edge(j);
}

// One image: planes, then conv + BN + ReLU, then max pool; called inside a parallel region.
void run_image(const float* x, float* out, const StemShape& s, const StemRowArgs& a,
               const ConvVariant& variant, bool bf16) {
#pragma omp for collapse(2) schedule(static)
  for (int64_t plane = 0; plane < s.c * s.stride; ++plane) {
    for (int64_t r = 0; r < plane_rows(s); ++r) {
      const int64_t ci = plane / s.stride, phase = plane % s.stride;
      if (!phase_read(s, variant, phase)) continue;
      const int64_t first = plane * a.plane_size + r * a.plane_cols;
      if (variant.tap_pairs) {
        fill_plane_row(x, s, ci, phase, r, bf16, static_cast<Bf16Pair*>(a.planes) + first,
                       a.plane_cols);
      } else {
        fill_plane_row(x, s, ci, phase, r, bf16, static_cast<float*>(a.planes) + first,
                       a.plane_cols);
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
                                bool bf16, float* out, float* workspace, const StemShape& s) {
  static const ConvVariant float_variant = select_variant(false);
  static const ConvVariant bf16_variant = select_variant(true);
  const ConvVariant& variant = bf16 ? bf16_variant : float_variant;
  const StemRowArgs args = prepare(w, bn, bf16, workspace, variant, s);
#pragma omp parallel num_threads(cpu_threads())
  for (int64_t i = 0; i < s.n; ++i) {
    run_image(x + i * s.c * s.h * s.w, out + i * s.c_out * s.h_out * s.w_out, s, args, variant,
              bf16);
  }
}

}  // namespace dpn_fast
