// Paddle binding of the DPN stem for inference (CPU):
//   dpn_fast_stem_conv_bn_relu_pool  out = maxpool3x3/s2/p1(relu(bn(conv(x, weight))))
// with padding kernel/2 and eval BN (running statistics); bf16: on the image and weights rounded
// to bf16 (stem_conv_bn_relu_pool.h), float32 in and out either way. There is no GPU core: on GPU, cuDNN
// serves the stem well and the model keeps Paddle's ops there.
#include "binding.h"
#include "stem_conv_bn_relu_pool.h"

namespace {

constexpr const char* kOp = "dpn_fast_stem_conv_bn_relu_pool";

using Shape = std::vector<int64_t>;

dpn_fast::StemShape check_stem(const Shape& xs, const Shape& ws, int stride) {
  using dpn_fast::shape_str;
  PD_CHECK(xs.size() == 4, kOp, ": 'x' must have rank 4 [N, C, H, W], got shape ", shape_str(xs));
  PD_CHECK(ws.size() == 4, kOp, ": 'weight' must have rank 4 [C_out, C, K, K], got shape ",
           shape_str(ws));
  PD_CHECK(ws[2] == ws[3] && ws[2] % 2 == 1 && ws[2] <= dpn_fast::kMaxStemKernel, kOp,
           ": the kernel must be square and odd, at most ", dpn_fast::kMaxStemKernel,
           ", 'weight' has shape ", shape_str(ws));
  PD_CHECK(ws[1] == xs[1], kOp, ": 'weight' has shape ", shape_str(ws), " for ", ws[1],
           " input channels, 'x' has shape ", shape_str(xs));
  PD_CHECK(stride >= 1 && stride <= ws[2], kOp, ": 'stride' must be in [1, ", ws[2], "], got ",
           stride);
  PD_CHECK(xs[2] != 0 && xs[3] != 0, kOp, ": 'x' has an empty image, shape ", shape_str(xs));
  return dpn_fast::stem_shape(xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], stride);
}

std::vector<paddle::Tensor> StemForward(const paddle::Tensor& x_in, const paddle::Tensor& weight,
                                        const paddle::Tensor& bn_weight,
                                        const paddle::Tensor& bn_bias,
                                        const paddle::Tensor& bn_mean,
                                        const paddle::Tensor& bn_var, int stride, float epsilon,
                                        bool bf16) {
  const paddle::Tensor x = dpn_fast::to_plain_layout(x_in);  // Paddle Inference + oneDNN
  PD_CHECK(x.is_cpu(), kOp, ": runs on CPU only, got tensors on ", x.place().DebugString());
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, kOp,
           ": 'x' must be float32 (the stem runs float32 only), got ",
           phi::DataTypeToString(x.dtype()));
  dpn_fast::check_plain_layout(weight, kOp, "weight");
  dpn_fast::check_same_dtype(x, weight, kOp, "x", "weight");
  dpn_fast::check_same_place(x, weight, kOp, "x", "weight");
  const auto s = check_stem(x.shape(), weight.shape(), stride);
  dpn_fast::check_bn(x, s.c_out, bn_weight, bn_bias, bn_mean, bn_var, kOp, "bn_");
  auto out = dpn_fast::empty_output({s.n, s.c_out, s.h_out, s.w_out}, x.dtype(), x.place());
  auto workspace = dpn_fast::empty_output({dpn_fast::stem_workspace_size(s)}, x.dtype(),
                                          x.place());
  const dpn_fast::BatchNormParams bn{bn_weight.data<float>(), bn_bias.data<float>(),
                                     bn_mean.data<float>(), bn_var.data<float>(), epsilon};
  dpn_fast::stem_conv_bn_relu_pool_cpu(x.data<float>(), weight.data<float>(), bn, bf16,
                                       out.data<float>(), workspace.data<float>(), s);
  return {out};
}

// Sizes unknown when exporting (-1: a dynamic batch or image size) stay unknown.
std::vector<Shape> StemInferShape(const Shape& xs, const Shape& ws, const Shape&, const Shape&,
                                  const Shape&, const Shape&, int stride, float, bool) {
  const auto s = check_stem(xs, ws, stride);
  return {{s.n, s.c_out, xs[2] < 0 ? -1 : s.h_out, xs[3] < 0 ? -1 : s.w_out}};
}

std::vector<paddle::DataType> StemInferDtype(paddle::DataType x, paddle::DataType,
                                             paddle::DataType, paddle::DataType,
                                             paddle::DataType, paddle::DataType) {
  return {x};
}

}  // namespace

PD_BUILD_OP(dpn_fast_stem_conv_bn_relu_pool)
    .Inputs({"x", "weight", "bn_weight", "bn_bias", "bn_mean", "bn_var"})
    .Outputs({"out"})
    .Attrs({"stride: int", "epsilon: float", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(StemForward))
    .SetInferShapeFn(PD_INFER_SHAPE(StemInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(StemInferDtype));
