// Grouped 3x3 convolution (padding 1, stride 1 or 2) fused with BatchNorm and ReLU,
// framework-free cores.
//   eval:      out = relu(conv(x, w) * scale + (beta - mean * scale)),  scale = gamma / sqrt(var + eps)
//   training:  y = conv(x, w) with per-channel sum / sum of squares of y computed in the epilogue,
//              then out = relu((y - mean) * gamma / sqrt(var + eps) + beta) in a second pass.
#pragma once
#include <cstdint>
#include <string>

#include "bf16.h"

namespace dpn_fast {

struct GroupedConvShape {
  int64_t n, c, h, w;  // input
  int64_t c_out, groups, stride;
  int64_t h_out, w_out;
};

inline int64_t conv3x3_out_size(int64_t in, int64_t stride) { return (in - 1) / stride + 1; }

// Eval forward with caller-folded weights: out = relu(conv(x, w_folded) + bias), one pass.
void grouped_conv3x3_bias_relu_cpu(const float* x, const float* w_folded, const float* bias,
                                   float* out, const GroupedConvShape& s);

// Eval forward folding BN per output channel in the epilogue, one pass:
// out = relu(conv(x, w) * scale + (beta - mean * scale)), scale = gamma / sqrt(var + eps).
void grouped_conv3x3_bn_relu_infer_cpu(const float* x, const float* w, const float* gamma,
                                       const float* beta, const float* mean, const float* var,
                                       float epsilon, float* out, const GroupedConvShape& s);

// Raw parameters of an eval BatchNorm: y = (x - mean) * gamma / sqrt(var + eps) + beta.
struct BatchNormParams {
  const float *gamma, *beta, *mean, *var;
  float epsilon;
};

// An eval BatchNorm per channel as y = x * scale + shift: scale = gamma / sqrt(var + eps),
// shift = beta - mean * scale.
void fold_batch_norm(const BatchNormParams& bn, int64_t channels, float* scale, float* shift);

// An eval BatchNorm already folded (fold_batch_norm): y = x * scale[c] + shift[c].
struct FoldedBatchNorm {
  const float* scale;
  const float* shift;
};

// Eval forward with the input's BatchNorm + ReLU applied while the input is loaded, one pass:
// out = relu(bn(conv(relu(in_bn(x)), w))). The zero padding stays 0 (it pads the activated input).
void bn_relu_grouped_conv3x3_bn_relu_infer_cpu(const float* x, const float* w,
                                               const BatchNormParams& in_bn,
                                               const BatchNormParams& bn, float* out,
                                               const GroupedConvShape& s);

// Eval forward, channels-last: x [n, h, w, c] (already activated), out [n, h_out, w_out, c_out],
// out = relu(bn(conv(x, w))), bn folded by the caller. Reads up to kNhwcInputSlack values past
// the end of x, which must be readable (their values do not matter).
constexpr int64_t kNhwcInputSlack = 32;
void grouped_conv3x3_bn_relu_nhwc_infer_cpu(const float* x, const float* w,
                                            const FoldedBatchNorm& bn, float* out,
                                            const GroupedConvShape& s);

// The same on weights laid out once (what the above does on every call): the channel blocks of
// this CPU's kernel variant (its ISA and vector width), each block's taps and shuffle indices. A
// blob's header names the variant and the convolution (c -> c_out channels in `groups`), so a blob
// made on another kind of CPU is refused (grouped_conv3x3_nhwc_packed_mismatch), never misread.
// bf16: for bf16 activations (below): the weights rounded to bf16 (to nearest even), and on CPUs
// with AVX512_BF16, where every group has whole pairs of channels, laid out for the kernel that
// multiplies pairs of bf16 channels (vdpbf16ps) and sums in float32.
int64_t grouped_conv3x3_nhwc_packed_bytes(int64_t c, int64_t c_out, int64_t groups, bool bf16);
// w: [c_out, c / groups, 3, 3]; blob: grouped_conv3x3_nhwc_packed_bytes bytes.
void grouped_conv3x3_nhwc_pack(const float* w, int64_t c, int64_t c_out, int64_t groups, bool bf16,
                               uint8_t* blob);
// "" if blob (at least kNhwcPackedHeaderBytes) holds this convolution's weight packed for this
// CPU's kernels and these activations (bf16 or float32), else what differs.
constexpr int64_t kNhwcPackedHeaderBytes = 128;
std::string grouped_conv3x3_nhwc_packed_mismatch(const uint8_t* blob, int64_t c, int64_t c_out,
                                                 int64_t groups, bool bf16);
void grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(const float* x, const uint8_t* blob,
                                                   const FoldedBatchNorm& bn, float* out,
                                                   const GroupedConvShape& s);
// bf16 activations: x read as bf16, the sums float32, out rounded to bf16 (to nearest even); blob
// packed with bf16. Reads up to kNhwcInputSlack floats' bytes (2 * kNhwcInputSlack bf16 values)
// past the end of x.
void grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(const Bf16* x, const uint8_t* blob,
                                                   const FoldedBatchNorm& bn, Bf16* out,
                                                   const GroupedConvShape& s);

// Training forward. Writes y = conv(x, w) and out = relu(bn(y)) with batch statistics; returns the
// batch mean and 1/sqrt(biased var + eps) in saved_mean / saved_invstd and updates the running
// statistics in place: running = momentum * running + (1 - momentum) * batch (biased variance,
// as paddle.nn.BatchNorm does).
void grouped_conv3x3_bn_relu_train_cpu(const float* x, const float* w, const float* gamma,
                                       const float* beta, float* running_mean, float* running_var,
                                       float epsilon, float momentum, float* y, float* out,
                                       float* saved_mean, float* saved_invstd,
                                       const GroupedConvShape& s);

// Gradients of y = conv(x, w) (no bias): dx and dw from dy.
void grouped_conv3x3_backward_cpu(const float* x, const float* w, const float* dy, float* dx,
                                  float* dw, const GroupedConvShape& s);

// Backward of relu(bn(y)) with batch statistics: dy from dout, and dgamma, dbeta.
void bn_relu_train_backward_cpu(const float* y, const float* out, const float* dout,
                                const float* gamma, const float* saved_mean,
                                const float* saved_invstd, float* dy, float* dgamma, float* dbeta,
                                int64_t n, int64_t c, int64_t hw);

}  // namespace dpn_fast

// CUDA launchers (csrc/grouped_conv_bn_relu.cu), C ABI so they can be called without Paddle.
// x/w/out/y/dout/dy have dtype `dtype` (dpn_fast::DType); BN vectors, folded weights/bias and
// saved statistics are fp32. Up to 42 input channels per group. `stream` is a cudaStream_t.
// Return a dpn_fast::Status.
extern "C" {
// Eval with caller-folded weights (dtype `dtype`) and fp32 bias.
int dpn_fast_grouped_conv_bias_relu_cuda(const void* x, const void* w, const float* bias,
                                         void* out, int64_t n, int64_t c, int64_t h, int64_t w_in,
                                         int64_t c_out, int64_t groups, int64_t stride, int dtype,
                                         void* stream);
// Eval folding BN on the device into the fp32 workspaces w_folded [c_out, c/groups, 3, 3] and
// bias [c_out].
int dpn_fast_grouped_conv_bn_relu_infer_cuda(const void* x, const void* w, const float* gamma,
                                             const float* beta, const float* mean,
                                             const float* var, float epsilon, float* w_folded,
                                             float* bias, void* out, int64_t n, int64_t c,
                                             int64_t h, int64_t w_in, int64_t c_out,
                                             int64_t groups, int64_t stride, int dtype,
                                             void* stream);
// Eval with the input's BatchNorm + ReLU applied as x is loaded: out = relu(bn(conv(relu(in_bn(x))))).
// Both BNs are folded on the device: into w_folded / bias as above and the fp32 workspace
// in_scale_shift [2, c] (scale, then shift per input channel).
int dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda(
    const void* x, const void* w, const float* in_gamma, const float* in_beta,
    const float* in_mean, const float* in_var, float in_epsilon, const float* gamma,
    const float* beta, const float* mean, const float* var, float epsilon, float* in_scale_shift,
    float* w_folded, float* bias, void* out, int64_t n, int64_t c, int64_t h, int64_t w_in,
    int64_t c_out, int64_t groups, int64_t stride, int dtype, void* stream);
// Training forward: y = conv(x, w); batch statistics; out = relu(bn(y)); running stats in place.
int dpn_fast_grouped_conv_bn_relu_train_cuda(const void* x, const void* w, const float* gamma,
                                             const float* beta, float* running_mean,
                                             float* running_var, float epsilon, float momentum,
                                             void* y, void* out, float* saved_mean,
                                             float* saved_invstd, int64_t n, int64_t c, int64_t h,
                                             int64_t w_in, int64_t c_out, int64_t groups,
                                             int64_t stride, int dtype, void* stream);
// Backward of relu(bn(y)) with batch statistics; shift_slope is an fp32 workspace [2, c] (the
// per-channel coefficients of dy, passed from the reduction to the elementwise pass).
int dpn_fast_bn_relu_train_backward_cuda(const void* y, const void* out, const void* dout,
                                         const float* gamma, const float* saved_mean,
                                         const float* saved_invstd, void* dy, float* dgamma,
                                         float* dbeta, float* shift_slope, int64_t n, int64_t c,
                                         int64_t hw, int dtype, void* stream);
}
