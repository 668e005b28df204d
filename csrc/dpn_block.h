// A whole DPN block, and the network's head, for inference (eval BatchNorm), channels-last
// (NHWC) float32, framework-free. A block with input (resid, dense) and output (resid', dense'):
//   act    = relu(bn_a(concat(resid, dense)))          act_w likewise with bn_w (projection)
//   resid' , dense'[:, :2 inc] = split(act_w x W_w^T)   projection blocks (stride: subsampled)
//   g      = relu(bn_c(grouped_conv3x3(relu(bn_b(act x W_a^T)), stride)))
//   resid' += g x W_c[:R]^T;  dense'[:, d : d + inc] = g x W_c[R:]^T
// Channels-last, a 1x1 convolution is one GEMM over all positions of a run of images, its
// activations used as oneDNN's matmul reads them and its weights as given or packed once for this
// CPU (the compiled engine's; oneDNN otherwise repacks them on every call); in NCHW the
// activations were the operand the matmul repacks on every call (docs/design_notes.md: 1.13-1.2x
// on DPN92's shapes). bn_b + ReLU is 1x1a's epilogue (oneDNN post-ops), bn_c + ReLU the grouped
// conv's (the project's channels-last kernel), the input's BN + ReLU one pass. A normal block
// works in place on the stage's buffers: the residual accumulates into resid and the new dense
// channels land in the stage's dense buffer, so nothing is split, added or concatenated in a
// separate pass.
// A bf16 stage (DpnBlockWeights::bf16_stage, on packed weights only): the block's convolutions
// run on bf16 weights and activations with float32 sums, and the stage's dense buffer holds bf16.
// Every 1x1 GEMM (projection, 1x1a, 1x1c) multiplies bf16 by bf16 (oneDNN): its weight is the
// float32 weight rounded to bf16 when packed, its input is rounded to bf16 by whoever writes it
// (the input's BN + ReLU pass writes act and act_w, the grouped conv's epilogue g). 1x1a rounds
// its output a (after its BN + ReLU epilogue) to bf16; the grouped conv reads a as bf16, its
// weights packed as bf16 (grouped_conv_bn_relu.h: pairs of channels on vdpbf16ps where the CPU
// has AVX512_BF16). The projection's and 1x1c's dense rows are rounded to bf16 as they land in
// the dense buffer, which every later block and the head read: half the bytes. The residual stays
// float32: it is a running sum over the stage's blocks (up to 28), and rounding it at every block
// compounds (DPN92 emulated in plain Paddle, seeded random weights: the logits' error against
// float32's is 5.7e-3 with float32 buffers, 5.9e-3 with a bf16 dense buffer and 7.2e-3 with a bf16
// resid too). The sums and epilogues stay float32 too. So the
// result is the float32 network's with the weights and the inputs of every 1x1 and grouped
// convolution and the dense channels rounded to bf16 (to nearest even), up to the order of the
// float32 sums. The stem rounds its input and weights likewise in the bf16 engine
// (stem_conv_bn_relu_pool.h); the classifier stays float32 (DpnHeadWeights).
// Head: logits = fc(mean_hw(relu(bn(concat(resid, dense))))), without materialising the BN'd
// concat.
#pragma once
#include <cstdint>

#include "grouped_conv_bn_relu.h"

namespace dpn_fast {

struct DpnBlockShape {
  int64_t n, h, w;      // input planes
  int64_t in_resid;     // residual channels of the input (0: the stem's output, dense only)
  int64_t in_dense;     // dense channels of the input
  int64_t in_capacity;  // channels per image of the input dense tensor (>= in_dense)
  int64_t bottleneck, groups, stride;
  int64_t resid, inc;   // residual channels out, dense channels this block adds
  bool projection;      // projects the input to a new (resid, dense) pair (first block of a stage)
  int64_t capacity;     // channels per image of the output dense buffer

  int64_t in_channels() const { return in_resid + in_dense; }
  int64_t h_out() const { return conv3x3_out_size(h, stride); }
  int64_t w_out() const { return conv3x3_out_size(w, stride); }
  // Dense channels before this block's own: the projection's 2 inc, or the input's.
  int64_t dense_before() const { return projection ? 2 * inc : in_dense; }
};

// BNs come folded (the caller folds them once, not every call). The projection's and 1x1c's rows
// are two GEMMs each, the residual rows and the dense rows, so each 1x1 GEMM has its own weight:
// plain floats, rows of the layer's [C_out, C_in] weight, or packed, that GEMM's rows laid out
// once for this CPU (onednn_gemm.h: pack_weight; here packed_weight_data of the blob), as floats
// or, for bf16_stage, as bf16. The grouped conv's weight likewise: plain [bottleneck, bottleneck /
// groups, 3, 3] floats, or packed, the blob of grouped_conv3x3_nhwc_pack (whose kernel otherwise
// lays it out on every call).
struct DpnBlockWeights {
  FoldedBatchNorm bn_w;        // projection blocks: the projection's input BN [in_channels]
  const void* w_proj_resid;    // projection blocks: [resid, in_channels]
  const void* w_proj_dense;    // projection blocks: [2 inc, in_channels]
  FoldedBatchNorm bn_a;        // 1x1a's input BN [in_channels]
  const void* w_a;             // [bottleneck, in_channels]
  FoldedBatchNorm bn_b;        // the grouped conv's input BN [bottleneck]
  const void* w_conv;          // [bottleneck, bottleneck / groups, 3, 3]
  FoldedBatchNorm bn_c;        // 1x1c's input BN (the grouped conv's epilogue) [bottleneck]
  const void* w_c_resid;       // [resid, bottleneck]
  const void* w_c_dense;       // [inc, bottleneck]
  bool packed;                 // every weight packed (above)
  bool bf16_stage;             // the weights packed as bf16: a bf16 stage (above)
};

// Whether a block's input dense buffer holds bf16: in a bf16 stage, except the stem's output,
// which a stage's first block reads as floats (in_resid == 0).
inline bool dense_is_bf16(const DpnBlockShape& s, const DpnBlockWeights& w) {
  return w.bf16_stage && s.in_resid != 0;
}

// A run of blocks, as a stage runs them: block 0 from (resid_in, dense_in) into (resid_out,
// dense_out), the following ones in place on those. Block 0 may be a projection block or, alone,
// a normal one. Buffers are channels-last: resid_in [n, h, w, in_resid], dense_in [n, h, w,
// in_capacity]; but a block 0 with in_resid == 0 reads the stem's output, dense_in NCHW [n,
// in_capacity, h, w] (resid_in nullptr). resid_out [n, h_out, w_out, resid], dense_out [n, h_out,
// w_out, capacity]. A normal block runs in place (resid_out == resid_in, dense_out == dense_in)
// and writes only channels in_dense .. in_dense + inc of the dense buffer. Resid is float; dense
// holds Bf16 in a bf16 stage (dense_in as dense_is_bf16 says), floats otherwise. A batch runs a
// few images at a time, each group through all the blocks: one image where planes are large,
// more where they are small. workspace: dpn_stage_workspace_floats(shapes, count) floats.
int64_t dpn_stage_workspace_floats(const DpnBlockShape* shapes, int64_t count);
void dpn_stage_forward_cpu(const DpnBlockShape* shapes, const DpnBlockWeights* weights,
                           int64_t count, const float* resid_in, const void* dense_in,
                           float* resid_out, void* dense_out, float* workspace);

struct DpnHeadShape {
  int64_t n, hw;
  int64_t resid, dense, capacity;  // channels: residual, dense, dense tensor's per image
  int64_t classes;
  bool dense_bf16;  // the dense tensor holds Bf16 (a bf16 stage's), else floats
  int64_t channels() const { return resid + dense; }
};

// The classifier's weight: plain floats [channels, classes] (paddle.nn.Linear's layout), or
// packed (the compiled engine's), the [classes, channels] transpose laid out once for this CPU
// like a 1x1 GEMM's (packed_weight_data of pack_weight's float32 blob). It stays float32 in the
// bf16 engine: rounding its 2688-long dot products' weights and inputs to bf16 took DPN92's
// logits 35% further from float32's (emulated in plain Paddle, seeded random weights), for
// 0.1 ms of 70.
struct DpnHeadWeights {
  FoldedBatchNorm bn;  // [channels]
  const float* fc_weight;
  const float* fc_bias;  // [classes]
  bool packed;
};

// Workspace of dpn_head_forward_cpu, in floats: the pooled features.
inline int64_t dpn_head_workspace_floats(const DpnHeadShape& s) { return s.n * s.channels(); }

// resid [n, hw, resid], dense [n, hw, capacity] (channels-last); logits: [n, classes].
void dpn_head_forward_cpu(const DpnHeadShape& s, const float* resid, const void* dense,
                          const DpnHeadWeights& weights, float* logits, float* workspace);

}  // namespace dpn_fast
