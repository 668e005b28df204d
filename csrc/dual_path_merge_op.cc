// Paddle binding of the dual-path merge.
#include "binding.h"
#include "common.h"
#include "dual_path_merge.h"

namespace {

constexpr const char* kOp = "dpn_fast_dual_path_merge";

std::vector<paddle::Tensor> DualPathMergeForward(const paddle::Tensor& resid_in,
                                                 const paddle::Tensor& dense_in,
                                                 const paddle::Tensor& y_in) {
  using dpn_fast::check_rank;
  const auto resid = dpn_fast::to_plain_layout(resid_in);
  const auto dense = dpn_fast::to_plain_layout(dense_in);
  const auto y = dpn_fast::to_plain_layout(y_in);
  check_rank(resid, 4, kOp, "resid");
  check_rank(dense, 4, kOp, "dense");
  check_rank(y, 4, kOp, "y");
  const auto& rs = resid.shape();
  const auto& ds = dense.shape();
  const auto& ys = y.shape();
  PD_CHECK(ys[1] > rs[1], kOp, ": y has ", ys[1], " channels, must exceed resid's ", rs[1]);
  for (int i : {0, 2, 3}) {
    PD_CHECK(rs[i] == ds[i] && rs[i] == ys[i], kOp, ": batch/spatial sizes differ: resid ",
             dpn_fast::shape_str(rs), ", dense ", dpn_fast::shape_str(ds), ", y ",
             dpn_fast::shape_str(ys));
  }
  PD_CHECK(resid.dtype() == paddle::DataType::FLOAT32, kOp, ": supports float32 only");
  dpn_fast::MergeShape s{rs[0], rs[1], ds[1], ys[1] - rs[1], rs[2] * rs[3]};
  auto resid_out = paddle::empty(rs, resid.dtype(), resid.place());
  auto dense_out = paddle::empty({s.n, s.d + s.inc, rs[2], rs[3]}, resid.dtype(), resid.place());
#ifdef DPN_FAST_WITH_CUDA
  if (resid.is_gpu()) {
    int status = dpn_fast_dual_path_merge_forward_cuda(
        resid.data<float>(), dense.data<float>(), y.data<float>(), resid_out.data<float>(),
        dense_out.data<float>(), s.n, s.r, s.d, s.inc, s.hw, dpn_fast::kFloat32, resid.stream());
    PD_CHECK(status == dpn_fast::kOk, kOp, ": CUDA launch failed (status ", status, ")");
    return {resid_out, dense_out};
  }
#endif
  PD_CHECK(resid.is_cpu(), kOp, ": tensors on ", resid.place().DebugString(),
           " are not supported by this build");
  dpn_fast::dual_path_merge_forward_cpu(resid.data<float>(), dense.data<float>(), y.data<float>(),
                                        resid_out.data<float>(), dense_out.data<float>(), s);
  return {resid_out, dense_out};
}

}  // namespace

std::vector<std::vector<int64_t>> DualPathMergeInferShape(const std::vector<int64_t>& resid,
                                                          const std::vector<int64_t>& dense,
                                                          const std::vector<int64_t>& y) {
  return {resid, {dense[0], dense[1] + y[1] - resid[1], dense[2], dense[3]}};
}

std::vector<paddle::DataType> DualPathMergeInferDtype(paddle::DataType resid, paddle::DataType,
                                                     paddle::DataType) {
  return {resid, resid};
}

PD_BUILD_OP(dpn_fast_dual_path_merge)
    .Inputs({"resid", "dense", "y"})
    .Outputs({"resid_out", "dense_out"})
    .SetKernelFn(PD_KERNEL(DualPathMergeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(DualPathMergeInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(DualPathMergeInferDtype));
