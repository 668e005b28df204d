// Paddle bindings of the dual-path merge (csrc/dual_path_merge.h):
//   dpn_fast_dual_path_merge          (resid, dense, y)            -> resid_out, dense_out
//   dpn_fast_dual_path_merge_bn_relu  (resid, dense, y, affine[])  -> resid_out, dense_out, act
//   dpn_fast_concat_bn_relu           (resid, dense, affine[])     -> act
//   dpn_fast_dual_path_merge_into     (resid, dense_buffer, y, affine[]) -> resid_out, act, with
//       the new dense channels written into dense_buffer in place (inference only, no backward)
// `affine` is either [scale, shift] (folded; [C] -> act [N,C,H,W], [A,C] -> act [A,N,C,H,W]) with
// attr epsilons empty, or A raw eval BatchNorms [weight, bias, mean, variance, ...] with attr
// epsilons of length A (A == 1 -> act [N,C,H,W], A == 2 -> [2,N,C,H,W]); A is 1 or 2.
// The per-channel parameters get no gradient here (training runs paddle's BatchNorm instead).
#include <string>
#include <vector>

#include "binding.h"
#include "common.h"
#include "dual_path_merge.h"

namespace {

using dpn_fast::shape_str;
using Shape = std::vector<int64_t>;
using Shapes = std::vector<Shape>;

constexpr const char* kMerge = "dpn_fast_dual_path_merge";
constexpr const char* kMergeBn = "dpn_fast_dual_path_merge_bn_relu";
constexpr const char* kConcatBn = "dpn_fast_concat_bn_relu";
constexpr const char* kMergeInto = "dpn_fast_dual_path_merge_into";

// Validated shapes of one call; y_shape empty in the head-only form.
dpn_fast::MergeShape merge_shape(const Shape& rs, const Shape& ds, const Shape* ys, const char* op) {
  PD_CHECK(rs.size() == 4 && ds.size() == 4 && (ys == nullptr || ys->size() == 4), op,
           ": resid, dense", ys ? ", y" : "", " must be 4-D NCHW, got ", shape_str(rs), ", ",
           shape_str(ds), ys ? ", " + shape_str(*ys) : "");
  // -1: a size unknown when exporting (dynamic batch or image size), checked when run.
  const auto same = [](int64_t a, int64_t b) { return a == b || a < 0 || b < 0; };
  for (int i : {0, 2, 3}) {
    PD_CHECK(same(rs[i], ds[i]) && (ys == nullptr || same(rs[i], (*ys)[i])), op,
             ": batch/spatial sizes differ: resid ", shape_str(rs), ", dense ", shape_str(ds),
             ys ? ", y " + shape_str(*ys) : "");
  }
  const int64_t inc = ys ? (*ys)[1] - rs[1] : 0;
  PD_CHECK(ys == nullptr || inc > 0, op, ": y has ", (*ys)[1],
           " channels; it must have resid's ", rs[1], " plus at least one new dense channel");
  return {rs[0], rs[1], ds[1], inc, rs[2] * rs[3]};
}

// Number of BN(+ReLU) outputs A and whether act carries a leading [A] axis.
struct AffineLayout {
  int num_acts;
  bool stacked;
};

AffineLayout affine_layout(const Shapes& params, const std::vector<float>& epsilons, int64_t c,
                           const char* op) {
  if (epsilons.empty()) {
    PD_CHECK(params.size() == 2, op, ": expected [scale, shift], got ", params.size(), " tensors");
    const Shape& scale = params[0];
    PD_CHECK(params[1] == scale, op, ": scale ", shape_str(scale), " and shift ",
             shape_str(params[1]), " must have the same shape");
    PD_CHECK((scale.size() == 1 && scale[0] == c) ||
                 (scale.size() == 2 && scale[1] == c && scale[0] >= 1 &&
                  scale[0] <= dpn_fast::kMaxActs),
             op, ": scale/shift must be [", c, "] or [A, ", c, "] with A <= ",
             dpn_fast::kMaxActs, " (C = resid + dense + new dense channels), got ",
             shape_str(scale));
    return {scale.size() == 1 ? 1 : static_cast<int>(scale[0]), scale.size() == 2};
  }
  const int num_acts = static_cast<int>(epsilons.size());
  PD_CHECK(num_acts <= dpn_fast::kMaxActs && params.size() == 4u * num_acts, op,
           ": expected 4 BatchNorm tensors per epsilon (at most ", dpn_fast::kMaxActs, "), got ",
           params.size(), " tensors and ", num_acts, " epsilons");
  for (const Shape& p : params) {
    PD_CHECK(p.size() == 1 && p[0] == c, op, ": BatchNorm parameters must be [", c, "], got ",
             shape_str(p));
  }
  return {num_acts, num_acts > 1};
}

Shape act_shape(const dpn_fast::MergeShape& s, const Shape& like, const AffineLayout& layout) {
  Shape shape{s.n, s.channels(), like[2], like[3]};
  if (layout.stacked) shape.insert(shape.begin(), layout.num_acts);
  return shape;
}

Shapes tensor_shapes(const std::vector<paddle::Tensor>& ts) {
  Shapes shapes;
  for (const auto& t : ts) shapes.push_back(t.shape());
  return shapes;
}

dpn_fast::DType element_type(const paddle::Tensor& t, const char* op) {
  switch (t.dtype()) {
    case paddle::DataType::FLOAT32: return dpn_fast::kFloat32;
    case paddle::DataType::FLOAT16: return dpn_fast::kFloat16;
    case paddle::DataType::BFLOAT16: return dpn_fast::kBFloat16;
    default:
      PD_THROW(op, ": supports float32, float16 and bfloat16, got ",
               phi::DataTypeToString(t.dtype()));
  }
}

// Checks every tensor of a call against the first (dtype, device, layout, contiguity); `names`
// name the activations in errors, the parameters are named affine[i].
void check_tensors(const std::vector<const paddle::Tensor*>& acts,
                   const std::vector<const char*>& names,
                   const std::vector<paddle::Tensor>& params, const char* op) {
  const paddle::Tensor& first = *acts[0];
  const dpn_fast::DType dtype = element_type(first, op);
  PD_CHECK(dtype == dpn_fast::kFloat32 || first.is_gpu(), op,
           ": float16/bfloat16 are supported on GPU only; cast CPU tensors to float32");
  for (size_t i = 0; i < acts.size(); ++i) {
    const paddle::Tensor& t = *acts[i];
    dpn_fast::check_plain_layout(t, op, names[i]);
    dpn_fast::check_same_dtype(first, t, op, names[0], names[i]);
    dpn_fast::check_same_place(first, t, op, names[0], names[i]);
    PD_CHECK(t.is_contiguous(), op, ": '", names[i], "' must be contiguous");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const paddle::Tensor& p = params[i];
    const std::string name = "affine[" + std::to_string(i) + "] (scale/shift/BatchNorm)";
    PD_CHECK(p.dtype() == paddle::DataType::FLOAT32, op, ": '", name, "' must be float32, got ",
             phi::DataTypeToString(p.dtype()));
    dpn_fast::check_same_place(first, p, op, names[0], name.c_str());
    PD_CHECK(p.is_contiguous(), op, ": '", name, "' must be contiguous");
  }
}

dpn_fast::ChannelAffine channel_affine(const std::vector<paddle::Tensor>& params,
                                       const std::vector<float>& epsilons,
                                       const AffineLayout& layout, int64_t c) {
  dpn_fast::ChannelAffine affine;
  affine.num_acts = layout.num_acts;
  for (int a = 0; a < layout.num_acts; ++a) {
    if (epsilons.empty()) {
      affine.scale[a] = params[0].data<float>() + a * c;
      affine.shift[a] = params[1].data<float>() + a * c;
    } else {
      affine.scale[a] = params[4 * a].data<float>();
      affine.shift[a] = params[4 * a + 1].data<float>();
      affine.mean[a] = params[4 * a + 2].data<float>();
      affine.var[a] = params[4 * a + 3].data<float>();
      affine.eps[a] = epsilons[a];
    }
  }
  return affine;
}

// Data pointer of a possibly absent tensor (an optional input, or an unused output's gradient).
const void* maybe_data(const paddle::Tensor& t) { return t.initialized() ? t.data() : nullptr; }

std::vector<void*> act_planes(paddle::Tensor& act, int num_acts, int64_t plane_elements) {
  std::vector<void*> planes;
  if (num_acts == 0) return planes;
  const size_t bytes = phi::SizeOf(act.dtype()) * plane_elements;
  for (int a = 0; a < num_acts; ++a) planes.push_back(static_cast<char*>(act.data()) + a * bytes);
  return planes;
}

// The shared forward of the three ops; y == nullptr for the head-only form.
// dense_channels >= 0: `dense` is a stage-wide buffer whose first dense_channels channels are the
// old dense part; the new channels are written into it (it is then also dense_out, not returned).
// Inputs in oneDNN layout (Paddle Inference) are reordered to NCHW first, except the buffer,
// which is written in place (check_tensors refuses it clearly).
std::vector<paddle::Tensor> forward(const paddle::Tensor& resid_in, const paddle::Tensor& dense_in,
                                    const paddle::Tensor* y_in,
                                    const std::vector<paddle::Tensor>& params,
                                    const std::vector<float>& epsilons, const char* op,
                                    int64_t dense_channels = -1) {
  const paddle::Tensor resid = dpn_fast::to_plain_layout(resid_in);
  const paddle::Tensor dense = dense_channels >= 0 ? dense_in : dpn_fast::to_plain_layout(dense_in);
  const paddle::Tensor y_plain = y_in ? dpn_fast::to_plain_layout(*y_in) : paddle::Tensor();
  const paddle::Tensor* y = y_in ? &y_plain : nullptr;
  const Shape ys = y ? y->shape() : Shape{};
  dpn_fast::MergeShape s = merge_shape(resid.shape(), dense.shape(), y ? &ys : nullptr, op);
  const bool into_buffer = dense_channels >= 0;
  if (into_buffer) {
    s.dense_capacity = s.d;
    s.d = dense_channels;
    PD_CHECK(s.d + s.inc <= s.dense_capacity, op, ": the dense buffer has ", s.dense_capacity,
             " channels; ", s.d, " old + ", s.inc, " new do not fit");
  }
  std::vector<const paddle::Tensor*> acts{&resid, &dense};
  std::vector<const char*> names{"resid", into_buffer ? "dense_buffer" : "dense"};
  if (y) {
    acts.push_back(y);
    names.push_back("y");
  }
  check_tensors(acts, names, params, op);
  const AffineLayout layout = params.empty()
                                  ? AffineLayout{0, false}
                                  : affine_layout(tensor_shapes(params), epsilons, s.channels(), op);
  const dpn_fast::ChannelAffine affine = channel_affine(params, epsilons, layout, s.channels());
  const auto dtype = resid.dtype();
  const auto place = resid.place();
  std::vector<paddle::Tensor> outs;
  paddle::Tensor resid_out, dense_out, act;
  if (y) {
    resid_out = dpn_fast::empty_output(resid.shape(), dtype, place);
    outs.push_back(resid_out);
    if (into_buffer) {
      dense_out = dense;
    } else {
      dense_out = dpn_fast::empty_output({s.n, s.d + s.inc, ys[2], ys[3]}, dtype, place);
      outs.push_back(dense_out);
    }
  }
  if (layout.num_acts) {
    act = dpn_fast::empty_output(act_shape(s, resid.shape(), layout), dtype, place);
    outs.push_back(act);
  }
  std::vector<void*> planes = act_planes(act, layout.num_acts, s.n * s.channels() * s.hw);
  void* resid_out_data = y ? resid_out.data() : nullptr;
  void* dense_out_data = y ? const_cast<void*>(dense_out.data()) : nullptr;
#ifdef DPN_FAST_WITH_CUDA
  if (resid.is_gpu()) {
    const int status = dpn_fast_dual_path_merge_forward_cuda(
        resid.data(), dense.data(), y ? y->data() : nullptr, &affine, resid_out_data,
        dense_out_data, planes.data(), s.n, s.r, s.d, s.inc, s.hw, s.dense_capacity,
        element_type(resid, op), resid.stream());
    PD_CHECK(status == dpn_fast::kOk, op, ": CUDA launch failed (status ", status, ")");
    return outs;
  }
#endif
  PD_CHECK(resid.is_cpu(), op, ": tensors on ", place.DebugString(),
           " are not supported by this build");
  dpn_fast::dual_path_merge_forward_cpu(
      resid.data<float>(), dense.data<float>(), y ? y->data<float>() : nullptr, affine,
      static_cast<float*>(resid_out_data), static_cast<float*>(dense_out_data),
      reinterpret_cast<float* const*>(planes.data()), s);
  return outs;
}

// The shared backward. `like` (resid) gives device, dtype and shape of the residual part;
// x_resid/x_dense: the BN'd concat, read only with BN outputs (nullptr without).
std::vector<paddle::Tensor> backward(const paddle::Tensor& like, const paddle::Tensor* x_resid,
                                     const paddle::Tensor* x_dense, const Shape& dense_shape,
                                     const Shape* y_shape, const paddle::Tensor& g_resid_out,
                                     const paddle::Tensor& g_dense_out,
                                     const paddle::Tensor& g_act,
                                     const std::vector<paddle::Tensor>& params,
                                     const std::vector<float>& epsilons, const char* op) {
  const dpn_fast::MergeShape s = merge_shape(like.shape(), dense_shape, y_shape, op);
  const AffineLayout layout = params.empty()
                                  ? AffineLayout{0, false}
                                  : affine_layout(tensor_shapes(params), epsilons, s.channels(), op);
  const dpn_fast::ChannelAffine affine = channel_affine(params, epsilons, layout, s.channels());
  const auto dtype = like.dtype();
  const auto place = like.place();
  auto g_resid = dpn_fast::empty_output(like.shape(), dtype, place);
  auto g_dense = dpn_fast::empty_output(dense_shape, dtype, place);
  paddle::Tensor g_y;
  if (y_shape) g_y = dpn_fast::empty_output(*y_shape, dtype, place);
  std::vector<const void*> g_planes(layout.num_acts, nullptr);
  if (g_act.initialized()) {
    const size_t bytes = phi::SizeOf(dtype) * s.n * s.channels() * s.hw;
    for (int a = 0; a < layout.num_acts; ++a) {
      g_planes[a] = static_cast<const char*>(g_act.data()) + a * bytes;
    }
  }
  const void* x_resid_data = x_resid ? x_resid->data() : nullptr;
  const void* x_dense_data = x_dense ? x_dense->data() : nullptr;
  std::vector<paddle::Tensor> outs{g_resid, g_dense};
  if (y_shape) outs.push_back(g_y);
  void* g_y_data = y_shape ? g_y.data() : nullptr;
#ifdef DPN_FAST_WITH_CUDA
  if (like.is_gpu()) {
    const int status = dpn_fast_dual_path_merge_backward_cuda(
        x_resid_data, x_dense_data, maybe_data(g_resid_out), maybe_data(g_dense_out),
        g_planes.data(), &affine, g_resid.data(), g_dense.data(), g_y_data, s.n, s.r, s.d, s.inc,
        s.hw, element_type(like, op), like.stream());
    PD_CHECK(status == dpn_fast::kOk, op, ": CUDA launch failed (status ", status, ")");
    return outs;
  }
#endif
  dpn_fast::dual_path_merge_backward_cpu(
      static_cast<const float*>(x_resid_data), static_cast<const float*>(x_dense_data),
      static_cast<const float*>(maybe_data(g_resid_out)),
      static_cast<const float*>(maybe_data(g_dense_out)),
      reinterpret_cast<const float* const*>(g_planes.data()), affine, g_resid.data<float>(),
      g_dense.data<float>(), static_cast<float*>(g_y_data), s);
  return outs;
}

// ---- dpn_fast_dual_path_merge ----

std::vector<paddle::Tensor> MergeForward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                         const paddle::Tensor& y) {
  return forward(resid, dense, &y, {}, {}, kMerge);
}

std::vector<paddle::Tensor> MergeBackward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                          const paddle::Tensor& y,
                                          const paddle::Tensor& g_resid_out,
                                          const paddle::Tensor& g_dense_out) {
  const Shape ys = y.shape();
  return backward(resid, nullptr, nullptr, dense.shape(), &ys, g_resid_out, g_dense_out,
                  paddle::Tensor(), {}, {}, kMerge);
}

Shapes MergeInferShape(const Shape& rs, const Shape& ds, const Shape& ys) {
  const auto s = merge_shape(rs, ds, &ys, kMerge);
  return {rs, {s.n, s.d + s.inc, rs[2], rs[3]}};
}

std::vector<paddle::DataType> MergeInferDtype(paddle::DataType r, paddle::DataType, paddle::DataType) {
  return {r, r};
}

Shapes MergeGradInferShape(const Shape& rs, const Shape& ds, const Shape& ys, const Shape&,
                           const Shape&) {
  return {rs, ds, ys};
}

std::vector<paddle::DataType> MergeGradInferDtype(paddle::DataType r, paddle::DataType,
                                                  paddle::DataType, paddle::DataType,
                                                  paddle::DataType) {
  return {r, r, r};
}

// ---- dpn_fast_dual_path_merge_bn_relu ----

std::vector<paddle::Tensor> MergeBnForward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                           const paddle::Tensor& y,
                                           const std::vector<paddle::Tensor>& affine,
                                           const std::vector<float>& epsilons) {
  PD_CHECK(!affine.empty(), kMergeBn, ": needs scale/shift or BatchNorm parameters");
  return forward(resid, dense, &y, affine, epsilons, kMergeBn);
}

std::vector<paddle::Tensor> MergeBnBackward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                            const paddle::Tensor& y,
                                            const std::vector<paddle::Tensor>& affine,
                                            const paddle::Tensor& resid_out,
                                            const paddle::Tensor& dense_out,
                                            const paddle::Tensor& g_resid_out,
                                            const paddle::Tensor& g_dense_out,
                                            const paddle::Tensor& g_act,
                                            const std::vector<float>& epsilons) {
  const Shape ys = y.shape();
  return backward(resid, &resid_out, &dense_out, dense.shape(), &ys, g_resid_out, g_dense_out,
                  g_act, affine, epsilons, kMergeBn);
}

Shapes MergeBnInferShape(const Shape& rs, const Shape& ds, const Shape& ys, const Shapes& affine,
                         const std::vector<float>& epsilons) {
  const auto s = merge_shape(rs, ds, &ys, kMergeBn);
  return {rs, {s.n, s.d + s.inc, rs[2], rs[3]},
          act_shape(s, rs, affine_layout(affine, epsilons, s.channels(), kMergeBn))};
}

std::vector<paddle::DataType> MergeBnInferDtype(paddle::DataType r, paddle::DataType,
                                                paddle::DataType,
                                                const std::vector<paddle::DataType>&) {
  return {r, r, r};
}

Shapes MergeBnGradInferShape(const Shape& rs, const Shape& ds, const Shape& ys, const Shapes&,
                             const Shape&, const Shape&, const Shape&, const Shape&, const Shape&,
                             const std::vector<float>&) {
  return {rs, ds, ys};
}

std::vector<paddle::DataType> MergeBnGradInferDtype(paddle::DataType d, paddle::DataType,
                                                    paddle::DataType,
                                                    const std::vector<paddle::DataType>&,
                                                    paddle::DataType, paddle::DataType,
                                                    paddle::DataType, paddle::DataType,
                                                    paddle::DataType) {
  return {d, d, d};
}

// ---- dpn_fast_concat_bn_relu ----

std::vector<paddle::Tensor> ConcatBnForward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                            const std::vector<paddle::Tensor>& affine,
                                            const std::vector<float>& epsilons) {
  PD_CHECK(!affine.empty(), kConcatBn, ": needs scale/shift or BatchNorm parameters");
  return forward(resid, dense, nullptr, affine, epsilons, kConcatBn);
}

std::vector<paddle::Tensor> ConcatBnBackward(const paddle::Tensor& resid,
                                             const paddle::Tensor& dense,
                                             const std::vector<paddle::Tensor>& affine,
                                             const paddle::Tensor& g_act,
                                             const std::vector<float>& epsilons) {
  return backward(resid, &resid, &dense, dense.shape(), nullptr, paddle::Tensor(), paddle::Tensor(),
                  g_act, affine, epsilons, kConcatBn);
}

Shapes ConcatBnInferShape(const Shape& rs, const Shape& ds, const Shapes& affine,
                          const std::vector<float>& epsilons) {
  const auto s = merge_shape(rs, ds, nullptr, kConcatBn);
  return {act_shape(s, rs, affine_layout(affine, epsilons, s.channels(), kConcatBn))};
}

std::vector<paddle::DataType> ConcatBnInferDtype(paddle::DataType r, paddle::DataType,
                                                 const std::vector<paddle::DataType>&) {
  return {r};
}

Shapes ConcatBnGradInferShape(const Shape& rs, const Shape& ds, const Shapes&, const Shape&,
                              const std::vector<float>&) {
  return {rs, ds};
}

std::vector<paddle::DataType> ConcatBnGradInferDtype(paddle::DataType r, paddle::DataType,
                                                     const std::vector<paddle::DataType>&,
                                                     paddle::DataType) {
  return {r, r};
}

// ---- dpn_fast_dual_path_merge_into (inference; the dense buffer is updated in place) ----

std::vector<paddle::Tensor> MergeIntoForward(const paddle::Tensor& resid,
                                             paddle::Tensor& dense_buffer,
                                             const paddle::Tensor& y,
                                             const std::vector<paddle::Tensor>& affine,
                                             const std::vector<float>& epsilons,
                                             int64_t dense_channels) {
  PD_CHECK(!affine.empty(), kMergeInto, ": needs scale/shift or BatchNorm parameters");
  PD_CHECK(dense_channels >= 0, kMergeInto, ": 'dense_channels' must be >= 0, got ",
           dense_channels);
  return forward(resid, dense_buffer, &y, affine, epsilons, kMergeInto, dense_channels);
}

Shapes MergeIntoInferShape(const Shape& rs, const Shape& bs, const Shape& ys,
                           const Shapes& affine, const std::vector<float>& epsilons,
                           int64_t dense_channels) {
  auto s = merge_shape(rs, bs, &ys, kMergeInto);
  s.d = dense_channels;
  // Only the outputs that are not in place (resid_out, act), as the kernel returns them.
  return {rs, act_shape(s, rs, affine_layout(affine, epsilons, s.channels(), kMergeInto))};
}

std::vector<paddle::DataType> MergeIntoInferDtype(paddle::DataType r, paddle::DataType,
                                                  paddle::DataType,
                                                  const std::vector<paddle::DataType>&) {
  return {r, r};
}

}  // namespace

PD_BUILD_OP(dpn_fast_dual_path_merge)
    .Inputs({"resid", "dense", "y"})
    .Outputs({"resid_out", "dense_out"})
    .SetKernelFn(PD_KERNEL(MergeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MergeInferDtype));

PD_BUILD_GRAD_OP(dpn_fast_dual_path_merge)
    .Inputs({"resid", "dense", "y", paddle::Grad("resid_out"), paddle::Grad("dense_out")})
    .Outputs({paddle::Grad("resid"), paddle::Grad("dense"), paddle::Grad("y")})
    .SetKernelFn(PD_KERNEL(MergeBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeGradInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MergeGradInferDtype));

PD_BUILD_OP(dpn_fast_dual_path_merge_bn_relu)
    .Inputs({"resid", "dense", "y", paddle::Vec("affine")})
    .Outputs({"resid_out", "dense_out", "act"})
    .Attrs({"epsilons: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(MergeBnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeBnInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MergeBnInferDtype));

PD_BUILD_GRAD_OP(dpn_fast_dual_path_merge_bn_relu)
    .Inputs({"resid", "dense", "y", paddle::Vec("affine"), "resid_out", "dense_out",
             paddle::Grad("resid_out"), paddle::Grad("dense_out"), paddle::Grad("act")})
    .Outputs({paddle::Grad("resid"), paddle::Grad("dense"), paddle::Grad("y")})
    .Attrs({"epsilons: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(MergeBnBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeBnGradInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MergeBnGradInferDtype));

PD_BUILD_OP(dpn_fast_concat_bn_relu)
    .Inputs({"resid", "dense", paddle::Vec("affine")})
    .Outputs({"act"})
    .Attrs({"epsilons: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(ConcatBnForward))
    .SetInferShapeFn(PD_INFER_SHAPE(ConcatBnInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ConcatBnInferDtype));

PD_BUILD_GRAD_OP(dpn_fast_concat_bn_relu)
    .Inputs({"resid", "dense", paddle::Vec("affine"), paddle::Grad("act")})
    .Outputs({paddle::Grad("resid"), paddle::Grad("dense")})
    .Attrs({"epsilons: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(ConcatBnBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(ConcatBnGradInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(ConcatBnGradInferDtype));

PD_BUILD_OP(dpn_fast_dual_path_merge_into)
    .Inputs({"resid", "dense_buffer", "y", paddle::Vec("affine")})
    .Outputs({"resid_out", "dense_buffer_out", "act"})
    .Attrs({"epsilons: std::vector<float>", "dense_channels: int64_t"})
    .SetInplaceMap({{"dense_buffer", "dense_buffer_out"}})
    .SetKernelFn(PD_KERNEL(MergeIntoForward))
    .SetInferShapeFn(PD_INFER_SHAPE(MergeIntoInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(MergeIntoInferDtype));
