// Checks shared by the Paddle op bindings (*_op.cc). Errors surface in Python with the
// message given here, so each one names the argument and what was expected.
#pragma once
#include <sstream>
#include <string>
#include <vector>

#include "paddle/extension.h"

namespace dpn_fast {

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

// Paddle Inference with oneDNN (its CPU default) hands custom ops tensors in oneDNN layout,
// often blocked (nChw16c), which reads as garbage when indexed as NCHW. Returns such a tensor
// reordered to plain NCHW, any other tensor unchanged (csrc/onednn_layout.cc).
paddle::Tensor to_plain_layout(const paddle::Tensor& t);

// An uninitialised output tensor. On CPU, blocks of 128 KiB and more come from a cache of freed
// blocks instead of Paddle's allocator (csrc/host_block_cache.cc).
paddle::Tensor empty_output(const std::vector<int64_t>& shape, paddle::DataType dtype,
                            const phi::Place& place);

// For tensors that cannot be reordered (written in place): refuse oneDNN layout clearly.
inline void check_plain_layout(const paddle::Tensor& t, const char* op, const char* name) {
  PD_CHECK(t.layout() != phi::DataLayout::ONEDNN, op, ": input '", name,
           "' is in oneDNN layout; run this model with oneDNN disabled "
           "(dpn_fast.inference.create_predictor(path, use_onednn=False))");
}

inline void check_rank(const paddle::Tensor& t, size_t rank, const char* op, const char* name) {
  PD_CHECK(t.shape().size() == rank, op, ": '", name, "' must have rank ", rank, ", got shape ",
           shape_str(t.shape()));
}

inline void check_same_dtype(const paddle::Tensor& a, const paddle::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  PD_CHECK(a.dtype() == b.dtype(), op, ": '", name_a, "' and '", name_b,
           "' must have the same dtype, got ", phi::DataTypeToString(a.dtype()), " and ",
           phi::DataTypeToString(b.dtype()));
}

inline void check_same_place(const paddle::Tensor& a, const paddle::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  PD_CHECK(a.place() == b.place(), op, ": '", name_a, "' and '", name_b,
           "' must be on the same device, got ", a.place().DebugString(), " and ",
           b.place().DebugString());
}

// A [channels] float32 vector on x's device (BN parameters, biases).
inline void check_channel_vector(const paddle::Tensor& t, const paddle::Tensor& x,
                                 int64_t channels, const char* op, const std::string& name) {
  check_plain_layout(t, op, name.c_str());
  check_same_place(x, t, op, "x", name.c_str());
  PD_CHECK(t.shape().size() == 1 && t.shape()[0] == channels, op, ": '", name,
           "' must have shape [", channels, "], got ", shape_str(t.shape()));
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": '", name, "' must be float32, got ",
           phi::DataTypeToString(t.dtype()));
}

// A BatchNorm's four [channels] float32 vectors, named prefix + "weight", ... in errors.
inline void check_bn(const paddle::Tensor& x, int64_t channels, const paddle::Tensor& weight,
                     const paddle::Tensor& bias, const paddle::Tensor& mean,
                     const paddle::Tensor& var, const char* op, const std::string& prefix) {
  check_channel_vector(weight, x, channels, op, prefix + "weight");
  check_channel_vector(bias, x, channels, op, prefix + "bias");
  check_channel_vector(mean, x, channels, op, prefix + "mean");
  check_channel_vector(var, x, channels, op, prefix + "var");
}

}  // namespace dpn_fast
