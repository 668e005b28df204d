#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#ifdef DPN_FAST_HAVE_X86_VARIANTS
#include <immintrin.h>
#endif
#include "cpu_threads.h"
#include "grouped_conv_bn_relu.h"

namespace dpn_fast {
namespace {

// out = act(conv(x', w) * scale + bias) per output channel; scale and bias may be null (1, 0).
// x' = relu(x * in_scale + in_shift) per input channel when in_scale is set (applied while the
// input is copied into a task's zero-padded planes), else x.
struct ConvArgs {
  const float* x;
  const float* w;      // [c_out][c / groups][3][3]
  const float* scale;  // [c_out] or null
  const float* bias;   // [c_out] or null
  float* out;
  bool relu;
  GroupedConvShape shape;
  const float* in_scale = nullptr;  // [c] or null
  const float* in_shift = nullptr;  // [c], with in_scale

  int64_t x_channel_stride() const { return shape.h * shape.w; }
  const float* x_channel(int64_t b, int64_t c) const {
    return x + (b * shape.c + c) * shape.h * shape.w;
  }
  float* out_channel(int64_t b, int64_t c) const {
    return out + (b * shape.c_out + c) * shape.h_out * shape.w_out;
  }
};

// Input gradient of a stride-2 conv, by input parity phase (a, c) = (row, column) parity.
struct InputGradArgs {
  const float* dy;
  const float* w_phase[4];  // [phase]: [c][c_out / groups][taps of the phase]
  float* dx;
  GroupedConvShape shape;  // of the forward convolution
};

// Stride-2 3x3 conv with padding 1, seen from the input: row 2i + parity receives w[k] * dy[i + shift]
// for each {k, shift} of its parity (columns alike).
struct PhaseTap {
  int k, shift;
};
constexpr PhaseTap kPhaseTaps[2][2] = {{{1, 0}, {0, 0}}, {{0, 1}, {2, 0}}};
constexpr int kPhaseTapCount[2] = {1, 2};

struct WeightGradArgs {
  const float* x;
  const float* dy;
  float* dw;
  GroupedConvShape shape;  // of the forward convolution
  int64_t rows_per_block, images_per_block;
};

// Layout of one task's zero-padded input copy: per input channel `phases` planes of hq x wq
// (stride 2 splits rows and columns by parity), plus slack so whole-vector reads past the last
// output position stay inside the buffer.
struct PlaneGeometry {
  int64_t wq, hq, plane_size, ic_stride;
};

constexpr int64_t kMaxFloatsPerVector = 16;
constexpr int64_t kMaxChannelBlock = 6;  // output channels computed together (preferred_ocb)

PlaneGeometry plane_geometry(const GroupedConvShape& s, int64_t rows) {
  PlaneGeometry pg;
  const int64_t phases = s.stride == 1 ? 1 : 4;
  pg.wq = s.stride == 1 ? s.w + 2 : (s.w + 3) / 2;
  pg.hq = s.stride == 1 ? rows + 2 : rows + 1;
  pg.plane_size = pg.hq * pg.wq + 2 * kMaxFloatsPerVector;
  pg.ic_stride = phases * pg.plane_size;
  return pg;
}

// The channels-last convolution (grouped_conv_bn_relu_nhwc_tile.inc): per image, input [h, w, c],
// output [h_out, w_out, c_out].
struct NhwcGeometry {
  int64_t c, h, w, c_out, groups, stride, h_out, w_out;
};

// kNhwcVL consecutive output channels and how their inputs are gathered (see the tile file), as
// a run uses them: pointers into a packed blob and the run's BN fold.
struct NhwcBlock {
  int64_t c0;       // first output channel
  int lanes;        // output channels in the block (kNhwcVL but in the last block)
  bool permute;     // shuffle a two-vector window, else broadcast each source
  int sources;      // input vectors per position: the group's inputs, or all touched groups'
  int64_t window;   // first input channel the block reads
  const float* weights;  // [3][3][sources][kNhwcVL], zero where a lane does not use the source
  const int32_t* index;  // permute: [sources][kNhwcVL], positions in the window
  const float *scale, *shift;  // [kNhwcVL]: the epilogue's BN fold
};

// A block as a packed blob stores it: offsets (in elements) into the blob's weights and indices.
struct NhwcPackedBlock {
  int64_t c0, window, weights, index;
  int32_t lanes, sources, permute, unused;
};

// A packed blob's header: the ISA variant (and its vector width) that laid it out, and the
// convolution it is for.
struct NhwcPackedHeader {
  char isa[16];
  int64_t floats_per_vector, bf16_weights, c, c_out, groups, blocks, floats, indices;
};

static_assert(sizeof(NhwcPackedHeader) <= kNhwcPackedHeaderBytes,
              "grouped_conv3x3_nhwc_packed_mismatch reads the header from a blob that size");

int64_t accumulator_pitch(const PlaneGeometry& pg, int64_t rows) {
  return (rows * pg.wq + kMaxFloatsPerVector - 1) / kMaxFloatsPerVector * kMaxFloatsPerVector;
}

}  // namespace

#define DPN_TILE "grouped_conv_bn_relu_tile.inc"
#include "cpu_isa_variants.inc"
#define DPN_TILE "grouped_conv_bn_relu_nhwc_tile.inc"
#include "cpu_isa_variants.inc"
// The channels-last kernel on pairs of bf16 channels (vdpbf16ps), for bf16 activations on CPUs
// with AVX512_BF16.
#define DPN_TILE "grouped_conv_bn_relu_nhwc_tile.inc"
#include "cpu_isa_bf16_variant.inc"

namespace {

using TaskFn = void (*)(const ConvArgs&, int64_t, int64_t, int64_t, int64_t, float*, double*);

using WeightGradFn = void (*)(const WeightGradArgs&, int64_t, float*);
using InputGradFn = void (*)(const InputGradArgs&, int64_t, int64_t, float*);

TaskFn select_task_fn() {
  switch (detect_isa()) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
    case Isa::kAvx512: return isa_avx512::run_task;
    case Isa::kAvx2: return isa_avx2::run_task;
#endif
    default: return isa_baseline::run_task;
  }
}

InputGradFn select_input_grad_fn() {
  switch (detect_isa()) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
    case Isa::kAvx512: return isa_avx512::input_grad_stride2_task;
    case Isa::kAvx2: return isa_avx2::input_grad_stride2_task;
#endif
    default: return isa_baseline::input_grad_stride2_task;
  }
}

// Per group weight-gradient routine for shape s: vectorised over output channels on small
// planes, over positions otherwise.
WeightGradFn select_weight_grad_fn(const GroupedConvShape& s) {
  switch (detect_isa()) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
    case Isa::kAvx512:
      return isa_avx512::weight_grad_by_channels(s) ? isa_avx512::weight_grad_group_small
                                                    : isa_avx512::weight_grad_group;
    case Isa::kAvx2:
      return isa_avx2::weight_grad_by_channels(s) ? isa_avx2::weight_grad_group_small
                                                  : isa_avx2::weight_grad_group;
#endif
    default:
      return isa_baseline::weight_grad_by_channels(s) ? isa_baseline::weight_grad_group_small
                                                      : isa_baseline::weight_grad_group;
  }
}

// Runs the convolution over tasks (batch item, group, block of output rows). Batch x groups
// already balances 2..8 threads; output rows are split further only when there are too few.
// Tasks are handed out dynamically (a thread slowed by another process on its core does fewer);
// each writes only its own outputs and partial sums, so results do not depend on the schedule.
// `monotonic`: GCC's default dynamic schedule calls GOMP_loop_nonmonotonic_dynamic_*, which
// Paddle's libiomp5 lacks; bound to libgomp instead, inside libiomp5's team, every thread ran
// every task (2 threads were no faster than 1).
// task_sums (optional): per task, per output channel of the group, sum then sum of squares.
void run_conv(const ConvArgs& a, std::vector<double>* task_sums, int64_t* row_blocks_out) {
  static const TaskFn task_fn = select_task_fn();
  const GroupedConvShape& s = a.shape;
  const int64_t threads = cpu_threads();
  const int64_t base_tasks = s.n * s.groups;
  const int64_t row_blocks =
      std::min<int64_t>(s.h_out, std::max<int64_t>(1, (4 * threads + base_tasks - 1) / base_tasks));
  const int64_t tasks = base_tasks * row_blocks;
  const int64_t cin = s.c / s.groups, cout = s.c_out / s.groups;
  const int64_t max_rows = (s.h_out + row_blocks - 1) / row_blocks;
  const PlaneGeometry pg = plane_geometry(s, max_rows);
  const int64_t scratch_floats = cin * pg.ic_stride + kMaxChannelBlock * accumulator_pitch(pg, max_rows);
  if (task_sums) task_sums->assign(tasks * 2 * cout, 0.0);
  if (row_blocks_out) *row_blocks_out = row_blocks;
#pragma omp parallel num_threads(cpu_threads())
  {
    std::vector<float> scratch(scratch_floats);
#pragma omp for schedule(monotonic : dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t rb = t % row_blocks, g = (t / row_blocks) % s.groups, b = t / (row_blocks * s.groups);
      const int64_t r0 = rb * s.h_out / row_blocks, r1 = (rb + 1) * s.h_out / row_blocks;
      if (r0 == r1) continue;
      task_fn(a, b, g, r0, r1, scratch.data(), task_sums ? task_sums->data() + t * 2 * cout : nullptr);
    }
  }
}

}  // namespace

void fold_batch_norm(const BatchNormParams& bn, int64_t channels, float* scale, float* shift) {
  for (int64_t ch = 0; ch < channels; ++ch) {
    scale[ch] = bn.gamma[ch] / std::sqrt(bn.var[ch] + bn.epsilon);
    shift[ch] = bn.beta[ch] - bn.mean[ch] * scale[ch];
  }
}

void grouped_conv3x3_bias_relu_cpu(const float* x, const float* w_folded, const float* bias,
                                   float* out, const GroupedConvShape& s) {
  run_conv(ConvArgs{x, w_folded, nullptr, bias, out, true, s}, nullptr, nullptr);
}

void grouped_conv3x3_bn_relu_infer_cpu(const float* x, const float* w, const float* gamma,
                                       const float* beta, const float* mean, const float* var,
                                       float epsilon, float* out, const GroupedConvShape& s) {
  // Folding applied per output channel in the epilogue: scaling the weights instead would write
  // a weight-sized copy on every call.
  std::vector<float> scale(s.c_out), shift(s.c_out);
  fold_batch_norm({gamma, beta, mean, var, epsilon}, s.c_out, scale.data(), shift.data());
  run_conv(ConvArgs{x, w, scale.data(), shift.data(), out, true, s}, nullptr, nullptr);
}

void bn_relu_grouped_conv3x3_bn_relu_infer_cpu(const float* x, const float* w,
                                               const BatchNormParams& in_bn,
                                               const BatchNormParams& bn, float* out,
                                               const GroupedConvShape& s) {
  std::vector<float> in_scale(s.c), in_shift(s.c), scale(s.c_out), shift(s.c_out);
  fold_batch_norm(in_bn, s.c, in_scale.data(), in_shift.data());
  fold_batch_norm(bn, s.c_out, scale.data(), shift.data());
  ConvArgs args{x, w, scale.data(), shift.data(), out, true, s};
  args.in_scale = in_scale.data();
  args.in_shift = in_shift.data();
  run_conv(args, nullptr, nullptr);
}

// Returns `call` of the ISA variant this CPU runs (detect_isa).
#ifdef DPN_FAST_HAVE_X86_VARIANTS
#define DPN_NHWC_DISPATCH(call)                                 \
  switch (detect_isa()) {                                       \
    case Isa::kAvx512: return isa_avx512::call;                 \
    case Isa::kAvx2: return isa_avx2::call;                     \
    default: return isa_baseline::call;                         \
  }
#else
#define DPN_NHWC_DISPATCH(call) return isa_baseline::call;
#endif

namespace {

constexpr const char* kBf16PairsIsa = "avx512_bf16";

// Whether bf16 activations of a c-channel conv in `groups` run on the bf16 pairs kernel: AVX-512
// with AVX512_BF16, and whole pairs in every group.
bool runs_bf16_pairs(int64_t c, int64_t groups, bool bf16) {
  return bf16 && avx512_bf16_pairs() && (c / groups) % 2 == 0;
}

NhwcPackedHeader packed_header(const uint8_t* blob) {
  NhwcPackedHeader header;
  std::memcpy(&header, blob, sizeof(header));
  return header;
}

// The kernels a blob for this conv is laid out for on this CPU, as its header names them.
const char* packed_kernels(int64_t c, int64_t groups, bool bf16) {
  return runs_bf16_pairs(c, groups, bf16) ? kBf16PairsIsa : isa_name(detect_isa());
}

NhwcGeometry nhwc_geometry(const GroupedConvShape& s, int64_t input_channels) {
  return {input_channels, s.h, s.w, s.c_out, s.groups, s.stride, s.h_out, s.w_out};
}

bool is_bf16_pairs_blob(const uint8_t* blob) {
  const NhwcPackedHeader header = packed_header(blob);
  return strncmp(header.isa, kBf16PairsIsa, sizeof(header.isa)) == 0;
}

}  // namespace

int64_t grouped_conv3x3_nhwc_packed_bytes(int64_t c, int64_t c_out, int64_t groups, bool bf16) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  if (runs_bf16_pairs(c, groups, bf16)) return isa_avx512_bf16::nhwc_packed_bytes(c, c_out, groups);
#endif
  DPN_NHWC_DISPATCH(nhwc_packed_bytes(c, c_out, groups))
}

void grouped_conv3x3_nhwc_pack(const float* w, int64_t c, int64_t c_out, int64_t groups, bool bf16,
                               uint8_t* blob) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  if (runs_bf16_pairs(c, groups, bf16)) {
    return isa_avx512_bf16::nhwc_pack(w, c, c_out, groups, kBf16PairsIsa, true, blob);
  }
#endif
  DPN_NHWC_DISPATCH(nhwc_pack(w, c, c_out, groups, packed_kernels(c, groups, bf16), bf16, blob))
}

std::string grouped_conv3x3_nhwc_packed_mismatch(const uint8_t* blob, int64_t c, int64_t c_out,
                                                 int64_t groups, bool bf16) {
  const NhwcPackedHeader header = packed_header(blob);
  const std::string packed_for(header.isa, strnlen(header.isa, sizeof(header.isa)));
  if (header.c != c || header.c_out != c_out || header.groups != groups) {
    return "it holds the weight of a " + std::to_string(header.c) + " -> " +
           std::to_string(header.c_out) + " channel conv in " + std::to_string(header.groups) +
           " groups, expected " + std::to_string(c) + " -> " + std::to_string(c_out) + " in " +
           std::to_string(groups);
  }
  if ((header.bf16_weights != 0) != bf16) {
    return std::string("it holds ") + (header.bf16_weights ? "bf16" : "float32") +
           " weights, for " + (header.bf16_weights ? "bf16" : "float32") +
           " activations; these are " + (bf16 ? "bf16" : "float32");
  }
  const std::string here = packed_kernels(c, groups, bf16);
  if (packed_for != here) {
    return "it was packed for the " + packed_for + " kernels, this CPU runs the " + here + " ones";
  }
  return "";
}

void grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(const float* x, const uint8_t* blob,
                                                   const FoldedBatchNorm& bn, float* out,
                                                   const GroupedConvShape& s) {
  DPN_NHWC_DISPATCH(nhwc_conv_packed(x, blob, bn.scale, bn.shift, nhwc_geometry(s, s.c), s.n, out))
}

void grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(const Bf16* x, const uint8_t* blob,
                                                   const FoldedBatchNorm& bn, Bf16* out,
                                                   const GroupedConvShape& s) {
#ifdef DPN_FAST_HAVE_X86_VARIANTS
  if (is_bf16_pairs_blob(blob)) {
    // The input side counts pairs: a pixel holds c / 2 of them.
    return isa_avx512_bf16::nhwc_conv_packed(reinterpret_cast<const Bf16Pair*>(x), blob,
                                             bn.scale, bn.shift, nhwc_geometry(s, s.c / 2), s.n,
                                             out);
  }
#endif
  DPN_NHWC_DISPATCH(nhwc_conv_packed(x, blob, bn.scale, bn.shift, nhwc_geometry(s, s.c), s.n, out))
}

#undef DPN_NHWC_DISPATCH

void grouped_conv3x3_bn_relu_nhwc_infer_cpu(const float* x, const float* w,
                                            const FoldedBatchNorm& bn, float* out,
                                            const GroupedConvShape& s) {
  thread_local std::vector<uint8_t> blob;
  blob.resize(grouped_conv3x3_nhwc_packed_bytes(s.c, s.c_out, s.groups, false));
  grouped_conv3x3_nhwc_pack(w, s.c, s.c_out, s.groups, false, blob.data());
  grouped_conv3x3_bn_relu_nhwc_packed_infer_cpu(x, blob.data(), bn, out, s);
}

void grouped_conv3x3_bn_relu_train_cpu(const float* x, const float* w, const float* gamma,
                                       const float* beta, float* running_mean, float* running_var,
                                       float epsilon, float momentum, float* y, float* out,
                                       float* saved_mean, float* saved_invstd,
                                       const GroupedConvShape& s) {
  std::vector<double> task_sums;
  int64_t row_blocks = 1;
  run_conv(ConvArgs{x, w, nullptr, nullptr, y, false, s}, &task_sums, &row_blocks);

  // Reduce the per-task partial sums in a fixed order (deterministic across thread counts).
  const int64_t cout = s.c_out / s.groups, hw = s.h_out * s.w_out;
  const double count = double(s.n) * hw;
  std::vector<float> scale(s.c_out), shift(s.c_out);
  for (int64_t c = 0; c < s.c_out; ++c) {
    const int64_t g = c / cout, o = c % cout;
    double sum = 0.0, sumsq = 0.0;
    for (int64_t b = 0; b < s.n; ++b)
      for (int64_t rb = 0; rb < row_blocks; ++rb) {
        const double* ts = task_sums.data() + ((b * s.groups + g) * row_blocks + rb) * 2 * cout;
        sum += ts[o];
        sumsq += ts[cout + o];
      }
    const double mean = sum / count;
    // Rounding can make the variance slightly negative; NaN (Inf in the batch) stays NaN, so
    // the channel's outputs are NaN before the ReLU, as Paddle's batch_norm makes them.
    const double var = std::max(sumsq / count - mean * mean, 0.0);
    const double invstd = 1.0 / std::sqrt(var + epsilon);
    saved_mean[c] = float(mean);
    saved_invstd[c] = float(invstd);
    scale[c] = float(gamma[c] * invstd);
    shift[c] = float(beta[c] - mean * gamma[c] * invstd);
    running_mean[c] = float(momentum * running_mean[c] + (1.0 - momentum) * mean);
    running_var[c] = float(momentum * running_var[c] + (1.0 - momentum) * var);
  }
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t nc = 0; nc < s.n * s.c_out; ++nc) {
    const float a = scale[nc % s.c_out], b = shift[nc % s.c_out];
    const float* yc = y + nc * hw;
    float* oc = out + nc * hw;
    for (int64_t i = 0; i < hw; ++i) oc[i] = std::max(0.0f, yc[i] * a + b);  // NaN -> 0
  }
}

void grouped_conv3x3_backward_cpu(const float* x, const float* w, const float* dy, float* dx,
                                  float* dw, const GroupedConvShape& s) {
  const int64_t cin = s.c / s.groups, cout = s.c_out / s.groups;
  if (s.stride == 1) {
    // dx: stride-1 grouped conv of dy with the weights transposed per group (in <-> out
    // channels) and flipped.
    std::vector<float> w_t(s.c * cout * 9);
    for (int64_t g = 0; g < s.groups; ++g)
      for (int64_t oc = 0; oc < cout; ++oc)
        for (int64_t ic = 0; ic < cin; ++ic)
          for (int t = 0; t < 9; ++t)
            w_t[((g * cin + ic) * cout + oc) * 9 + t] = w[((g * cout + oc) * cin + ic) * 9 + 8 - t];
    const GroupedConvShape dx_shape{s.n, s.c_out, s.h, s.w, s.c, s.groups, 1, s.h, s.w};
    run_conv(ConvArgs{dy, w_t.data(), nullptr, nullptr, dx, false, dx_shape}, nullptr, nullptr);
  } else {
    // dx by input parity phase: four stride-1 correlations of dy with 1, 2, 2 and 4 taps.
    std::vector<float> w_phase[4];
    InputGradArgs args{dy, {}, dx, s};
    for (int pa = 0; pa < 2; ++pa)
      for (int pc = 0; pc < 2; ++pc) {
        const int nt = kPhaseTapCount[pa] * kPhaseTapCount[pc];
        std::vector<float>& wp = w_phase[pa * 2 + pc];
        wp.resize(s.c * cout * nt);
        for (int64_t g = 0; g < s.groups; ++g)
          for (int64_t oc = 0; oc < cout; ++oc)
            for (int64_t ic = 0; ic < cin; ++ic)
              for (int r = 0; r < kPhaseTapCount[pa]; ++r)
                for (int q = 0; q < kPhaseTapCount[pc]; ++q)
                  wp[((g * cin + ic) * cout + oc) * nt + r * kPhaseTapCount[pc] + q] =
                      w[((g * cout + oc) * cin + ic) * 9 + kPhaseTaps[pa][r].k * 3 + kPhaseTaps[pc][q].k];
        args.w_phase[pa * 2 + pc] = wp.data();
      }
    static const InputGradFn input_grad_fn = select_input_grad_fn();
    const int64_t wq = s.w_out + 1;
    const int64_t scratch_floats = cout * ((s.h_out + 1) * wq + 2 * kMaxFloatsPerVector) +
                                   kMaxChannelBlock * (s.h_out * wq + kMaxFloatsPerVector);
#pragma omp parallel num_threads(cpu_threads())
    {
      std::vector<float> scratch(scratch_floats);
#pragma omp for schedule(monotonic : dynamic)
      for (int64_t t = 0; t < s.n * s.groups; ++t)
        input_grad_fn(args, t / s.groups, t % s.groups, scratch.data());
    }
  }

  // dw: one task per group over the whole batch, in blocks of rows and images whose planes
  // stay in L2 (~512 KiB).
  const WeightGradFn weight_grad_fn = select_weight_grad_fn(s);
  const int64_t budget_floats = 128 * 1024;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(s.h_out, 8192 / (s.w_out + 2)));
  const PlaneGeometry pg = plane_geometry(s, rows);
  const int64_t floats_per_image = cin * pg.ic_stride + cout * accumulator_pitch(pg, rows);
  const int64_t images =
      rows < s.h_out ? 1 : std::max<int64_t>(1, std::min<int64_t>(s.n, budget_floats / floats_per_image));
  // Enough for either routine (the channel-vectorised one needs at most 2 vectors of channels).
  const PlaneGeometry pg_image = plane_geometry(s, s.h_out);
  const int64_t small_floats = cin * pg_image.ic_stride +
                               (s.h_out * pg_image.wq + cin * 9) * 2 * kMaxFloatsPerVector;
  const int64_t scratch_floats = std::max(
      images * floats_per_image + cout * cin * 9 * kMaxFloatsPerVector, small_floats);
  const WeightGradArgs args{x, dy, dw, s, rows, images};
#pragma omp parallel num_threads(cpu_threads())
  {
    std::vector<float> scratch(scratch_floats);
#pragma omp for schedule(monotonic : dynamic)
    for (int64_t g = 0; g < s.groups; ++g) weight_grad_fn(args, g, scratch.data());
  }
}

void bn_relu_train_backward_cpu(const float* y, const float* out, const float* dout,
                                const float* gamma, const float* saved_mean,
                                const float* saved_invstd, float* dy, float* dgamma, float* dbeta,
                                int64_t n, int64_t c, int64_t hw) {
  // dz = dout * (out > 0); dbeta = sum dz; dgamma = sum dz * xhat;
  // dy = gamma * invstd * (dz - dbeta / M - xhat * dgamma / M).
  // xhat is centred on the exact batch mean, saved_mean + offset: centred on the float
  // saved_mean alone, every xhat shifts by offset * invstd and dy by gamma * offset * invstd^2 *
  // dgamma / M, which for near-constant channels over few samples dwarfs dy itself.
#pragma omp parallel for num_threads(cpu_threads()) schedule(static)
  for (int64_t ch = 0; ch < c; ++ch) {
    const float mean = saved_mean[ch], invstd = saved_invstd[ch];
    double sum_dz = 0.0, sum_dz_centred = 0.0, sum_centred = 0.0;
    for (int64_t b = 0; b < n; ++b) {
      const int64_t off = (b * c + ch) * hw;
      float s = 0.0f, sx = 0.0f;
      double sc = 0.0;  // in double: the offset is under half an ulp of the mean
#pragma omp simd reduction(+ : s, sx, sc)
      for (int64_t i = 0; i < hw; ++i) {
        const float dz = out[off + i] > 0.0f ? dout[off + i] : 0.0f;
        const float centred = y[off + i] - mean;
        s += dz;
        sx += dz * centred;
        sc += centred;
      }
      sum_dz += s;
      sum_dz_centred += sx;
      sum_centred += sc;
    }
    const double count = double(n) * hw;
    const double offset = sum_centred / count;
    const double sum_dz_xhat = (sum_dz_centred - offset * sum_dz) * invstd;
    dbeta[ch] = float(sum_dz);
    dgamma[ch] = float(sum_dz_xhat);
    // dy = k * (dz - shift - (y - mean) * slope); shift takes the offset's share in double.
    const float k = gamma[ch] * invstd;
    const double mean_dz_xhat = sum_dz_xhat / count;
    const float slope = float(invstd * mean_dz_xhat);
    const float shift = float(sum_dz / count - offset * invstd * mean_dz_xhat);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t off = (b * c + ch) * hw;
#pragma omp simd
      for (int64_t i = 0; i < hw; ++i) {
        const float dz = out[off + i] > 0.0f ? dout[off + i] : 0.0f;
        dy[off + i] = k * (dz - shift - (y[off + i] - mean) * slope);
      }
    }
  }
}

}  // namespace dpn_fast
