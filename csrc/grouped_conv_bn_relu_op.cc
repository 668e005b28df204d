// Paddle binding of the grouped 3x3 conv + BatchNorm + ReLU.
//   dpn_fast_grouped_conv_bn_relu_infer  eval: BN applied per channel in the conv epilogue
//   dpn_fast_grouped_conv_bias_relu      eval with weights/bias folded by the caller (cached)
//   dpn_fast_bn_relu_grouped_conv_bn_relu_infer
//                                        eval with the input's BN + ReLU applied as x is loaded
//                                        (both BNs folded per call)
//   dpn_fast_grouped_conv_bn_relu_train  training: batch statistics, running statistics updated
//                                        in place; backward = fused BN+ReLU grad + direct conv
//                                        grads on CPU (Paddle's conv2d_grad on GPU)
#include <string>

#include "binding.h"
#include "common.h"
#include "grouped_conv_bn_relu.h"

#ifdef DPN_FAST_WITH_CUDA
namespace paddle {
namespace experimental {
// Paddle's own conv2d backward (exported by libphi_core; its header is not shipped).
void conv2d_grad(const Tensor& input, const Tensor& filter, const Tensor& out_grad,
                 const std::vector<int>& strides, const std::vector<int>& paddings,
                 const std::string& padding_algorithm, const std::vector<int>& dilations,
                 int groups, const std::string& data_format, Tensor* input_grad,
                 Tensor* filter_grad);
}  // namespace experimental
}  // namespace paddle
#endif

namespace {

constexpr const char* kOp = "dpn_fast_grouped_conv_bn_relu";

dpn_fast::GroupedConvShape check_conv(const paddle::Tensor& x, const paddle::Tensor& weight,
                                      int stride, int groups) {
  using dpn_fast::check_rank;
  using dpn_fast::shape_str;
  check_rank(x, 4, kOp, "x");
  check_rank(weight, 4, kOp, "weight");
  dpn_fast::check_plain_layout(x, kOp, "x");
  dpn_fast::check_plain_layout(weight, kOp, "weight");
  dpn_fast::check_same_dtype(x, weight, kOp, "x", "weight");
  dpn_fast::check_same_place(x, weight, kOp, "x", "weight");
  const auto& xs = x.shape();
  const auto& ws = weight.shape();
  PD_CHECK(stride == 1 || stride == 2, kOp, ": 'stride' must be 1 or 2, got ", stride);
  PD_CHECK(groups >= 1, kOp, ": 'groups' must be >= 1, got ", groups);
  PD_CHECK(xs[1] > 0, kOp, ": 'x' has no channels, shape ", shape_str(xs));
  PD_CHECK(xs[1] % groups == 0, kOp, ": input channels ", xs[1],
           " are not divisible by 'groups'=", groups);
  PD_CHECK(ws[2] == 3 && ws[3] == 3, kOp, ": kernel must be 3x3, 'weight' has shape ",
           shape_str(ws));
  PD_CHECK(ws[0] % groups == 0, kOp, ": output channels ", ws[0],
           " are not divisible by 'groups'=", groups);
  PD_CHECK(ws[1] == xs[1] / groups, kOp, ": 'weight' must have shape [C_out, ", xs[1] / groups,
           ", 3, 3] for ", xs[1], " input channels and groups=", groups, ", got ", shape_str(ws));
  PD_CHECK(xs[2] > 0 && xs[3] > 0, kOp, ": 'x' has an empty image, shape ", shape_str(xs));
  if (x.is_cpu()) {
    PD_CHECK(x.dtype() == paddle::DataType::FLOAT32, kOp,
             ": 'x' must be float32 on CPU (the CPU kernels support float32 only), got ",
             phi::DataTypeToString(x.dtype()));
  }
  return {xs[0], xs[1], xs[2], xs[3], ws[0], groups, stride,
          dpn_fast::conv3x3_out_size(xs[2], stride), dpn_fast::conv3x3_out_size(xs[3], stride)};
}

void require_cpu(const paddle::Tensor& x) {
  PD_CHECK(x.is_cpu(), kOp, ": tensors on ", x.place().DebugString(),
           " are not supported by this build");
}

#ifdef DPN_FAST_WITH_CUDA
dpn_fast::DType c_dtype(const paddle::Tensor& t) {
  switch (t.dtype()) {
    case paddle::DataType::FLOAT32: return dpn_fast::kFloat32;
    case paddle::DataType::FLOAT16: return dpn_fast::kFloat16;
    case paddle::DataType::BFLOAT16: return dpn_fast::kBFloat16;
    default:
      PD_THROW(kOp, ": GPU supports float32, float16 and bfloat16, got ",
               phi::DataTypeToString(t.dtype()));
  }
}

void check_cuda_status(int status) {
  PD_CHECK(status == dpn_fast::kOk, kOp, ": CUDA launch failed (status ", status,
           "; at most 42 input channels per group are supported)");
}
#endif

paddle::Tensor empty_out(const paddle::Tensor& x, const dpn_fast::GroupedConvShape& s) {
  return dpn_fast::empty_output({s.n, s.c_out, s.h_out, s.w_out}, x.dtype(), x.place());
}

// A batch of zero images (or zero output channels) has nothing to compute; the cores split work
// by batch x groups and must not see it (a division by zero).
bool nothing_to_compute(const dpn_fast::GroupedConvShape& s) { return s.n == 0 || s.c_out == 0; }

std::vector<paddle::Tensor> GroupedConvBiasReluForward(const paddle::Tensor& x_in,
                                                       const paddle::Tensor& weight,
                                                       const paddle::Tensor& bias, int stride,
                                                       int groups) {
  const paddle::Tensor x = dpn_fast::to_plain_layout(x_in);  // Paddle Inference + oneDNN
  const auto s = check_conv(x, weight, stride, groups);
  dpn_fast::check_channel_vector(bias, x, s.c_out, kOp, "bias");
  auto out = empty_out(x, s);
  if (nothing_to_compute(s)) return {out};
#ifdef DPN_FAST_WITH_CUDA
  if (x.is_gpu()) {
    check_cuda_status(dpn_fast_grouped_conv_bias_relu_cuda(
        x.data(), weight.data(), bias.data<float>(), out.data(), s.n, s.c, s.h, s.w, s.c_out,
        s.groups, s.stride, c_dtype(x), x.stream()));
    return {out};
  }
#endif
  require_cpu(x);
  dpn_fast::grouped_conv3x3_bias_relu_cpu(x.data<float>(), weight.data<float>(),
                                          bias.data<float>(), out.data<float>(), s);
  return {out};
}

std::vector<paddle::Tensor> GroupedConvBnReluInfer(const paddle::Tensor& x_in,
                                                   const paddle::Tensor& weight,
                                                   const paddle::Tensor& bn_weight,
                                                   const paddle::Tensor& bn_bias,
                                                   const paddle::Tensor& bn_mean,
                                                   const paddle::Tensor& bn_var, int stride,
                                                   int groups, float epsilon) {
  const paddle::Tensor x = dpn_fast::to_plain_layout(x_in);  // Paddle Inference + oneDNN
  const auto s = check_conv(x, weight, stride, groups);
  dpn_fast::check_bn(x, s.c_out, bn_weight, bn_bias, bn_mean, bn_var, kOp, "bn_");
  if (nothing_to_compute(s)) return {empty_out(x, s)};
#ifdef DPN_FAST_WITH_CUDA
  if (x.is_gpu()) {
    const int64_t taps_per_oc = s.c / s.groups * 9;
    auto w_folded = dpn_fast::empty_output({s.c_out * taps_per_oc}, paddle::DataType::FLOAT32, x.place());
    auto bias = dpn_fast::empty_output({s.c_out}, paddle::DataType::FLOAT32, x.place());
    auto out = empty_out(x, s);
    check_cuda_status(dpn_fast_grouped_conv_bn_relu_infer_cuda(
        x.data(), weight.data(), bn_weight.data<float>(), bn_bias.data<float>(),
        bn_mean.data<float>(), bn_var.data<float>(), epsilon, w_folded.data<float>(),
        bias.data<float>(), out.data(), s.n, s.c, s.h, s.w, s.c_out, s.groups, s.stride,
        c_dtype(x), x.stream()));
    return {out};
  }
#endif
  require_cpu(x);
  auto out = empty_out(x, s);
  dpn_fast::grouped_conv3x3_bn_relu_infer_cpu(
      x.data<float>(), weight.data<float>(), bn_weight.data<float>(), bn_bias.data<float>(),
      bn_mean.data<float>(), bn_var.data<float>(), epsilon, out.data<float>(), s);
  return {out};
}

std::vector<paddle::Tensor> BnReluGroupedConvBnReluInfer(
    const paddle::Tensor& x_in, const paddle::Tensor& weight, const paddle::Tensor& in_bn_weight,
    const paddle::Tensor& in_bn_bias, const paddle::Tensor& in_bn_mean,
    const paddle::Tensor& in_bn_var, const paddle::Tensor& bn_weight,
    const paddle::Tensor& bn_bias, const paddle::Tensor& bn_mean, const paddle::Tensor& bn_var,
    int stride, int groups, float in_epsilon, float epsilon) {
  const paddle::Tensor x = dpn_fast::to_plain_layout(x_in);  // Paddle Inference + oneDNN
  const auto s = check_conv(x, weight, stride, groups);
  dpn_fast::check_bn(x, s.c, in_bn_weight, in_bn_bias, in_bn_mean, in_bn_var, kOp, "in_bn_");
  dpn_fast::check_bn(x, s.c_out, bn_weight, bn_bias, bn_mean, bn_var, kOp, "bn_");
  auto out = empty_out(x, s);
  if (nothing_to_compute(s)) return {out};
#ifdef DPN_FAST_WITH_CUDA
  if (x.is_gpu()) {
    const int64_t taps_per_oc = s.c / s.groups * 9;
    auto in_scale_shift = dpn_fast::empty_output({2 * s.c}, paddle::DataType::FLOAT32, x.place());
    auto w_folded = dpn_fast::empty_output({s.c_out * taps_per_oc}, paddle::DataType::FLOAT32, x.place());
    auto bias = dpn_fast::empty_output({s.c_out}, paddle::DataType::FLOAT32, x.place());
    check_cuda_status(dpn_fast_bn_relu_grouped_conv_bn_relu_infer_cuda(
        x.data(), weight.data(), in_bn_weight.data<float>(), in_bn_bias.data<float>(),
        in_bn_mean.data<float>(), in_bn_var.data<float>(), in_epsilon, bn_weight.data<float>(),
        bn_bias.data<float>(), bn_mean.data<float>(), bn_var.data<float>(), epsilon,
        in_scale_shift.data<float>(), w_folded.data<float>(), bias.data<float>(), out.data(),
        s.n, s.c, s.h, s.w, s.c_out, s.groups, s.stride, c_dtype(x), x.stream()));
    return {out};
  }
#endif
  require_cpu(x);
  const dpn_fast::BatchNormParams in_bn{in_bn_weight.data<float>(), in_bn_bias.data<float>(),
                                        in_bn_mean.data<float>(), in_bn_var.data<float>(),
                                        in_epsilon};
  const dpn_fast::BatchNormParams bn{bn_weight.data<float>(), bn_bias.data<float>(),
                                     bn_mean.data<float>(), bn_var.data<float>(), epsilon};
  dpn_fast::bn_relu_grouped_conv3x3_bn_relu_infer_cpu(x.data<float>(), weight.data<float>(), in_bn,
                                                      bn, out.data<float>(), s);
  return {out};
}

// Outputs besides the in-place running statistics: out, conv_out (y, kept for backward),
// saved_mean, saved_invstd.
std::vector<paddle::Tensor> GroupedConvBnReluTrain(const paddle::Tensor& x,
                                                   const paddle::Tensor& weight,
                                                   const paddle::Tensor& bn_weight,
                                                   const paddle::Tensor& bn_bias,
                                                   paddle::Tensor& bn_mean, paddle::Tensor& bn_var,
                                                   int stride, int groups, float epsilon,
                                                   float momentum) {
  const auto s = check_conv(x, weight, stride, groups);
  dpn_fast::check_bn(x, s.c_out, bn_weight, bn_bias, bn_mean, bn_var, kOp, "bn_");
  PD_CHECK(!nothing_to_compute(s), kOp, ": training needs a non-empty batch and output channels "
           "(batch statistics of nothing are undefined), 'x' has shape ", dpn_fast::shape_str(x.shape()),
           ", 'weight' ", dpn_fast::shape_str(weight.shape()));
  auto out = empty_out(x, s);
  auto conv_out = empty_out(x, s);
  auto saved_mean = dpn_fast::empty_output({s.c_out}, paddle::DataType::FLOAT32, x.place());
  auto saved_invstd = dpn_fast::empty_output({s.c_out}, paddle::DataType::FLOAT32, x.place());
#ifdef DPN_FAST_WITH_CUDA
  if (x.is_gpu()) {
    check_cuda_status(dpn_fast_grouped_conv_bn_relu_train_cuda(
        x.data(), weight.data(), bn_weight.data<float>(), bn_bias.data<float>(),
        bn_mean.data<float>(), bn_var.data<float>(), epsilon, momentum, conv_out.data(),
        out.data(), saved_mean.data<float>(), saved_invstd.data<float>(), s.n, s.c, s.h, s.w,
        s.c_out, s.groups, s.stride, c_dtype(x), x.stream()));
    return {out, conv_out, saved_mean, saved_invstd};
  }
#endif
  require_cpu(x);
  dpn_fast::grouped_conv3x3_bn_relu_train_cpu(
      x.data<float>(), weight.data<float>(), bn_weight.data<float>(), bn_bias.data<float>(),
      bn_mean.data<float>(), bn_var.data<float>(), epsilon, momentum, conv_out.data<float>(),
      out.data<float>(), saved_mean.data<float>(), saved_invstd.data<float>(), s);
  return {out, conv_out, saved_mean, saved_invstd};
}

// dy (grad_conv_out), dgamma, dbeta of relu(bn(y)) with batch statistics.
void bn_relu_backward(const paddle::Tensor& y, const paddle::Tensor& out,
                      const paddle::Tensor& grad_out, const paddle::Tensor& bn_weight,
                      const paddle::Tensor& saved_mean, const paddle::Tensor& saved_invstd,
                      paddle::Tensor& grad_y, paddle::Tensor& grad_bn_weight,
                      paddle::Tensor& grad_bn_bias) {
  const auto& ys = y.shape();
#ifdef DPN_FAST_WITH_CUDA
  if (y.is_gpu()) {
    auto shift_slope = dpn_fast::empty_output({2 * ys[1]}, paddle::DataType::FLOAT32, y.place());
    check_cuda_status(dpn_fast_bn_relu_train_backward_cuda(
        y.data(), out.data(), grad_out.data(), bn_weight.data<float>(), saved_mean.data<float>(),
        saved_invstd.data<float>(), grad_y.data(), grad_bn_weight.data<float>(),
        grad_bn_bias.data<float>(), shift_slope.data<float>(), ys[0], ys[1], ys[2] * ys[3],
        c_dtype(y), y.stream()));
    return;
  }
#endif
  require_cpu(y);
  dpn_fast::bn_relu_train_backward_cpu(
      y.data<float>(), out.data<float>(), grad_out.data<float>(), bn_weight.data<float>(),
      saved_mean.data<float>(), saved_invstd.data<float>(), grad_y.data<float>(),
      grad_bn_weight.data<float>(), grad_bn_bias.data<float>(), ys[0], ys[1], ys[2] * ys[3]);
}

// Unnamed: epsilon and momentum, the forward op's attributes, which the grad kernel receives too.
std::vector<paddle::Tensor> GroupedConvBnReluTrainBackward(
    const paddle::Tensor& x, const paddle::Tensor& weight, const paddle::Tensor& bn_weight,
    const paddle::Tensor& out, const paddle::Tensor& conv_out, const paddle::Tensor& saved_mean,
    const paddle::Tensor& saved_invstd, const paddle::Tensor& grad_out, int stride, int groups,
    float, float) {
  const auto& ys = conv_out.shape();
  auto grad_conv_out = dpn_fast::empty_output(ys, conv_out.dtype(), conv_out.place());
  auto grad_bn_weight = dpn_fast::empty_output({ys[1]}, paddle::DataType::FLOAT32, x.place());
  auto grad_bn_bias = dpn_fast::empty_output({ys[1]}, paddle::DataType::FLOAT32, x.place());
  bn_relu_backward(conv_out, out, grad_out, bn_weight, saved_mean, saved_invstd, grad_conv_out,
                   grad_bn_weight, grad_bn_bias);
#ifdef DPN_FAST_WITH_CUDA
  if (x.is_gpu()) {
    paddle::Tensor grad_x, grad_weight;
    paddle::experimental::conv2d_grad(x, weight, grad_conv_out, {stride, stride}, {1, 1},
                                      "EXPLICIT", {1, 1}, groups, "NCHW", &grad_x, &grad_weight);
    return {grad_x, grad_weight, grad_bn_weight, grad_bn_bias};
  }
#endif
  const auto s = check_conv(x, weight, stride, groups);
  auto grad_x = dpn_fast::empty_output(x.shape(), x.dtype(), x.place());
  auto grad_weight = dpn_fast::empty_output(weight.shape(), weight.dtype(), weight.place());
  dpn_fast::grouped_conv3x3_backward_cpu(x.data<float>(), weight.data<float>(),
                                         grad_conv_out.data<float>(), grad_x.data<float>(),
                                         grad_weight.data<float>(), s);
  return {grad_x, grad_weight, grad_bn_weight, grad_bn_bias};
}

// Sizes unknown when exporting (-1: a dynamic batch or image size) stay unknown.
std::vector<int64_t> out_shape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                               int stride) {
  const auto size = [stride](int64_t in) {
    return in < 0 ? -1 : dpn_fast::conv3x3_out_size(in, stride);
  };
  return {x[0], w[0], size(x[2]), size(x[3])};
}

std::vector<std::vector<int64_t>> InferOutShape(const std::vector<int64_t>& x,
                                                const std::vector<int64_t>& w,
                                                const std::vector<int64_t>& /*bias*/, int stride,
                                                int /*groups*/) {
  return {out_shape(x, w, stride)};
}

std::vector<std::vector<int64_t>> InferInferShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    int stride, int, float) {
  return {out_shape(x, w, stride)};
}

std::vector<paddle::DataType> BiasReluInferDtype(paddle::DataType x, paddle::DataType,
                                                 paddle::DataType) {
  return {x};
}

std::vector<paddle::DataType> InferInferDtype(paddle::DataType x, paddle::DataType, paddle::DataType,
                                              paddle::DataType, paddle::DataType,
                                              paddle::DataType) {
  return {x};
}

std::vector<std::vector<int64_t>> BnReluInferInferShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, int stride, int, float, float) {
  return {out_shape(x, w, stride)};
}

std::vector<paddle::DataType> BnReluInferInferDtype(paddle::DataType x, paddle::DataType,
                                                    paddle::DataType, paddle::DataType,
                                                    paddle::DataType, paddle::DataType,
                                                    paddle::DataType, paddle::DataType,
                                                    paddle::DataType, paddle::DataType) {
  return {x};
}

std::vector<std::vector<int64_t>> TrainInferShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>& mean, const std::vector<int64_t>& var,
    int stride, int, float, float) {
  const auto out = out_shape(x, w, stride);
  return {out, out, {w[0]}, {w[0]}, mean, var};
}

std::vector<paddle::DataType> TrainInferDtype(paddle::DataType x, paddle::DataType,
                                              paddle::DataType, paddle::DataType,
                                              paddle::DataType mean, paddle::DataType var) {
  return {x, x, paddle::DataType::FLOAT32, paddle::DataType::FLOAT32, mean, var};
}

std::vector<std::vector<int64_t>> TrainBackwardInferShape(
    const std::vector<int64_t>& x, const std::vector<int64_t>& w,
    const std::vector<int64_t>& bn_weight, const std::vector<int64_t>&,
    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&,
    const std::vector<int64_t>&, int, int, float, float) {
  return {x, w, bn_weight, bn_weight};
}

std::vector<paddle::DataType> TrainBackwardInferDtype(paddle::DataType x, paddle::DataType w,
                                                      paddle::DataType bn_weight, paddle::DataType,
                                                      paddle::DataType, paddle::DataType,
                                                      paddle::DataType, paddle::DataType) {
  return {x, w, bn_weight, bn_weight};
}

}  // namespace

PD_BUILD_OP(dpn_fast_grouped_conv_bias_relu)
    .Inputs({"x", "weight", "bias"})
    .Outputs({"out"})
    .Attrs({"stride: int", "groups: int"})
    .SetKernelFn(PD_KERNEL(GroupedConvBiasReluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(InferOutShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BiasReluInferDtype));

PD_BUILD_OP(dpn_fast_grouped_conv_bn_relu_infer)
    .Inputs({"x", "weight", "bn_weight", "bn_bias", "bn_mean", "bn_var"})
    .Outputs({"out"})
    .Attrs({"stride: int", "groups: int", "epsilon: float"})
    .SetKernelFn(PD_KERNEL(GroupedConvBnReluInfer))
    .SetInferShapeFn(PD_INFER_SHAPE(InferInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(InferInferDtype));

PD_BUILD_OP(dpn_fast_bn_relu_grouped_conv_bn_relu_infer)
    .Inputs({"x", "weight", "in_bn_weight", "in_bn_bias", "in_bn_mean", "in_bn_var", "bn_weight",
             "bn_bias", "bn_mean", "bn_var"})
    .Outputs({"out"})
    .Attrs({"stride: int", "groups: int", "in_epsilon: float", "epsilon: float"})
    .SetKernelFn(PD_KERNEL(BnReluGroupedConvBnReluInfer))
    .SetInferShapeFn(PD_INFER_SHAPE(BnReluInferInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(BnReluInferInferDtype));

PD_BUILD_OP(dpn_fast_grouped_conv_bn_relu_train)
    .Inputs({"x", "weight", "bn_weight", "bn_bias", "bn_mean", "bn_var"})
    .Outputs({"out", "conv_out", "saved_mean", "saved_invstd", "bn_mean_out", "bn_var_out"})
    .Attrs({"stride: int", "groups: int", "epsilon: float", "momentum: float"})
    .SetInplaceMap({{"bn_mean", "bn_mean_out"}, {"bn_var", "bn_var_out"}})
    .SetKernelFn(PD_KERNEL(GroupedConvBnReluTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(TrainInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(TrainInferDtype));

PD_BUILD_GRAD_OP(dpn_fast_grouped_conv_bn_relu_train)
    .Inputs({"x", "weight", "bn_weight", "out", "conv_out", "saved_mean", "saved_invstd",
             paddle::Grad("out")})
    .Outputs({paddle::Grad("x"), paddle::Grad("weight"), paddle::Grad("bn_weight"),
              paddle::Grad("bn_bias")})
    .Attrs({"stride: int", "groups: int", "epsilon: float", "momentum: float"})
    .SetKernelFn(PD_KERNEL(GroupedConvBnReluTrainBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(TrainBackwardInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(TrainBackwardInferDtype));
