// The channels-last Triton kernels compiled ahead of time (build_backend/aot_cubins.py writes
// the table and embeds the cubins) and their C ABI (csrc/aot_kernels.cc). CUDA builds only.
#pragma once
#include <cstddef>

namespace dpn_fast {

struct AotKernel {
  const char* name;     // the kernel's function name, its cubin symbol
  const char* dtype;    // activations: "float16", "bfloat16", "float32"
  const char* variant;  // constexprs and launch options, dpn_fast.kernels._launch.variant_key
  int arch;             // compute capability of the cubin (80: sm_80)
  int num_warps;
  int shared_bytes;     // dynamic shared memory a launch needs
  const char* params;   // the launch's arguments as Triton types, comma separated
  int num_params;
  int hidden_params;    // Triton's scratch pointers after them, passed as null
  const unsigned char* image;
  const unsigned char* image_end;
};

extern const AotKernel kAotKernels[];
extern const int kAotKernelCount;

}  // namespace dpn_fast

extern "C" {

// Error codes of the ABI; dpn_fast_aot_last_error() holds the message of the calling thread's
// last failure. Mirrored in dpn_fast/kernels/_abi.py.
enum DpnFastAotStatus {
  DPN_FAST_AOT_OK = 0,
  DPN_FAST_AOT_NO_DRIVER = 1,        // libcuda.so.1 not found or unusable
  DPN_FAST_AOT_DRIVER_ERROR = 2,     // a CUDA driver call failed (no context, launch error...)
  DPN_FAST_AOT_NO_CUBIN_FOR_ARCH = 3,
  DPN_FAST_AOT_UNKNOWN_KERNEL = 4,   // no such (name, dtype, variant)
  DPN_FAST_AOT_BAD_ARGUMENTS = 5,    // wrong argument count, null argument or misaligned pointer
  DPN_FAST_AOT_BAD_INDEX = 6,
};

struct DpnFastAotInfo {
  const char* name;
  const char* dtype;
  const char* variant;
  int arch;
  int num_warps;
  int shared_bytes;
  const char* params;
  int num_params;
  int hidden_params;
  const void* image;
  size_t image_size;
};

int dpn_fast_aot_count(void);
int dpn_fast_aot_describe(int index, DpnFastAotInfo* info);
// Launches kernel `name` of `dtype` and `variant` with grid[3] blocks on `stream` (a CUstream;
// null: the legacy default stream) with num_args arguments: args[i] points at the i-th value
// (a device pointer for "*..." params, an int32_t for "i32"), as cuLaunchKernel takes them. The
// cubin is the one for the current device's compute capability; modules load once per device.
int dpn_fast_aot_launch(const char* name, const char* dtype, const char* variant,
                        const unsigned int* grid, void* stream, int num_args, void** args);
const char* dpn_fast_aot_last_error(void);

}  // extern "C"
