#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_threads.h"
#include "stem_conv_bn_relu_pool.h"

namespace dpn_fast {
namespace {

// Register tile: kOcBlock output channels x kPositions output columns of one row (8 x 16 floats:
// 8 AVX-512 or 16 AVX2 registers). GCC vector extensions keep it in registers on any x86 target.
// (Two vectors of columns per channel measured no faster on DPN92's stem.)
constexpr int64_t kOcBlock = 8;
constexpr int64_t kPositions = 16;
typedef float Vec __attribute__((vector_size(kPositions * sizeof(float))));

inline Vec loadu(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The workspace, in floats: folded weights [c_out / kOcBlock][c][k][k][kOcBlock] and bias (c_out
// padded to kOcBlock with zeros), one image's input split by column phase (stride s: column
// j * s + phase of the zero-padded image is plane[phase][.][j], so every tap reads contiguous
// columns) and one image's conv output before pooling.
struct Workspace {
  float *w, *bias, *planes, *conv;
  int64_t plane_rows, plane_cols;
};

int64_t plane_rows(const StemShape& s) { return (s.h_conv - 1) * s.stride + s.kernel; }
int64_t plane_cols(const StemShape& s) {
  return round_up(s.w_conv, kPositions) + (s.kernel - 1) / s.stride;
}
int64_t weights_size(const StemShape& s) {
  return round_up(s.c_out, kOcBlock) * (s.c * s.kernel * s.kernel + 1);
}
int64_t planes_size(const StemShape& s) {
  return s.c * s.stride * plane_rows(s) * plane_cols(s);
}

Workspace carve(float* base, const StemShape& s) {
  Workspace ws;
  ws.plane_rows = plane_rows(s);
  ws.plane_cols = plane_cols(s);
  ws.w = base;
  ws.bias = ws.w + round_up(s.c_out, kOcBlock) * s.c * s.kernel * s.kernel;
  ws.planes = base + weights_size(s);
  ws.conv = ws.planes + planes_size(s);
  return ws;
}

void fold_weights(const float* w, const BatchNormParams& bn, const StemShape& s,
                  const Workspace& ws) {
  const int64_t taps = s.c * s.kernel * s.kernel;
  const int64_t oc_pad = round_up(s.c_out, kOcBlock);
  std::fill(ws.w, ws.w + oc_pad * taps, 0.f);
  std::fill(ws.bias, ws.bias + oc_pad, 0.f);
  for (int64_t oc = 0; oc < s.c_out; ++oc) {
    const float scale = bn.gamma[oc] / std::sqrt(bn.var[oc] + bn.epsilon);
    ws.bias[oc] = bn.beta[oc] - bn.mean[oc] * scale;
    float* block = ws.w + oc / kOcBlock * taps * kOcBlock;
    for (int64_t t = 0; t < taps; ++t) block[t * kOcBlock + oc % kOcBlock] = w[oc * taps + t] * scale;
  }
}

// One image: planes, then conv + BN + ReLU, then max pool; called inside a parallel region.
void run_image(const float* x, float* out, const StemShape& s, const Workspace& ws) {
  const int64_t pad = s.kernel / 2;
  const int64_t plane_size = ws.plane_rows * ws.plane_cols;
#pragma omp for collapse(2) schedule(static)
  for (int64_t plane = 0; plane < s.c * s.stride; ++plane) {
    for (int64_t r = 0; r < ws.plane_rows; ++r) {
      const int64_t ci = plane / s.stride, phase = plane % s.stride, y = r - pad;
      float* dst = ws.planes + plane * plane_size + r * ws.plane_cols;
      for (int64_t j = 0; j < ws.plane_cols; ++j) {
        const int64_t col = j * s.stride + phase - pad;
        dst[j] = y >= 0 && y < s.h && col >= 0 && col < s.w ? x[(ci * s.h + y) * s.w + col] : 0.f;
      }
    }
  }

  const int64_t oc_blocks = round_up(s.c_out, kOcBlock) / kOcBlock;
  const int64_t taps = s.c * s.kernel * s.kernel;
  const int64_t conv_plane = s.h_conv * s.w_conv;
  int64_t kx_offset[kMaxStemKernel];  // tap column kx: its phase plane and column shift
  for (int64_t kx = 0; kx < s.kernel; ++kx) kx_offset[kx] = kx % s.stride * plane_size + kx / s.stride;
#pragma omp for collapse(2) schedule(static)
  for (int64_t ob = 0; ob < oc_blocks; ++ob) {
    for (int64_t oy = 0; oy < s.h_conv; ++oy) {
      const float* w_block = ws.w + ob * taps * kOcBlock;
      for (int64_t ox0 = 0; ox0 < s.w_conv; ox0 += kPositions) {
        Vec acc[kOcBlock] = {};
        const float* w_tap = w_block;
        for (int64_t ci = 0; ci < s.c; ++ci) {
          for (int64_t ky = 0; ky < s.kernel; ++ky) {
            const float* row = ws.planes + ci * s.stride * plane_size +
                               (oy * s.stride + ky) * ws.plane_cols + ox0;
            for (int64_t kx = 0; kx < s.kernel; ++kx, w_tap += kOcBlock) {
              const Vec in = loadu(row + kx_offset[kx]);
#pragma GCC unroll 8
              for (int64_t o = 0; o < kOcBlock; ++o) acc[o] += w_tap[o] * in;
            }
          }
        }
        const int64_t valid = std::min(kPositions, s.w_conv - ox0);
        for (int64_t o = 0; o < kOcBlock && ob * kOcBlock + o < s.c_out; ++o) {
          const int64_t oc = ob * kOcBlock + o;
          float* dst = ws.conv + oc * conv_plane + oy * s.w_conv + ox0;
          for (int64_t v = 0; v < valid; ++v) dst[v] = std::max(acc[o][v] + ws.bias[oc], 0.f);
        }
      }
    }
  }

  // 3x3 / stride 2 / padding 1 max pool. Its inputs are >= 0 (after ReLU) and every window
  // holds at least one of them, so starting from 0 equals Paddle's -inf padding.
#pragma omp for collapse(2) schedule(static)
  for (int64_t oc = 0; oc < s.c_out; ++oc) {
    for (int64_t py = 0; py < s.h_out; ++py) {
      const float* src = ws.conv + oc * conv_plane;
      float* dst = out + (oc * s.h_out + py) * s.w_out;
      const int64_t y0 = std::max<int64_t>(2 * py - 1, 0), y1 = std::min(2 * py + 2, s.h_conv);
      for (int64_t px = 0; px < s.w_out; ++px) {
        const int64_t x0 = std::max<int64_t>(2 * px - 1, 0), x1 = std::min(2 * px + 2, s.w_conv);
        float m = 0.f;
        for (int64_t y = y0; y < y1; ++y)
          for (int64_t xx = x0; xx < x1; ++xx) m = std::max(m, src[y * s.w_conv + xx]);
        dst[px] = m;
      }
    }
  }
}

}  // namespace

StemShape stem_shape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t c_out, int64_t kernel,
                     int64_t stride) {
  StemShape s{n, c, h, w, c_out, kernel, stride};
  const int64_t pad = kernel / 2;
  s.h_conv = (h + 2 * pad - kernel) / stride + 1;
  s.w_conv = (w + 2 * pad - kernel) / stride + 1;
  s.h_out = (s.h_conv - 1) / 2 + 1;
  s.w_out = (s.w_conv - 1) / 2 + 1;
  return s;
}

int64_t stem_workspace_size(const StemShape& s) {
  return weights_size(s) + planes_size(s) + s.c_out * s.h_conv * s.w_conv;
}

void stem_conv_bn_relu_pool_cpu(const float* x, const float* w, const BatchNormParams& bn,
                                float* out, float* workspace, const StemShape& s) {
  const Workspace ws = carve(workspace, s);
  fold_weights(w, bn, s, ws);
#pragma omp parallel num_threads(cpu_threads())
  for (int64_t i = 0; i < s.n; ++i) {
    run_image(x + i * s.c * s.h * s.w, out + i * s.c_out * s.h_out * s.w_out, s, ws);
  }
}

}  // namespace dpn_fast
