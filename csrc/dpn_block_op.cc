// Paddle bindings of the block, stage and head ops for inference (CPU, float32, eval BN; no
// backward: training runs the per-op path). Their stage buffers are channels-last (NHWC):
//   dpn_fast_dpn_block  a normal block, in place on the stage's (resid, dense buffer)
//   dpn_fast_dpn_stage  a whole stage: its first block projects the input (the stem's NCHW
//                       output, or the previous stage's resid and dense buffer) into a new resid
//                       and a new dense buffer of `capacity` channels, then its normal blocks run
//                       in place there (what the fused model runs)
//   dpn_fast_dpn_head   final BN + ReLU, global average pool and the classifier (its weight
//                       plain, or packed like a 1x1 GEMM's)
//   dpn_fast_fold_batch_norms  eval BNs folded into the others' scale_shift argument
//   dpn_fast_pack_1x1_weight  rows of a 1x1 weight (one GEMM's) laid out once for this CPU
//                       (oneDNN's packed format), for dpn_fast_dpn_stage with packed_weights:
//                       what dpn_fast.compile keeps instead of the plain weights; with bf16,
//                       rounded to bf16 for the stage op's bf16_stage (dpn_block.h)
//   dpn_fast_pack_grouped_conv_weight  a grouped 3x3 conv's weight laid out once for this CPU's
//                       channels-last kernel, likewise
// Their BNs come folded, as one float32 tensor scale_shift [2, channels]: row 0 the scales, row 1
// the shifts, BN after BN in the block's order: [projection's,] 1x1a's, the grouped conv's,
// 1x1c's (a stage: block by block). A caller that owns its weights folds them once; an exported
// model runs the fold op on its live parameters before each op.
#include <algorithm>
#include <cstring>

#include "binding.h"
#include "dpn_block.h"
#include "onednn_gemm.h"

namespace {

constexpr const char* kBlock = "dpn_fast_dpn_block";
constexpr const char* kStage = "dpn_fast_dpn_stage";
constexpr const char* kHead = "dpn_fast_dpn_head";
constexpr const char* kFold = "dpn_fast_fold_batch_norms";
constexpr const char* kPack = "dpn_fast_pack_1x1_weight";
constexpr const char* kPackConv = "dpn_fast_pack_grouped_conv_weight";

using Shape = std::vector<int64_t>;
using dpn_fast::shape_str;

// A stage's (or block's) workspace floats rounded up to a size class (eighths of a power of two).
// The host block cache reuses freed blocks of exactly the same size; stages and blocks, whose
// workspaces grow a little with each block's input channels, then share a few sizes instead of
// each keeping its own block in the cache.
int64_t workspace_size_class(int64_t floats) {
  if (floats < 16) return floats;
  const int64_t step = int64_t{1} << (63 - __builtin_clzll(floats) - 3);
  return (floats + step - 1) / step * step;
}

// A CPU tensor in plain layout.
void check_cpu_plain(const paddle::Tensor& t, const char* op, const char* name) {
  dpn_fast::check_plain_layout(t, op, name);
  PD_CHECK(t.is_cpu(), op, ": runs on CPU only, '", name, "' is on ", t.place().DebugString());
}

// A float32 CPU tensor in plain layout.
void check_operand(const paddle::Tensor& t, const char* op, const char* name) {
  check_cpu_plain(t, op, name);
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": supports float32 only, '", name,
           "' is ", phi::DataTypeToString(t.dtype()));
}

// Weight of a 1x1 convolution, [rows, in_channels, 1, 1].
void check_1x1(const paddle::Tensor& w, int64_t in_channels, const char* op, const char* name) {
  const Shape& s = w.shape();
  PD_CHECK(s.size() == 4 && s[1] == in_channels && s[2] == 1 && s[3] == 1 && s[0] > 0, op, ": '",
           name, "' must have shape [C_out, ", in_channels, ", 1, 1], got ", shape_str(s));
}

// The planes (n, h, w) shared by resid and dense, and the input's channel split.
struct Input {
  int64_t n, h, w, resid, dense, capacity;
};

// Channels-last (resid, dense) [N, H, W, C]; or, with resid absent and `stem` set, the stem's
// NCHW output as dense. Resid is float32; dense is `dense_dtype` (float32, or a bf16 stage's
// bfloat16).
Input check_input(const paddle::Tensor* resid, const paddle::Tensor& dense,
                  int64_t dense_channels, bool stem, const char* op,
                  paddle::DataType dense_dtype = paddle::DataType::FLOAT32) {
  const Shape& d = dense.shape();
  const char* layout = stem ? "[N, C, H, W] (the stem's output)" : "[N, H, W, C]";
  PD_CHECK(d.size() == 4, op, ": 'dense' must have rank 4 ", layout, ", got shape ", shape_str(d));
  const int64_t h = stem ? d[2] : d[1], w = stem ? d[3] : d[2], c = stem ? d[1] : d[3];
  PD_CHECK(h > 0 && w > 0, op, ": empty image, dense ", layout, " has shape ", shape_str(d));
  PD_CHECK(dense_channels > 0 && dense_channels <= c, op, ": dense_channels must be in [1, ", c,
           "] (channels of 'dense' ", layout, "), got ", dense_channels);
  Input in{d[0], h, w, 0, dense_channels, c};
  if (resid) {
    const Shape& r = resid->shape();
    PD_CHECK(r.size() == 4 && r[0] == d[0] && r[1] == h && r[2] == w && r[3] > 0, op,
             ": 'resid' must have shape [", d[0], ", ", h, ", ", w,
             ", R] like 'dense' (channels-last), got ", shape_str(r));
    check_operand(*resid, op, "resid");
    in.resid = r[3];
  }
  check_cpu_plain(dense, op, "dense");
  PD_CHECK(dense.dtype() == dense_dtype, op, ": 'dense' must be ",
           phi::DataTypeToString(dense_dtype),
           dense_dtype == paddle::DataType::BFLOAT16
               ? " (a bf16 stage reads the previous bf16 stage's dense buffer)"
               : (stem ? "" : " (only a bf16 stage reads a bfloat16 dense buffer)"),
           ", got ", phi::DataTypeToString(dense.dtype()));
  return in;
}

// Folded BNs of `columns` channels in all, [2, columns]; `order` says which BNs, for the error.
void check_scale_shift(const paddle::Tensor& scale_shift, int64_t columns, const char* op,
                       const std::string& order) {
  const Shape& s = scale_shift.shape();
  PD_CHECK(s.size() == 2 && s[0] == 2 && s[1] == columns, op,
           ": 'scale_shift' must have shape [2, ", columns, "] (rows: scales, shifts; columns: ",
           order, "), got ", shape_str(s));
  check_operand(scale_shift, op, "scale_shift");
}

// Hands out consecutive columns of a scale_shift tensor, BN by BN.
class FoldedColumns {
 public:
  explicit FoldedColumns(const paddle::Tensor& scale_shift)
      : scale_(scale_shift.data<float>()), shift_(scale_ + scale_shift.shape()[1]) {}

  dpn_fast::FoldedBatchNorm next(int64_t channels) {
    const dpn_fast::FoldedBatchNorm bn{scale_ + used_, shift_ + used_};
    used_ += channels;
    return bn;
  }

 private:
  const float* scale_;
  const float* shift_;
  int64_t used_ = 0;
};

// The grouped 3x3 conv's weight [r, r / groups, 3, 3] (r: the bottleneck's channels).
void check_grouped_conv(const paddle::Tensor& w_conv, int64_t r, int64_t groups, const char* op) {
  PD_CHECK(groups > 0 && r % groups == 0, op, ": groups must be > 0 and divide the bottleneck's ",
           r, " channels, got ", groups);
  const Shape& wc = w_conv.shape();
  PD_CHECK(wc.size() == 4 && wc[0] == r && wc[1] == r / groups && wc[2] == 3 && wc[3] == 3, op,
           ": 'w_conv' must have shape [", r, ", ", r / groups, ", 3, 3], got ", shape_str(wc));
  check_operand(w_conv, op, "w_conv");
}

// The bottleneck's weights (1x1a, grouped 3x3, 1x1c), shared by the block and stage ops; returns
// the bottleneck's channels.
int64_t check_bottleneck(const paddle::Tensor& w_a, const paddle::Tensor& w_conv,
                         const paddle::Tensor& w_c, int64_t in_channels, int64_t groups,
                         const char* op) {
  check_1x1(w_a, in_channels, op, "w_a");
  const int64_t r = w_a.shape()[0];
  check_grouped_conv(w_conv, r, groups, op);
  check_1x1(w_c, r, op, "w_c");
  check_operand(w_a, op, "w_a");
  check_operand(w_c, op, "w_c");
  return r;
}

// A block's shape and weights, checked against its operands (BNs: attach_bns).
struct BlockPlan {
  dpn_fast::DpnBlockShape shape;
  dpn_fast::DpnBlockWeights weights;
};

// Channels of a block's BNs, in scale_shift order.
int64_t bn_channels(const dpn_fast::DpnBlockShape& s) {
  return (s.projection ? 2 : 1) * s.in_channels() + 2 * s.bottleneck;
}

// Points the blocks' BNs at consecutive columns of scale_shift, after checking that it holds
// exactly theirs.
void attach_bns(std::vector<BlockPlan>& plans, const paddle::Tensor& scale_shift, const char* op,
                const std::string& order) {
  int64_t columns = 0;
  for (const BlockPlan& p : plans) columns += bn_channels(p.shape);
  check_scale_shift(scale_shift, columns, op, order);
  FoldedColumns folded(scale_shift);
  for (BlockPlan& p : plans) {
    const dpn_fast::DpnBlockShape& s = p.shape;
    if (s.projection) p.weights.bn_w = folded.next(s.in_channels());
    p.weights.bn_a = folded.next(s.in_channels());
    p.weights.bn_b = folded.next(s.bottleneck);
    p.weights.bn_c = folded.next(s.bottleneck);
  }
}

// Runs blocks as a stage does (dpn_stage_forward_cpu): the first from (resid_in, dense_in) into
// (resid_out, dense_out), the others in place there. `like` gives the workspace's place.
void run_blocks(const std::vector<BlockPlan>& plans, const float* resid_in, const void* dense_in,
                float* resid_out, void* dense_out, const paddle::Tensor& like) {
  std::vector<dpn_fast::DpnBlockShape> shapes;
  std::vector<dpn_fast::DpnBlockWeights> weights;
  for (const BlockPlan& p : plans) {
    shapes.push_back(p.shape);
    weights.push_back(p.weights);
  }
  const int64_t floats = dpn_fast::dpn_stage_workspace_floats(shapes.data(), shapes.size());
  auto workspace = dpn_fast::empty_output({workspace_size_class(floats)},
                                          paddle::DataType::FLOAT32, like.place());
  dpn_fast::dpn_stage_forward_cpu(shapes.data(), weights.data(), shapes.size(), resid_in,
                                  dense_in, resid_out, dense_out, workspace.data<float>());
}

// A normal block, in place on (resid, dense buffer). `op` names the caller in error messages.
BlockPlan plan_normal_block(const paddle::Tensor& resid, const paddle::Tensor& dense,
                            const paddle::Tensor& w_a, const paddle::Tensor& w_conv,
                            const paddle::Tensor& w_c, int64_t groups, int64_t dense_channels,
                            const char* op) {
  const Input in = check_input(&resid, dense, dense_channels, false, op);
  const int64_t bottleneck = check_bottleneck(w_a, w_conv, w_c, in.resid + in.dense, groups, op);
  const int64_t inc = w_c.shape()[0] - in.resid;
  PD_CHECK(inc > 0, op, ": 'w_c' has ", w_c.shape()[0], " rows: the ", in.resid,
           " residual channels and at least one dense channel expected");
  PD_CHECK(in.dense + inc <= in.capacity, op, ": the dense buffer has ", in.capacity,
           " channels; ", in.dense, " old + ", inc, " new do not fit");
  const dpn_fast::DpnBlockShape s{in.n,       in.h,   in.w, in.resid, in.dense, in.capacity,
                                  bottleneck, groups, 1,    in.resid, inc,      false,
                                  in.capacity};
  BlockPlan plan{s, {}};
  plan.weights.w_a = w_a.data<float>();
  plan.weights.w_conv = w_conv.data<float>();
  plan.weights.w_c_resid = w_c.data<float>();
  plan.weights.w_c_dense = w_c.data<float>() + s.resid * bottleneck;
  return plan;
}

// All outputs are its inputs, updated in place: nothing to return.
// scale_shift: [2, C_in + 2 R], the folded BNs of 1x1a (C_in), the grouped conv (R), 1x1c (R).
void BlockForward(paddle::Tensor& resid, paddle::Tensor& dense, const paddle::Tensor& w_a,
                  const paddle::Tensor& w_conv, const paddle::Tensor& w_c,
                  const paddle::Tensor& scale_shift, int64_t groups, int64_t dense_channels) {
  std::vector<BlockPlan> plans{
      plan_normal_block(resid, dense, w_a, w_conv, w_c, groups, dense_channels, kBlock)};
  attach_bns(plans, scale_shift, kBlock,
             "the BNs of 1x1a (C_in), the grouped conv (R, w_a's rows), 1x1c (R)");
  run_blocks(plans, resid.data<float>(), dense.data(), resid.data<float>(), dense.data(), dense);
}

dpn_fast::DpnBlockShape proj_shape(const paddle::optional<paddle::Tensor>& resid,
                                   const paddle::Tensor& dense, const paddle::Tensor& w_proj,
                                   const paddle::Tensor& w_a, const paddle::Tensor& w_conv,
                                   const paddle::Tensor& w_c, int64_t groups, int64_t stride,
                                   int64_t dense_channels, int64_t capacity, const char* op) {
  const Input in = check_input(resid ? resid.get_ptr() : nullptr, dense, dense_channels, !resid,
                               op);
  const int64_t in_channels = in.resid + in.dense;
  const int64_t bottleneck = check_bottleneck(w_a, w_conv, w_c, in_channels, groups, op);
  check_1x1(w_proj, in_channels, op, "w_proj");
  check_operand(w_proj, op, "w_proj");
  PD_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  // w_proj: resid + 2 inc rows; w_c: resid + inc rows.
  const int64_t inc = w_proj.shape()[0] - w_c.shape()[0];
  const int64_t resid_out = w_c.shape()[0] - inc;
  PD_CHECK(inc > 0 && resid_out > 0, op, ": 'w_proj' (", w_proj.shape()[0],
           " rows = resid + 2 inc) and 'w_c' (", w_c.shape()[0],
           " rows = resid + inc) imply resid ", resid_out, " and inc ", inc,
           "; both must be positive");
  PD_CHECK(capacity >= 3 * inc, op, ": capacity must hold the projection's ", 2 * inc,
           " dense channels and this block's ", inc, ", got ", capacity);
  return {in.n,       in.h,   in.w,   in.resid,  in.dense, in.capacity,
          bottleneck, groups, stride, resid_out, inc,      true,
          capacity};
}

// A stage's first block: projects (resid, dense) into a new resid and a new dense buffer of
// `capacity` channels. `op` names the caller in error messages.
BlockPlan plan_projection_block(const paddle::optional<paddle::Tensor>& resid,
                                const paddle::Tensor& dense, const paddle::Tensor& w_proj,
                                const paddle::Tensor& w_a, const paddle::Tensor& w_conv,
                                const paddle::Tensor& w_c, int64_t groups, int64_t stride,
                                int64_t dense_channels, int64_t capacity, const char* op) {
  BlockPlan plan{proj_shape(resid, dense, w_proj, w_a, w_conv, w_c, groups, stride,
                            dense_channels, capacity, op),
                 {}};
  const dpn_fast::DpnBlockShape& s = plan.shape;
  plan.weights.w_proj_resid = w_proj.data<float>();
  plan.weights.w_proj_dense = w_proj.data<float>() + s.resid * s.in_channels();
  plan.weights.w_a = w_a.data<float>();
  plan.weights.w_conv = w_conv.data<float>();
  plan.weights.w_c_resid = w_c.data<float>();
  plan.weights.w_c_dense = w_c.data<float>() + s.resid * s.bottleneck;
  return plan;
}

// The dense buffer's dtype in a stage: bfloat16 in a bf16 stage, else float32.
paddle::DataType dense_dtype(bool bf16_stage) {
  return bf16_stage ? paddle::DataType::BFLOAT16 : paddle::DataType::FLOAT32;
}

// The projection's new (resid, dense buffer), channels-last, uninitialised.
std::vector<paddle::Tensor> projection_outputs(const dpn_fast::DpnBlockShape& s, bool bf16_stage,
                                               const paddle::Tensor& like) {
  return {dpn_fast::empty_output({s.n, s.h_out(), s.w_out(), s.resid}, paddle::DataType::FLOAT32,
                                 like.place()),
          dpn_fast::empty_output({s.n, s.h_out(), s.w_out(), s.capacity}, dense_dtype(bf16_stage),
                                 like.place())};
}

// The uint8 tensor holding the packed blob of a [rows, k] weight (packed_1x1).
Shape packed_1x1_shape(int64_t rows, int64_t k, bool bf16) {
  return {rows, (dpn_fast::packed_weight_bytes(rows, k, bf16) + rows - 1) / rows};
}

const char* packed_type_name(bool bf16) { return bf16 ? "bf16" : "float32"; }

// A packed weight's tensor: uint8 of the `expected` shape, as `pack_op` makes it.
void check_blob_shape(const paddle::Tensor& blob, const Shape& expected, const char* op,
                      const std::string& name, const char* pack_op) {
  PD_CHECK(blob.dtype() == paddle::DataType::UINT8 && blob.shape() == expected, op,
           ": packed weight '", name, "' must be a uint8 ", shape_str(expected), " tensor (",
           pack_op, "), got ", phi::DataTypeToString(blob.dtype()), " ", shape_str(blob.shape()));
}

// A packed 1x1 weight: pack_weight's blob of a GEMM's [rows, k] weight as a uint8 tensor [rows,
// bytes per row] (the blob padded to whole rows, so its shape says the GEMM's output channels).
// Refused unless it was packed for [rows, k] in the layout this CPU's oneDNN uses, as bf16 values
// for bf16 GEMMs and as floats otherwise.
const void* packed_1x1(const paddle::Tensor& blob, int64_t rows, int64_t k, bool bf16,
                       const char* op, const std::string& name) {
  check_cpu_plain(blob, op, name.c_str());
  const bool is_blob = blob.dtype() == paddle::DataType::UINT8 && blob.shape().size() == 2 &&
                       blob.numel() >= dpn_fast::kPackedHeaderBytes;
  PD_CHECK(!is_blob || dpn_fast::packed_weight_is_bf16(blob.data<uint8_t>()) == bf16, op,
           ": packed weight '", name, "' holds ",
           packed_type_name(dpn_fast::packed_weight_is_bf16(blob.data<uint8_t>())),
           " values; bf16_stage=", bf16 ? "true" : "false", " runs on weights packed as ",
           packed_type_name(bf16), " (dpn_fast_pack_1x1_weight with bf16=",
           bf16 ? "true" : "false", ")");
  check_blob_shape(blob, packed_1x1_shape(rows, k, bf16), op, name, kPack);
  const std::string mismatch =
      dpn_fast::packed_weight_mismatch(blob.data<uint8_t>(), rows, k, bf16);
  PD_CHECK(mismatch.empty(), op, ": packed weight '", name, "' does not fit this CPU: ", mismatch,
           ". Packed weights only run where oneDNN picks their layout: compile the model on this "
           "machine (dpn_fast.compile) and export it from there");
  return dpn_fast::packed_weight_data(blob.data<uint8_t>());
}

// Output channels of a packed weight (packed_1x1, packed_grouped_conv), for the shapes before it
// is checked.
int64_t packed_rows(const paddle::Tensor& blob, const char* op, const std::string& name) {
  PD_CHECK(blob.shape().size() == 2 && blob.shape()[0] > 0, op, ": packed weight '", name,
           "' must have shape [rows, bytes per row], got ", shape_str(blob.shape()));
  return blob.shape()[0];
}

// The uint8 tensor holding the packed blob of an r -> r channel grouped conv's weight (bf16: for
// bf16 activations).
Shape packed_grouped_conv_shape(int64_t r, int64_t groups, bool bf16) {
  return {r, (dpn_fast::grouped_conv3x3_nhwc_packed_bytes(r, r, groups, bf16) + r - 1) / r};
}

// A packed grouped conv weight: grouped_conv3x3_nhwc_pack's blob of an r -> r channel conv in
// `groups` as a uint8 tensor [r, bytes per row]. Refused unless it was packed for that conv, this
// CPU's kernel variant and these activations (bf16 or float32).
const void* packed_grouped_conv(const paddle::Tensor& blob, int64_t r, int64_t groups, bool bf16,
                                const char* op) {
  PD_CHECK(groups > 0 && r % groups == 0, op, ": groups must be > 0 and divide the bottleneck's ",
           r, " channels, got ", groups);
  check_cpu_plain(blob, op, "w_conv");
  // The header first: it says what a blob of another size was packed for.
  if (blob.dtype() == paddle::DataType::UINT8 && blob.numel() >= dpn_fast::kNhwcPackedHeaderBytes) {
    const std::string mismatch =
        dpn_fast::grouped_conv3x3_nhwc_packed_mismatch(blob.data<uint8_t>(), r, r, groups, bf16);
    PD_CHECK(mismatch.empty(), op, ": packed weight 'w_conv' does not fit this CPU: ", mismatch,
             ". Compile the model on this machine (dpn_fast.compile) and export it from there");
  }
  check_blob_shape(blob, packed_grouped_conv_shape(r, groups, bf16), op, "w_conv", kPackConv);
  return blob.data<uint8_t>();
}

// A stage's blocks on packed weights: the first block's w_proj_resid, w_proj_dense, w_a, w_conv,
// w_c_resid, w_c_dense, then w_a, w_conv, w_c_resid, w_c_dense per further block (the GEMMs' and
// the grouped convs' blobs).
std::vector<BlockPlan> plan_packed_stage(const paddle::optional<paddle::Tensor>& resid,
                                         const paddle::Tensor& dense,
                                         const std::vector<paddle::Tensor>& weights,
                                         int64_t groups, int64_t stride, int64_t dense_channels,
                                         int64_t capacity, bool bf16_stage) {
  PD_CHECK(weights.size() >= 6 && (weights.size() - 6) % 4 == 0, kStage,
           ": packed 'weights' must hold 6 tensors for the stage's first block and 4 for each "
           "further block, got ", weights.size());
  PD_CHECK(stride == 1 || stride == 2, kStage, ": stride must be 1 or 2, got ", stride);
  const Input in = check_input(resid ? resid.get_ptr() : nullptr, dense, dense_channels, !resid,
                               kStage, dense_dtype(bf16_stage && resid));
  const int64_t bottleneck = packed_rows(weights[3], kStage, "w_conv");
  const int64_t r = packed_rows(weights[4], kStage, "w_c_resid");
  std::vector<BlockPlan> plans;
  int64_t in_resid = in.resid, in_dense = in.dense, in_capacity = in.capacity, h = in.h, w = in.w;
  for (size_t first = 0; first < weights.size(); first += plans.size() == 1 ? 6 : 4) {
    const bool projection = plans.empty();
    const std::string where = std::string(kStage) + " (block " + std::to_string(plans.size()) + ")";
    const char* op = where.c_str();
    const size_t i = projection ? first + 2 : first;  // w_a
    const int64_t inc = packed_rows(weights[i + 3], op, "w_c_dense");
    const int64_t dense_before = projection ? 2 * inc : in_dense;
    PD_CHECK(dense_before + inc <= capacity, op, ": the dense buffer has ", capacity,
             " channels; ", dense_before, " + ", inc, " new do not fit");
    const dpn_fast::DpnBlockShape s{in.n,   h,      w,  in_resid, in_dense,   in_capacity,
                                    bottleneck, groups, projection ? stride : 1, r, inc,
                                    projection, capacity};
    const int64_t cin = s.in_channels();
    BlockPlan plan{s, {}};
    plan.weights.packed = true;
    plan.weights.bf16_stage = bf16_stage;
    if (projection) {
      plan.weights.w_proj_resid = packed_1x1(weights[first], r, cin, bf16_stage, op,
                                             "w_proj_resid");
      plan.weights.w_proj_dense = packed_1x1(weights[first + 1], 2 * inc, cin, bf16_stage, op,
                                             "w_proj_dense");
    }
    plan.weights.w_a = packed_1x1(weights[i], bottleneck, cin, bf16_stage, op, "w_a");
    plan.weights.w_conv = packed_grouped_conv(weights[i + 1], bottleneck, groups, bf16_stage, op);
    plan.weights.w_c_resid = packed_1x1(weights[i + 2], r, bottleneck, bf16_stage, op,
                                        "w_c_resid");
    plan.weights.w_c_dense = packed_1x1(weights[i + 3], inc, bottleneck, bf16_stage, op,
                                        "w_c_dense");
    plans.push_back(plan);
    in_resid = r;
    in_dense = dense_before + inc;
    in_capacity = capacity;
    h = s.h_out();
    w = s.w_out();
  }
  return plans;
}

// A whole stage in one call: its projection block, then its normal blocks in place on the new
// (resid, dense buffer). After a block has streamed its weights through the cache, Paddle's
// dispatch of the next op call runs cold (~0.2 ms, docs/pitfalls.md); one call per stage pays it
// four times a model instead of once per block.
// weights: the first block's w_proj, w_a, w_conv, w_c, then w_a, w_conv, w_c per further block;
// with packed_weights, the 1x1 weights packed per GEMM (dpn_fast_pack_1x1_weight) and the grouped
// convs' (dpn_fast_pack_grouped_conv_weight), in plan_packed_stage's order. bf16_stage: a bf16
// stage (dpn_block.h), on weights packed with bf16 (packed_weights only): its dense buffer out is
// bfloat16, and so must be a dense buffer in (the previous bf16 stage's; the stem's output is
// float32).
// scale_shift: [2, total], the folded BNs: the first block's projection (C_in), 1x1a (C_in),
// grouped conv (R), 1x1c (R), then 1x1a (that block's C_in), grouped conv, 1x1c per block.
std::vector<paddle::Tensor> StageForward(const paddle::optional<paddle::Tensor>& resid,
                                         const paddle::Tensor& dense,
                                         const std::vector<paddle::Tensor>& weights,
                                         const paddle::Tensor& scale_shift, int64_t groups,
                                         int64_t stride, int64_t dense_channels,
                                         int64_t capacity, bool packed_weights,
                                         bool bf16_stage) {
  PD_CHECK(packed_weights || !bf16_stage, kStage,
           ": bf16_stage runs on packed weights only (packed_weights=true, each 1x1 weight packed "
           "by dpn_fast_pack_1x1_weight with bf16=true)");
  std::vector<BlockPlan> plans;
  if (packed_weights) {
    plans = plan_packed_stage(resid, dense, weights, groups, stride, dense_channels, capacity,
                              bf16_stage);
  } else {
    PD_CHECK(weights.size() >= 4 && (weights.size() - 4) % 3 == 0, kStage,
             ": 'weights' must hold 4 tensors for the stage's first block and 3 for each further "
             "block, got ", weights.size());
    plans.push_back(plan_projection_block(resid, dense, weights[0], weights[1], weights[2],
                                          weights[3], groups, stride, dense_channels, capacity,
                                          kStage));
  }
  auto out = projection_outputs(plans[0].shape, bf16_stage, dense);
  if (!packed_weights) {
    // Valid dense channels: the projection's 2 inc and the first block's inc, then each block's.
    const int64_t r = out[0].shape()[3];
    int64_t channels = (weights[0].shape()[0] - r) + (weights[3].shape()[0] - r);
    for (size_t w = 4; w < weights.size(); w += 3) {
      const std::string where = std::string(kStage) + " (block " + std::to_string(plans.size()) +
                                ")";
      plans.push_back(plan_normal_block(out[0], out[1], weights[w], weights[w + 1],
                                        weights[w + 2], groups, channels, where.c_str()));
      channels += weights[w + 2].shape()[0] - r;
    }
  }
  attach_bns(plans, scale_shift, kStage,
             "the BNs of " + std::to_string(plans.size()) + " blocks: the first's projection "
             "C_in, 1x1a C_in, grouped conv R, 1x1c R, then 1x1a C_in, grouped conv R, 1x1c R "
             "each");
  run_blocks(plans, resid ? resid->data<float>() : nullptr, dense.data(), out[0].data<float>(),
             out[1].data(), dense);
  return out;
}

// Rows [first_row, first_row + rows) of a 1x1 convolution's weight [C_out, C_in, 1, 1], packed
// for this CPU: the blob of one GEMM's weight (packed_1x1). bf16: rounded to bf16 (to nearest
// even), for bf16_stage; refused where oneDNN has no bf16 instructions to run them on.
std::vector<paddle::Tensor> Pack1x1WeightForward(const paddle::Tensor& weight, int64_t first_row,
                                                 int64_t rows, bool bf16) {
  check_operand(weight, kPack, "weight");
  const Shape& s = weight.shape();
  PD_CHECK(s.size() == 4 && s[0] > 0 && s[1] > 0 && s[2] == 1 && s[3] == 1, kPack,
           ": 'weight' must have shape [C_out, C_in, 1, 1], got ", shape_str(s));
  PD_CHECK(first_row >= 0 && rows > 0 && first_row + rows <= s[0], kPack, ": rows [", first_row,
           ", ", first_row + rows, ") must lie in the weight's ", s[0], " rows");
  if (bf16) {
    const std::string unsupported = dpn_fast::bf16_gemm_unsupported_reason();
    PD_CHECK(unsupported.empty(), kPack, ": bf16=true: ", unsupported);
  }
  const Shape shape = packed_1x1_shape(rows, s[1], bf16);
  auto blob = dpn_fast::empty_output(shape, paddle::DataType::UINT8, weight.place());
  uint8_t* data = blob.data<uint8_t>();
  const int64_t bytes = dpn_fast::packed_weight_bytes(rows, s[1], bf16);
  std::fill(data + bytes, data + blob.numel(), uint8_t{0});  // an export's bytes: deterministic
  dpn_fast::pack_weight(rows, s[1], weight.data<float>() + first_row * s[1], s[1], data, bf16);
  return {blob};
}

std::vector<Shape> Pack1x1WeightInferShape(const Shape& weight, int64_t, int64_t rows,
                                           bool bf16) {
  return {packed_1x1_shape(rows, weight[1], bf16)};
}

std::vector<paddle::DataType> PackedWeightInferDtype(paddle::DataType) {
  return {paddle::DataType::UINT8};
}

// A grouped 3x3 conv's weight [r, r / groups, 3, 3] laid out once for this CPU's channels-last
// kernel (its ISA variant): packed_grouped_conv's blob. bf16: for the stage op's bf16_stage (its
// bf16 activations), the weights rounded to bf16.
std::vector<paddle::Tensor> PackGroupedConvWeightForward(const paddle::Tensor& weight,
                                                         int64_t groups, bool bf16) {
  check_operand(weight, kPackConv, "weight");
  const Shape& s = weight.shape();
  PD_CHECK(s.size() == 4 && s[0] > 0, kPackConv,
           ": 'weight' must have shape [C, C / groups, 3, 3], got ", shape_str(s));
  check_grouped_conv(weight, s[0], groups, kPackConv);
  auto blob = dpn_fast::empty_output(packed_grouped_conv_shape(s[0], groups, bf16),
                                     paddle::DataType::UINT8, weight.place());
  uint8_t* data = blob.data<uint8_t>();
  const int64_t bytes = dpn_fast::grouped_conv3x3_nhwc_packed_bytes(s[0], s[0], groups, bf16);
  std::fill(data + bytes, data + blob.numel(), uint8_t{0});  // an export's bytes: deterministic
  dpn_fast::grouped_conv3x3_nhwc_pack(weight.data<float>(), s[0], s[0], groups, bf16, data);
  return {blob};
}

std::vector<Shape> PackGroupedConvWeightInferShape(const Shape& weight, int64_t groups,
                                                   bool bf16) {
  return {packed_grouped_conv_shape(weight[0], groups, bf16)};
}

// Unknown (-1) sizes, as in an export with a dynamic batch or image size, stay unknown.
int64_t out_size(int64_t in, int64_t stride) {
  return in < 0 ? -1 : dpn_fast::conv3x3_out_size(in, stride);
}

std::vector<Shape> StageInferShape(const paddle::optional<Shape>& rs, const Shape& ds,
                                   const std::vector<Shape>& ws, const Shape&, int64_t,
                                   int64_t stride, int64_t, int64_t capacity,
                                   bool packed_weights, bool) {
  PD_CHECK(ws.size() >= (packed_weights ? 6 : 4) && ds.size() == 4, kStage,
           ": 'weights' must hold at least the first block's tensors; dense must have rank 4");
  // Plain: w_proj has resid + 2 inc rows, w_c resid + inc. Packed: w_c_resid has resid rows.
  const int64_t resid = packed_weights ? ws[4][0] : 2 * ws[3][0] - ws[0][0];
  // The stem's output (no resid) is NCHW.
  const int64_t h = rs ? ds[1] : ds[2], w = rs ? ds[2] : ds[3];
  const int64_t ho = out_size(h, stride), wo = out_size(w, stride);
  return {{ds[0], ho, wo, resid}, {ds[0], ho, wo, capacity}};
}

std::vector<paddle::DataType> StageInferDtype(const paddle::optional<paddle::DataType>&,
                                              paddle::DataType,
                                              const std::vector<paddle::DataType>&,
                                              paddle::DataType, int64_t, int64_t, int64_t,
                                              int64_t, bool, bool bf16_stage) {
  return {paddle::DataType::FLOAT32, dense_dtype(bf16_stage)};
}

// scale_shift: [2, C], the folded BN of concat(resid, dense) (C = R + dense_channels). fc_weight:
// [C, classes] floats, or with packed_fc the [classes, C] transpose packed as a 1x1 GEMM's
// float32 weight (dpn_fast_pack_1x1_weight). dense: float32, or a bf16 stage's bfloat16.
std::vector<paddle::Tensor> HeadForward(const paddle::Tensor& resid, const paddle::Tensor& dense,
                                        const paddle::Tensor& scale_shift,
                                        const paddle::Tensor& fc_weight,
                                        const paddle::Tensor& fc_bias, int64_t dense_channels,
                                        bool packed_fc) {
  const bool dense_bf16 = dense.dtype() == paddle::DataType::BFLOAT16;  // a bf16 stage's
  const Input in = check_input(&resid, dense, dense_channels, false, kHead,
                               dense_dtype(dense_bf16));
  const int64_t channels = in.resid + in.dense;
  check_scale_shift(scale_shift, channels, kHead, "the BN of resid's channels + dense_channels");
  int64_t classes = 0;
  const void* weight = nullptr;
  if (packed_fc) {
    classes = packed_rows(fc_weight, kHead, "fc_weight");
    weight = packed_1x1(fc_weight, classes, channels, false, kHead, "fc_weight");
  } else {
    const Shape& fw = fc_weight.shape();
    PD_CHECK(fw.size() == 2 && fw[0] == channels && fw[1] > 0, kHead,
             ": 'fc_weight' must have shape [", channels, ", classes], got ", shape_str(fw));
    check_operand(fc_weight, kHead, "fc_weight");
    classes = fw[1];
    weight = fc_weight.data<float>();
  }
  check_operand(fc_bias, kHead, "fc_bias");
  PD_CHECK(fc_bias.shape() == Shape{classes}, kHead, ": 'fc_bias' must have shape [", classes,
           "], got ", shape_str(fc_bias.shape()));
  const dpn_fast::DpnHeadShape s{in.n,     in.h * in.w, in.resid, in.dense, in.capacity,
                                 classes, dense_bf16};
  const dpn_fast::DpnHeadWeights weights{FoldedColumns(scale_shift).next(channels),
                                         static_cast<const float*>(weight), fc_bias.data<float>(),
                                         packed_fc};
  auto logits = dpn_fast::empty_output({s.n, s.classes}, paddle::DataType::FLOAT32, dense.place());
  auto workspace = dpn_fast::empty_output({dpn_fast::dpn_head_workspace_floats(s)},
                                          paddle::DataType::FLOAT32, dense.place());
  dpn_fast::dpn_head_forward_cpu(s, resid.data<float>(), dense.data(), weights,
                                 logits.data<float>(), workspace.data<float>());
  return {logits};
}

std::vector<Shape> HeadInferShape(const Shape&, const Shape& ds, const Shape&, const Shape& fw,
                                  const Shape&, int64_t, bool packed_fc) {
  PD_CHECK(ds.size() == 4 && fw.size() == 2, kHead, ": dense must have rank 4, fc_weight rank 2");
  return {{ds[0], packed_fc ? fw[0] : fw[1]}};
}

std::vector<paddle::DataType> HeadInferDtype(paddle::DataType, paddle::DataType,
                                             paddle::DataType, paddle::DataType,
                                             paddle::DataType) {
  return {paddle::DataType::FLOAT32};
}

// bn: weight, bias, running mean, running variance per BN, each [C_i]; one epsilon per BN.
// Returns scale_shift [2, sum C_i], the BNs' columns in list order, folded as the standalone
// ops fold them (fold_batch_norm).
std::vector<paddle::Tensor> FoldBatchNormsForward(const std::vector<paddle::Tensor>& bn,
                                                  const std::vector<float>& epsilons) {
  PD_CHECK(!epsilons.empty() && bn.size() == 4 * epsilons.size(), kFold,
           ": 'bn' must hold 4 tensors (weight, bias, mean, variance) per epsilon; got ",
           bn.size(), " tensors and ", epsilons.size(), " epsilons");
  int64_t columns = 0;
  for (size_t i = 0; i < epsilons.size(); ++i) {
    // Named bn<i>_weight, ...: the i-th BN's tensors.
    const std::string prefix = "bn" + std::to_string(i) + "_";
    const paddle::Tensor& weight = bn[4 * i];
    check_operand(weight, kFold, (prefix + "weight").c_str());
    dpn_fast::check_rank(weight, 1, kFold, (prefix + "weight").c_str());
    dpn_fast::check_bn(weight, weight.shape()[0], weight, bn[4 * i + 1], bn[4 * i + 2],
                       bn[4 * i + 3], kFold, prefix);
    columns += weight.shape()[0];
  }
  auto scale_shift = dpn_fast::empty_output({2, columns}, paddle::DataType::FLOAT32,
                                            bn[0].place());
  float* scale = scale_shift.data<float>();
  for (size_t i = 0; i < epsilons.size(); ++i) {
    const int64_t channels = bn[4 * i].shape()[0];
    const dpn_fast::BatchNormParams params{bn[4 * i].data<float>(), bn[4 * i + 1].data<float>(),
                                           bn[4 * i + 2].data<float>(),
                                           bn[4 * i + 3].data<float>(), epsilons[i]};
    dpn_fast::fold_batch_norm(params, channels, scale, scale + columns);
    scale += channels;
  }
  return {scale_shift};
}

// Unknown (-1) channel counts, as a program's shapes may hold, make the total unknown.
std::vector<Shape> FoldBatchNormsInferShape(const std::vector<Shape>& bn,
                                            const std::vector<float>&) {
  int64_t columns = 0;
  for (size_t i = 0; i < bn.size(); i += 4) {
    if (bn[i].size() != 1 || bn[i][0] < 0 || columns < 0) {
      columns = -1;
    } else {
      columns += bn[i][0];
    }
  }
  return {{2, columns}};
}

std::vector<paddle::DataType> FoldBatchNormsInferDtype(const std::vector<paddle::DataType>&) {
  return {paddle::DataType::FLOAT32};
}

}  // namespace

PD_BUILD_OP(dpn_fast_dpn_block)
    .Inputs({"resid", "dense", "w_a", "w_conv", "w_c", "scale_shift"})
    .Outputs({"resid_out", "dense_out"})
    .Attrs({"groups: int64_t", "dense_channels: int64_t"})
    .SetInplaceMap({{"resid", "resid_out"}, {"dense", "dense_out"}})
    .SetKernelFn(PD_KERNEL(BlockForward));

PD_BUILD_OP(dpn_fast_dpn_head)
    .Inputs({"resid", "dense", "scale_shift", "fc_weight", "fc_bias"})
    .Outputs({"logits"})
    .Attrs({"dense_channels: int64_t", "packed_fc: bool"})
    .SetKernelFn(PD_KERNEL(HeadForward))
    .SetInferShapeFn(PD_INFER_SHAPE(HeadInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(HeadInferDtype));

PD_BUILD_OP(dpn_fast_dpn_stage)
    .Inputs({paddle::Optional("resid"), "dense", paddle::Vec("weights"), "scale_shift"})
    .Outputs({"resid_out", "dense_out"})
    .Attrs({"groups: int64_t", "stride: int64_t", "dense_channels: int64_t",
            "capacity: int64_t", "packed_weights: bool", "bf16_stage: bool"})
    .SetKernelFn(PD_KERNEL(StageForward))
    .SetInferShapeFn(PD_INFER_SHAPE(StageInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(StageInferDtype));

PD_BUILD_OP(dpn_fast_fold_batch_norms)
    .Inputs({paddle::Vec("bn")})
    .Outputs({"scale_shift"})
    .Attrs({"epsilons: std::vector<float>"})
    .SetKernelFn(PD_KERNEL(FoldBatchNormsForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FoldBatchNormsInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FoldBatchNormsInferDtype));

PD_BUILD_OP(dpn_fast_pack_1x1_weight)
    .Inputs({"weight"})
    .Outputs({"packed"})
    .Attrs({"first_row: int64_t", "rows: int64_t", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(Pack1x1WeightForward))
    .SetInferShapeFn(PD_INFER_SHAPE(Pack1x1WeightInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PackedWeightInferDtype));

PD_BUILD_OP(dpn_fast_pack_grouped_conv_weight)
    .Inputs({"weight"})
    .Outputs({"packed"})
    .Attrs({"groups: int64_t", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(PackGroupedConvWeightForward))
    .SetInferShapeFn(PD_INFER_SHAPE(PackGroupedConvWeightInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PackedWeightInferDtype));
