// Framework-free definitions shared by the kernel cores (no Paddle, no CUDA headers).
#pragma once
#include <cstdint>

namespace dpn_fast {

// Status codes returned by the extern "C" launchers of the CUDA cores.
enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,
  kCudaError = 2,
};

// Element types understood by the C ABI (fp32 everywhere, fp16/bf16 on GPU).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

}  // namespace dpn_fast
