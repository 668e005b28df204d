#include "onednn_gemm.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
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

// How oneDNN packs one [n, k] weight on this CPU (packed_weight_bytes' comment).
struct PackedLayout {
  memory::desc desc;  // b [k, n], packed
  std::string impl;   // the implementation that picked it
  std::string name;   // impl and format tag: the identity a blob's header records
};

// oneDNN's tag of a 2-D format (b [k, n]: a = k, b = n), e.g. "BA16a64b": the dimensions from
// outermost to innermost (upper case if blocked), then the inner blocks.
std::string format_tag(const memory::desc& d) {
  const memory::dims strides = d.get_strides(), blocks = d.get_inner_blks(),
                     block_dims = d.get_inner_idxs();
  std::array<int, 2> order{0, 1};
  std::stable_sort(order.begin(), order.end(),
                   [&](int x, int y) { return strides[x] > strides[y]; });
  std::string tag;
  for (int dim : order) {
    const bool blocked = std::find(block_dims.begin(), block_dims.end(), dim) != block_dims.end();
    tag += char((blocked ? 'A' : 'a') + dim);
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    tag += std::to_string(blocks[i]) + char('a' + block_dims[i]);
  }
  return tag;
}

PackedLayout pick_packed_layout(int64_t n, int64_t k) {
  ScopedOmpThreads one_thread(1);  // the same choice whatever the caller's thread count
  const memory::desc any({k, n}, memory::data_type::f32, memory::format_tag::any);
  dnnl::matmul::primitive_desc desc(cpu_engine(), matrix(kPackReferenceRows, k, k), any,
                                    matrix(kPackReferenceRows, n, n));
  PackedLayout layout{desc.weights_desc(), desc.impl_info_str(), ""};
  layout.name = layout.impl + " " + format_tag(layout.desc);
  return layout;
}

// Never destroyed, like the GEMM cache.
const PackedLayout& packed_layout(int64_t n, int64_t k) {
  static auto* mutex = new std::mutex();
  static auto* layouts = new std::map<std::array<int64_t, 2>, PackedLayout>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = layouts->find({n, k});
  if (it == layouts->end()) it = layouts->emplace(std::array<int64_t, 2>{n, k},
                                                  pick_packed_layout(n, k)).first;
  return it->second;
}

// A blob's header: the layout's name (NUL-padded), n and k. 128 bytes, so the packed floats keep
// the blob's alignment.
struct PackedHeader {
  char layout[112];
  int64_t n, k;
};
static_assert(sizeof(PackedHeader) == 128, "the packed floats start 128 bytes into a blob");

memory::desc b_desc(const GemmShape& s) {
  switch (s.b_layout) {
    case BLayout::kTransposed:
      return memory::desc({s.k, s.n}, memory::data_type::f32, memory::dims{1, s.ldb});
    case BLayout::kPacked:
      return packed_layout(s.n, s.k).desc;
    default:
      return matrix(s.k, s.n, s.ldb);
  }
}

class GemmCache {
 public:
  std::shared_ptr<const CachedGemm> get(const GemmShape& s, int threads) {
    const GemmKey key{s.m,   s.n, s.k, s.lda, s.ldb, s.ldc, s.accumulate, int64_t(s.b_layout),
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
    dnnl::matmul::primitive_desc desc(cpu_engine(), matrix(s.m, s.k, s.lda), b_desc(s),
                                      matrix(s.m, s.n, s.ldc), attr);
    if (s.b_layout == BLayout::kPacked && packed_layout(s.n, s.k).impl != desc.impl_info_str()) {
      throw std::runtime_error(
          "dpn_fast: oneDNN runs the " + std::to_string(s.m) + "x" + std::to_string(s.k) + " x " +
          std::to_string(s.k) + "x" + std::to_string(s.n) + " GEMM on packed weights with " +
          desc.impl_info_str() + ", not " + packed_layout(s.n, s.k).impl +
          ", which chose their layout");
    }
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

int64_t packed_weight_bytes(int64_t n, int64_t k) {
  return int64_t(sizeof(PackedHeader) + packed_layout(n, k).desc.get_size());
}

void pack_weight(int64_t n, int64_t k, const float* w, int64_t ldw, uint8_t* blob) {
  const PackedLayout& layout = packed_layout(n, k);
  PackedHeader header{};
  if (layout.name.size() >= sizeof(header.layout)) {
    throw std::runtime_error("dpn_fast: packed layout name too long: " + layout.name);
  }
  std::memcpy(header.layout, layout.name.data(), layout.name.size());
  header.n = n;
  header.k = k;
  std::memcpy(blob, &header, sizeof(header));
  ScopedOmpThreads scoped(cpu_threads());
  const dnnl::engine& engine = cpu_engine();
  memory plain(memory::desc({k, n}, memory::data_type::f32, memory::dims{1, ldw}), engine,
               const_cast<float*>(w));
  memory packed(layout.desc, engine, blob + sizeof(header));
  dnnl::stream stream(engine);
  dnnl::reorder(plain, packed).execute(stream, plain, packed);
  stream.wait();
}

std::string packed_weight_mismatch(const uint8_t* blob, int64_t n, int64_t k) {
  PackedHeader header;
  std::memcpy(&header, blob, sizeof(header));
  const std::string packed_for(header.layout, strnlen(header.layout, sizeof(header.layout)));
  if (header.n != n || header.k != k) {
    return "it holds a packed [" + std::to_string(header.n) + ", " + std::to_string(header.k) +
           "] weight, expected [" + std::to_string(n) + ", " + std::to_string(k) + "]";
  }
  const std::string& here = packed_layout(n, k).name;
  if (packed_for != here) {
    return "it was packed for '" + packed_for + "', this CPU's oneDNN lays this weight out as '" +
           here + "'";
  }
  return "";
}

const float* packed_weight_data(const uint8_t* blob) {
  return reinterpret_cast<const float*>(blob + sizeof(PackedHeader));
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
  s.b_layout = b_transposed ? dpn_fast::BLayout::kTransposed : dpn_fast::BLayout::kPlain;
  return dpn_fast::gemm_impl_name(s);
}
