// The C ABI of the ahead-of-time Triton kernels (csrc/aot_kernels.h): list them, launch one.
// The CUDA driver is loaded with dlopen on first launch, so the library loads, and every CPU
// path works, where there is none; each failure returns a status and keeps a message.
#include "aot_kernels.h"

#include <cuda.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

thread_local std::string last_error;

int fail(int status, std::string message) {
  last_error = std::move(message);
  return status;
}

#define AOT_CHECK(cond, status, message) \
  do {                                   \
    if (!(cond)) return fail(status, message); \
  } while (0)

struct Driver {
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuGetErrorString) error_string = nullptr;
  decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&::cuCtxGetDevice) ctx_get_device = nullptr;
  decltype(&::cuDeviceGetAttribute) device_attribute = nullptr;
  decltype(&::cuModuleLoadData) module_load_data = nullptr;
  decltype(&::cuModuleGetFunction) module_get_function = nullptr;
  decltype(&::cuFuncSetAttribute) func_set_attribute = nullptr;
  decltype(&::cuLaunchKernel) launch_kernel = nullptr;
  std::string unusable;  // why the driver cannot be used; empty when it can
};

template <typename Fn>
bool resolve(void* handle, const char* symbol, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(handle, symbol));
  return *fn != nullptr;
}

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      d.unusable = std::string("no CUDA driver: dlopen(libcuda.so.1) failed: ") +
                   (why ? why : "unknown error");
      return;
    }
    if (!(resolve(handle, "cuInit", &d.init) &&
          resolve(handle, "cuGetErrorString", &d.error_string) &&
          resolve(handle, "cuCtxGetCurrent", &d.ctx_get_current) &&
          resolve(handle, "cuCtxGetDevice", &d.ctx_get_device) &&
          resolve(handle, "cuDeviceGetAttribute", &d.device_attribute) &&
          resolve(handle, "cuModuleLoadData", &d.module_load_data) &&
          resolve(handle, "cuModuleGetFunction", &d.module_get_function) &&
          resolve(handle, "cuFuncSetAttribute", &d.func_set_attribute) &&
          resolve(handle, "cuLaunchKernel", &d.launch_kernel))) {
      d.unusable = "no CUDA driver: libcuda.so.1 lacks a driver API entry point";
      return;
    }
    CUresult status = d.init(0);
    if (status != CUDA_SUCCESS) {
      d.unusable = "no CUDA driver: cuInit failed with code " + std::to_string(status);
    }
  });
  return d;
}

std::string cu_message(const Driver& d, CUresult status, const char* call) {
  const char* text = nullptr;
  d.error_string(status, &text);
  return std::string(call) + " failed: " + (text ? text : "unknown error") + " (" +
         std::to_string(status) + ")";
}

#define CU_CHECK(d, call)                                                       \
  do {                                                                          \
    CUresult status_ = (call);                                                  \
    if (status_ != CUDA_SUCCESS)                                                \
      return fail(DPN_FAST_AOT_DRIVER_ERROR, cu_message(d, status_, #call));    \
  } while (0)

// Loaded functions, per table entry and context (a module belongs to the context it is loaded
// in: one per device under the frameworks' primary contexts).
std::mutex functions_mutex;
std::map<std::pair<int, CUcontext>, CUfunction> functions;

int load_function(const Driver& d, int index, CUcontext context, CUfunction* out) {
  std::lock_guard<std::mutex> lock(functions_mutex);
  auto found = functions.find({index, context});
  if (found != functions.end()) {
    *out = found->second;
    return DPN_FAST_AOT_OK;
  }
  const dpn_fast::AotKernel& k = dpn_fast::kAotKernels[index];
  CUmodule module;
  CUfunction function;
  CU_CHECK(d, d.module_load_data(&module, k.image));
  CU_CHECK(d, d.module_get_function(&function, module, k.name));
  if (k.shared_bytes > 48 * 1024) {  // above the default limit: opt in, as Triton does
    CU_CHECK(d, d.func_set_attribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     k.shared_bytes));
  }
  functions[{index, context}] = function;
  *out = function;
  return DPN_FAST_AOT_OK;
}

std::string describe_kernel(const char* name, const char* dtype, const char* variant) {
  return std::string(name) + " " + dtype + " [" + variant + "]";
}

}  // namespace

extern "C" {

int dpn_fast_aot_count(void) { return dpn_fast::kAotKernelCount; }

int dpn_fast_aot_describe(int index, DpnFastAotInfo* info) {
  AOT_CHECK(index >= 0 && index < dpn_fast::kAotKernelCount && info != nullptr,
            DPN_FAST_AOT_BAD_INDEX,
            "kernel index " + std::to_string(index) + " outside 0.." +
                std::to_string(dpn_fast::kAotKernelCount - 1) + " (or no info to fill)");
  const dpn_fast::AotKernel& k = dpn_fast::kAotKernels[index];
  *info = {k.name, k.dtype, k.variant, k.arch, k.num_warps, k.shared_bytes, k.params,
           k.num_params, k.hidden_params, k.image, static_cast<size_t>(k.image_end - k.image)};
  return DPN_FAST_AOT_OK;
}

int dpn_fast_aot_launch(const char* name, const char* dtype, const char* variant,
                        const unsigned int* grid, void* stream, int num_args, void** args) {
  AOT_CHECK(name && dtype && variant && grid, DPN_FAST_AOT_BAD_ARGUMENTS,
            "name, dtype, variant and grid are required");
  std::vector<int> candidates;  // the kernel's entries, one per arch
  for (int i = 0; i < dpn_fast::kAotKernelCount; ++i) {
    const dpn_fast::AotKernel& k = dpn_fast::kAotKernels[i];
    if (!std::strcmp(k.name, name) && !std::strcmp(k.dtype, dtype) &&
        !std::strcmp(k.variant, variant))
      candidates.push_back(i);
  }
  AOT_CHECK(!candidates.empty(), DPN_FAST_AOT_UNKNOWN_KERNEL,
            "no embedded kernel " + describe_kernel(name, dtype, variant));
  const dpn_fast::AotKernel& first = dpn_fast::kAotKernels[candidates[0]];
  AOT_CHECK(num_args == first.num_params && args != nullptr, DPN_FAST_AOT_BAD_ARGUMENTS,
            describe_kernel(name, dtype, variant) + " takes " +
                std::to_string(first.num_params) + " arguments (" + first.params + "), got " +
                std::to_string(num_args));
  const char* kind = first.params;  // "*fp16,i32,...": pointers are compiled 16-byte aligned
  for (int i = 0; i < num_args; ++i) {
    AOT_CHECK(args[i] != nullptr, DPN_FAST_AOT_BAD_ARGUMENTS,
              "argument " + std::to_string(i) + " of " + name + " is null");
    AOT_CHECK(*kind != '*' || *static_cast<const std::uintptr_t*>(args[i]) % 16 == 0,
              DPN_FAST_AOT_BAD_ARGUMENTS,
              "argument " + std::to_string(i) + " of " + name +
                  " is a pointer not 16-byte aligned; the cubins assume aligned tensors");
    kind = std::strchr(kind, ',') + 1;  // past the end only after the last argument
  }
  const Driver& d = driver();
  AOT_CHECK(d.unusable.empty(), DPN_FAST_AOT_NO_DRIVER, d.unusable);
  CUcontext context = nullptr;
  CU_CHECK(d, d.ctx_get_current(&context));
  AOT_CHECK(context != nullptr, DPN_FAST_AOT_DRIVER_ERROR,
            "no current CUDA context (initialise the device in the framework first)");
  CUdevice device;
  int major = 0, minor = 0;
  CU_CHECK(d, d.ctx_get_device(&device));
  CU_CHECK(d, d.device_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device));
  CU_CHECK(d, d.device_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device));
  const int cc = 10 * major + minor;
  // A cubin runs on its own major arch at its minor or a later one: the newest such.
  int chosen = -1;
  std::string archs;
  for (int i : candidates) {
    const int arch = dpn_fast::kAotKernels[i].arch;
    archs += (archs.empty() ? "sm_" : ", sm_") + std::to_string(arch);
    if (arch / 10 == major && arch <= cc &&
        (chosen < 0 || arch > dpn_fast::kAotKernels[chosen].arch))
      chosen = i;
  }
  AOT_CHECK(chosen >= 0, DPN_FAST_AOT_NO_CUBIN_FOR_ARCH,
            describe_kernel(name, dtype, variant) + " has cubins for " + archs +
                ", none for this device's sm_" + std::to_string(cc));
  CUfunction function;
  int status = load_function(d, chosen, context, &function);
  if (status != DPN_FAST_AOT_OK) return status;

  const dpn_fast::AotKernel& k = dpn_fast::kAotKernels[chosen];
  std::vector<void*> params(args, args + num_args);
  std::vector<CUdeviceptr> scratch(k.hidden_params, 0);  // no kernel here uses scratch memory
  for (CUdeviceptr& p : scratch) params.push_back(&p);
  CU_CHECK(d, d.launch_kernel(function, grid[0], grid[1], grid[2], 32 * k.num_warps, 1, 1,
                              k.shared_bytes, static_cast<CUstream>(stream), params.data(),
                              nullptr));
  return DPN_FAST_AOT_OK;
}

const char* dpn_fast_aot_last_error(void) { return last_error.c_str(); }

}  // extern "C"
