// Paddle binding of a planned DPN stage run on the embedded Triton kernels (CUDA builds only):
//   dpn_fast_aot_stage  (x, weights[]) -> out
// The plan (dpn_fast/kernels/_stage.py) arrives encoded as attributes by dpn_fast/ops/aot_stage.py:
//   kernels   3 strings a launch: kernel name, dtype, variant (csrc/aot_kernels.h)
//   launches  a launch: grid x, y, z, the argument count, then per argument (kind, value): kind
//             0 an int32 value, 1 an operand (0 x, 1 out, 2 and 3 the bottleneck and grouped
//             scratch, 4 + i weights[i])
//   sizes     out's rows and row stride, the two scratch buffers' elements, then the elements
//             the plan reads of x and of each weight
// Each launch goes through the C ABI on x's stream; out [rows, row stride] is the stage's rows.
#include <cstdint>
#include <string>
#include <vector>

#include "aot_kernels.h"
#include "binding.h"

namespace {

constexpr const char* kOp = "dpn_fast_aot_stage";
constexpr int kFixedOperands = 4;  // x, out, bottleneck, grouped
constexpr size_t kFixedSizes = 4;  // out rows, out row stride, bottleneck, grouped

void check_sizes(const std::vector<int64_t>& sizes, size_t weights) {
  PD_CHECK(sizes.size() == kFixedSizes + 1 + weights, kOp, ": sizes must hold ",
           kFixedSizes + 1 + weights, " values for ", weights, " weights, got ", sizes.size());
  for (int64_t s : sizes) PD_CHECK(s >= 0, kOp, ": negative size ", s, " in sizes");
}

std::vector<paddle::Tensor> AotStageForward(const paddle::Tensor& x,
                                            const std::vector<paddle::Tensor>& weights,
                                            const std::vector<std::string>& kernels,
                                            const std::vector<int64_t>& launches,
                                            const std::vector<int64_t>& sizes) {
  PD_CHECK(x.is_gpu(), kOp, ": x must be a CUDA tensor (the embedded kernels run on the GPU), "
           "got place ", x.place().DebugString());
  check_sizes(sizes, weights.size());
  PD_CHECK(kernels.size() % 3 == 0, kOp, ": kernels must hold 3 strings a launch, got ",
           kernels.size());
  PD_CHECK(x.numel() >= sizes[kFixedSizes], kOp, ": x holds ", x.numel(),
           " elements, the plan reads ", sizes[kFixedSizes]);
  for (size_t i = 0; i < weights.size(); ++i) {
    dpn_fast::check_same_place(x, weights[i], kOp, "x", "weights");
    PD_CHECK(weights[i].numel() >= sizes[kFixedSizes + 1 + i], kOp, ": weights[", i, "] holds ",
             weights[i].numel(), " elements, the plan reads ", sizes[kFixedSizes + 1 + i]);
  }
  paddle::Tensor out = paddle::empty({sizes[0], sizes[1]}, x.dtype(), x.place());
  paddle::Tensor bottleneck = paddle::empty({sizes[2]}, x.dtype(), x.place());
  paddle::Tensor grouped = paddle::empty({sizes[3]}, x.dtype(), x.place());
  std::vector<uint64_t> operands = {
      reinterpret_cast<uint64_t>(x.data()), reinterpret_cast<uint64_t>(out.data()),
      reinterpret_cast<uint64_t>(bottleneck.data()), reinterpret_cast<uint64_t>(grouped.data())};
  for (const paddle::Tensor& w : weights) operands.push_back(reinterpret_cast<uint64_t>(w.data()));

  size_t at = 0;
  const auto next = [&](const char* what) {
    PD_CHECK(at < launches.size(), kOp, ": launches ends inside a launch's ", what);
    return launches[at++];
  };
  for (size_t launch = 0; launch < kernels.size() / 3; ++launch) {
    unsigned int grid[3];
    for (unsigned int& g : grid) g = static_cast<unsigned int>(next("grid"));
    const int64_t count = next("argument count");
    PD_CHECK(count >= 0 && count < 64, kOp, ": launch ", launch, " has ", count, " arguments");
    // Values the argument pointers point at: sized first, so they never move.
    std::vector<uint64_t> pointers(count);
    std::vector<int32_t> ints(count);
    std::vector<void*> args(count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t kind = next("argument kind"), value = next("argument value");
      if (kind == 0) {
        ints[i] = static_cast<int32_t>(value);
        args[i] = &ints[i];
      } else {
        PD_CHECK(kind == 1 && value >= 0 && value < static_cast<int64_t>(operands.size()), kOp,
                 ": launch ", launch, " argument ", i, ": bad operand (kind ", kind, ", value ",
                 value, ") of ", operands.size());
        pointers[i] = operands[value];
        args[i] = &pointers[i];
      }
    }
    const int status = dpn_fast_aot_launch(
        kernels[3 * launch].c_str(), kernels[3 * launch + 1].c_str(),
        kernels[3 * launch + 2].c_str(), grid, static_cast<void*>(x.stream()),
        static_cast<int>(count), args.data());
    PD_CHECK(status == DPN_FAST_AOT_OK, kOp, ": launch ", launch, " (", kernels[3 * launch],
             "): ", dpn_fast_aot_last_error());
  }
  PD_CHECK(at == launches.size(), kOp, ": launches holds ", launches.size() - at,
           " values past its last launch");
  return {out};
}

std::vector<std::vector<int64_t>> AotStageInferShape(
    const std::vector<int64_t>&, const std::vector<std::vector<int64_t>>& weights,
    const std::vector<std::string>&, const std::vector<int64_t>&,
    const std::vector<int64_t>& sizes) {
  check_sizes(sizes, weights.size());
  return {{sizes[0], sizes[1]}};
}

std::vector<paddle::DataType> AotStageInferDtype(const paddle::DataType& x,
                                                 const std::vector<paddle::DataType>&) {
  return {x};
}

}  // namespace

PD_BUILD_OP(dpn_fast_aot_stage)
    .Inputs({"x", paddle::Vec("weights")})
    .Outputs({"out"})
    .Attrs({"kernels: std::vector<std::string>", "launches: std::vector<int64_t>",
            "sizes: std::vector<int64_t>"})
    .SetKernelFn(PD_KERNEL(AotStageForward))
    .SetInferShapeFn(PD_INFER_SHAPE(AotStageInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AotStageInferDtype));
