#include "onednn_gemm.h"

#include <omp.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

// Headers of oneDNN 3.2 (onednn-devel-cpu-gomp) against Paddle's 3.6 library: their config turns
// on the experimental sparse API, whose *_v2 entry points Paddle's build does not export.
#include <oneapi/dnnl/dnnl_config.h>
#undef DNNL_EXPERIMENTAL_SPARSE
#include <oneapi/dnnl/dnnl.hpp>

#include "cpu_threads.h"

namespace dpn_fast {
namespace {

using dnnl::memory;

struct CachedGemm {
  dnnl::matmul::primitive_desc desc;
  dnnl::matmul primitive;
};

// oneDNN sizes its parallel decomposition at creation from the OpenMP thread count, so the
// count is part of the key, and creation and execution run with the same count.
using GemmKey = std::array<int64_t, 10>;

class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) {
    if (threads != saved_) omp_set_num_threads(threads);
  }
  ~ScopedOmpThreads() {
    if (omp_get_max_threads() != saved_) omp_set_num_threads(saved_);
  }

 private:
  const int saved_;
};

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc matrix(int64_t rows, int64_t cols, int64_t ld) {
  return memory::desc({rows, cols}, memory::data_type::f32, memory::dims{ld, 1});
}

// A [1, n] per-column operand of a binary post-op.
memory::desc column_vector(int64_t n) { return matrix(1, n, n); }

class GemmCache {
 public:
  std::shared_ptr<const CachedGemm> get(const GemmShape& s, int threads) {
    const GemmKey key{s.m, s.n, s.k, s.lda, s.ldb, s.ldc, s.accumulate, s.b_transposed,
                      s.scale_shift_relu, threads};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    dnnl::post_ops post_ops;
    if (s.accumulate) post_ops.append_sum(1.0f);
    if (s.scale_shift_relu) {
      post_ops.append_binary(dnnl::algorithm::binary_mul, column_vector(s.n));
      post_ops.append_binary(dnnl::algorithm::binary_add, column_vector(s.n));
      post_ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    }
    dnnl::primitive_attr attr;
    attr.set_post_ops(post_ops);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: safe across threads
    const memory::desc b = s.b_transposed ? memory::desc({s.k, s.n}, memory::data_type::f32,
                                                         memory::dims{1, s.ldb})
                                          : matrix(s.k, s.n, s.ldb);
    dnnl::matmul::primitive_desc desc(cpu_engine(), matrix(s.m, s.k, s.lda), b,
                                      matrix(s.m, s.n, s.ldc), attr);
    auto entry = std::make_shared<const CachedGemm>(CachedGemm{desc, dnnl::matmul(desc)});
    cache_.emplace(key, entry);
    return entry;
  }

 private:
  std::mutex mutex_;
  std::map<GemmKey, std::shared_ptr<const CachedGemm>> cache_;
};

// Never destroyed: ops may still run during interpreter shutdown, after static destructors.
GemmCache& cache() {
  static auto* instance = new GemmCache();
  return *instance;
}

}  // namespace

void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c, const float* scale,
              const float* shift) {
  const int threads = cpu_threads();
  ScopedOmpThreads scoped(threads);
  const auto gemm = cache().get(s, threads);
  thread_local std::vector<uint8_t> scratchpad;
  const size_t scratch_bytes = gemm->desc.scratchpad_desc().get_size();
  if (scratchpad.size() < scratch_bytes) scratchpad.resize(scratch_bytes);
  thread_local dnnl::stream stream(cpu_engine());
  const dnnl::engine& engine = cpu_engine();
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(gemm->desc.src_desc(), engine, const_cast<float*>(a))},
      {DNNL_ARG_WEIGHTS, memory(gemm->desc.weights_desc(), engine, const_cast<float*>(b))},
      {DNNL_ARG_DST, memory(gemm->desc.dst_desc(), engine, c)},
      {DNNL_ARG_SCRATCHPAD, memory(gemm->desc.scratchpad_desc(), engine, scratchpad.data())}};
  if (s.scale_shift_relu) {
    // The sum post-op, when present, comes first: the binary operands' indices follow it.
    const int first = s.accumulate ? 1 : 0;
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(first) | DNNL_ARG_SRC_1,
                 memory(column_vector(s.n), engine, const_cast<float*>(scale)));
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(first + 1) | DNNL_ARG_SRC_1,
                 memory(column_vector(s.n), engine, const_cast<float*>(shift)));
  }
  gemm->primitive.execute(stream, args);
  stream.wait();
}

const char* gemm_impl_name(const GemmShape& s) {
  const int threads = cpu_threads();
  ScopedOmpThreads scoped(threads);
  return cache().get(s, threads)->desc.impl_info_str();
}

}  // namespace dpn_fast

// c[m, n] = a[m, k] x b[k, n] on the caller's row-major buffers, through gemm_f32: for timing
// this machine's GEMM rate from outside the library (benchmarks/bench_dpn_block.py).
extern "C" void dpn_fast_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, const float* b,
                                  float* c) {
  dpn_fast::gemm_f32(dpn_fast::GemmShape{m, n, k, k, n, n, false}, a, b, c);
}

// b_transposed: b given as [n, k] (a channels-last 1x1 convolution's weight).
extern "C" const char* dpn_fast_gemm_impl(int64_t m, int64_t n, int64_t k, int b_transposed) {
  dpn_fast::GemmShape s{m, n, k, k, b_transposed ? k : n, n, false};
  s.b_transposed = b_transposed != 0;
  return dpn_fast::gemm_impl_name(s);
}
