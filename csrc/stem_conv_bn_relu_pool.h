// The DPN stem for inference, framework-free CPU core:
//   out = maxpool3x3/s2/p1(relu(bn(conv(x, w))))
// with a K x K convolution of stride `stride` and padding K/2 over few input channels (3: an
// image), BN applied to the convolution's float32 sums (scale and shift folded per call). In bf16
// the image and the weights are rounded to bf16 (to nearest even) and the products summed in
// float32: pairs of taps on vdpbf16ps where the CPU has AVX512_BF16, else the float kernel on the
// rounded values, which sums the same products. Paddle runs it as three ops whose convolution
// writes and page-faults a fresh im2col buffer on every call (4.2 ms for DPN92's stem on 2
// threads, of which the GEMM is 0.9 ms); this core reads the image in place.
#pragma once
#include <cstdint>

#include "grouped_conv_bn_relu.h"  // BatchNormParams

namespace dpn_fast {

constexpr int64_t kMaxStemKernel = 11;

struct StemShape {
  int64_t n, c, h, w;  // input
  int64_t c_out, kernel, stride;  // kernel odd, at most kMaxStemKernel
  int64_t h_conv, w_conv;  // after the convolution
  int64_t h_out, w_out;    // after the 3x3/s2/p1 max pool
};

StemShape stem_shape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t c_out, int64_t kernel,
                     int64_t stride);

// Floats of the workspace stem_conv_bn_relu_pool_cpu needs.
int64_t stem_workspace_size(const StemShape& s);

// x [n, c, h, w], w [c_out, c, kernel, kernel], out [n, c_out, h_out, w_out] (float32 in either
// precision); `workspace` holds stem_workspace_size(s) floats.
void stem_conv_bn_relu_pool_cpu(const float* x, const float* w, const BatchNormParams& bn,
                                bool bf16, float* out, float* workspace, const StemShape& s);

}  // namespace dpn_fast
