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
using GemmKey = std::array<int64_t, 12>;

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

memory::desc matrix(int64_t rows, int64_t cols, int64_t ld,
                    memory::data_type type = memory::data_type::f32) {
  return memory::desc({rows, cols}, type, memory::dims{ld, 1});
}

memory::data_type operand_type(bool bf16) {
  return bf16 ? memory::data_type::bf16 : memory::data_type::f32;
}

// b [k, n] given as a weight w [n, k] with row stride ld. With k == 1 the k stride means nothing,
// and oneDNN misreads {1, ld} (its brgemm matmul gave wrong results): it gets a stride that
// orders the dimensions the same way instead.
memory::desc transposed_weight(int64_t k, int64_t n, int64_t ld, memory::data_type type) {
  return memory::desc({k, n}, type, memory::dims{k == 1 ? n * ld : 1, ld});
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

constexpr const char* kBf16NameSuffix = " bf16";

PackedLayout pick_packed_layout(int64_t n, int64_t k, bool bf16) {
  ScopedOmpThreads one_thread(1);  // the same choice whatever the caller's thread count
  const memory::desc any({k, n}, operand_type(bf16), memory::format_tag::any);
  dnnl::matmul::primitive_desc desc(cpu_engine(),
                                    matrix(kPackReferenceRows, k, k, operand_type(bf16)), any,
                                    matrix(kPackReferenceRows, n, n));
  PackedLayout layout{desc.weights_desc(), desc.impl_info_str(), ""};
  layout.name = layout.impl + " " + format_tag(layout.desc) + (bf16 ? kBf16NameSuffix : "");
  return layout;
}

// Never destroyed, like the GEMM cache.
const PackedLayout& packed_layout(int64_t n, int64_t k, bool bf16) {
  static auto* mutex = new std::mutex();
  static auto* layouts = new std::map<std::array<int64_t, 3>, PackedLayout>();
  std::lock_guard<std::mutex> lock(*mutex);
  const std::array<int64_t, 3> key{n, k, bf16};
  auto it = layouts->find(key);
  if (it == layouts->end()) it = layouts->emplace(key, pick_packed_layout(n, k, bf16)).first;
  return it->second;
}

// oneDNN runs a bf16 matmul on bf16 instructions with these implementations; anything else
// (reference loops, `gemm:` with bf16 emulated in float32) is slower than the float32 matmul.
bool runs_on_bf16_instructions(const std::string& impl) {
  return impl.rfind("brg", 0) == 0 &&
         (impl.find("_bf16") != std::string::npos || impl.find("amx") != std::string::npos);
}

// A DPN-sized shape: the check does not depend on it, as long as oneDNN has a kernel for it.
constexpr int64_t kBf16ProbeChannels = 256;

std::string find_bf16_gemm_unsupported_reason() {
  std::string found;
  try {
    const std::string impl = packed_layout(kBf16ProbeChannels, kBf16ProbeChannels, true).impl;
    if (runs_on_bf16_instructions(impl)) return "";
    found = "oneDNN's bf16 matmul would run as '" + impl + "', slower than float32";
  } catch (const std::exception&) {
    found = "oneDNN has no bf16 matmul for it";
  }
  return "bf16 GEMMs need AVX512_BF16 or AMX-BF16; this CPU has neither (" + found + ")";
}

// A blob's header: the layout's name (NUL-padded), n and k. 128 bytes, so the packed values keep
// the blob's alignment.
struct PackedHeader {
  char layout[112];
  int64_t n, k;
};
static_assert(sizeof(PackedHeader) == kPackedHeaderBytes,
              "the packed values start kPackedHeaderBytes into a blob");

memory::desc b_desc(const GemmShape& s) {
  switch (s.b_layout) {
    case BLayout::kTransposed:
      return transposed_weight(s.k, s.n, s.ldb, memory::data_type::f32);
    case BLayout::kPacked:
      return packed_layout(s.n, s.k, s.bf16).desc;
    default:
      return matrix(s.k, s.n, s.ldb);
  }
}

class GemmCache {
 public:
  std::shared_ptr<const CachedGemm> get(const GemmShape& s, int threads) {
    const GemmKey key{s.m,   s.n, s.k, s.lda, s.ldb, s.ldc, s.accumulate, int64_t(s.b_layout),
                      s.scale_shift_relu, s.bf16, s.c_bf16, threads};
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
    if (s.bf16 && s.b_layout != BLayout::kPacked) {
      throw std::runtime_error("dpn_fast: bf16 GEMMs run on packed weights only");
    }
    if (s.c_bf16 && !s.bf16) throw std::runtime_error("dpn_fast: a bf16 c needs bf16 operands");
    dnnl::matmul::primitive_desc desc(cpu_engine(),
                                      matrix(s.m, s.k, s.lda, operand_type(s.bf16)), b_desc(s),
                                      matrix(s.m, s.n, s.ldc, operand_type(s.c_bf16)), attr);
    if (s.b_layout == BLayout::kPacked &&
        packed_layout(s.n, s.k, s.bf16).impl != desc.impl_info_str()) {
      throw std::runtime_error(
          "dpn_fast: oneDNN runs the " + std::to_string(s.m) + "x" + std::to_string(s.k) + " x " +
          std::to_string(s.k) + "x" + std::to_string(s.n) + " GEMM on packed weights with " +
          desc.impl_info_str() + ", not " + packed_layout(s.n, s.k, s.bf16).impl +
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

// a, b: float or Bf16 as s.bf16 says; c as s.c_bf16 says.
void run_gemm(const GemmShape& s, const void* a, const void* b, void* c, const float* scale,
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
      {DNNL_ARG_SRC, memory(gemm->desc.src_desc(), engine, const_cast<void*>(a))},
      {DNNL_ARG_WEIGHTS, memory(gemm->desc.weights_desc(), engine, const_cast<void*>(b))},
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

}  // namespace

void gemm_f32(const GemmShape& s, const float* a, const float* b, float* c, const float* scale,
              const float* shift) {
  if (s.bf16) throw std::runtime_error("dpn_fast: gemm_f32 on a bf16 shape");
  run_gemm(s, a, b, c, scale, shift);
}

void gemm_bf16(const GemmShape& s, const Bf16* a, const Bf16* b, float* c, const float* scale,
               const float* shift) {
  if (!s.bf16 || s.c_bf16) {
    throw std::runtime_error("dpn_fast: gemm_bf16 with a float c on another shape");
  }
  run_gemm(s, a, b, c, scale, shift);
}

void gemm_bf16(const GemmShape& s, const Bf16* a, const Bf16* b, Bf16* c, const float* scale,
               const float* shift) {
  if (!s.c_bf16) throw std::runtime_error("dpn_fast: gemm_bf16 with a bf16 c on another shape");
  run_gemm(s, a, b, c, scale, shift);
}

const char* gemm_impl_name(const GemmShape& s) {
  const int threads = cpu_threads();
  ScopedOmpThreads scoped(threads);
  return cache().get(s, threads)->desc.impl_info_str();
}

int64_t packed_weight_bytes(int64_t n, int64_t k, bool bf16) {
  return int64_t(sizeof(PackedHeader) + packed_layout(n, k, bf16).desc.get_size());
}

std::string bf16_gemm_unsupported_reason() {
  static const std::string reason = find_bf16_gemm_unsupported_reason();
  return reason;
}

void pack_weight(int64_t n, int64_t k, const float* w, int64_t ldw, uint8_t* blob, bool bf16) {
  if (bf16 && !bf16_gemm_unsupported_reason().empty()) {
    throw std::runtime_error("dpn_fast: " + bf16_gemm_unsupported_reason());
  }
  const PackedLayout& layout = packed_layout(n, k, bf16);
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
  // bf16: rounded here rather than by oneDNN's reorder, whose rounding of denormals follows the
  // instructions it picks.
  std::vector<Bf16> rounded(bf16 ? n * k : 0);
  for (int64_t i = 0; i < int64_t(rounded.size()); ++i) {
    rounded[i] = round_to_bf16(w[i / k * ldw + i % k]);
  }
  memory plain(transposed_weight(k, n, bf16 ? k : ldw, operand_type(bf16)), engine,
               bf16 ? static_cast<void*>(rounded.data()) : const_cast<float*>(w));
  memory packed(layout.desc, engine, blob + sizeof(header));
  dnnl::stream stream(engine);
  dnnl::reorder(plain, packed).execute(stream, plain, packed);
  stream.wait();
}

bool packed_weight_is_bf16(const uint8_t* blob) {
  PackedHeader header;
  std::memcpy(&header, blob, sizeof(header));
  const std::string name(header.layout, strnlen(header.layout, sizeof(header.layout)));
  const std::string suffix = kBf16NameSuffix;
  return name.size() > suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string packed_weight_mismatch(const uint8_t* blob, int64_t n, int64_t k, bool bf16) {
  PackedHeader header;
  std::memcpy(&header, blob, sizeof(header));
  const std::string packed_for(header.layout, strnlen(header.layout, sizeof(header.layout)));
  if (header.n != n || header.k != k) {
    return "it holds a packed [" + std::to_string(header.n) + ", " + std::to_string(header.k) +
           "] weight, expected [" + std::to_string(n) + ", " + std::to_string(k) + "]";
  }
  const std::string& here = packed_layout(n, k, bf16).name;
  if (packed_for != here) {
    return "it was packed for '" + packed_for + "', this CPU's oneDNN lays this weight out as '" +
           here + "'";
  }
  return "";
}

const void* packed_weight_data(const uint8_t* blob) { return blob + sizeof(PackedHeader); }

}  // namespace dpn_fast

// c[m, n] = a[m, k] x b[k, n] on the caller's row-major buffers, through gemm_f32: for timing
// this machine's GEMM rate from outside the library (benchmarks/bench_dpn_block.py).
extern "C" void dpn_fast_gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, const float* b,
                                  float* c) {
  dpn_fast::gemm_f32(dpn_fast::GemmShape{m, n, k, k, n, n, false}, a, b, c);
}

// c[m, n] = a[m, k] x w[n, k]^T in bf16 (a's bf16 bit patterns; w packed as bf16 by
// dpn_fast_pack_1x1_weight, blob included), through gemm_bf16: the bf16 counterpart of
// dpn_fast_gemm_f32. Returns "" or why the blob cannot be used here.
extern "C" const char* dpn_fast_gemm_bf16_packed(int64_t m, int64_t n, int64_t k,
                                                 const uint16_t* a, const uint8_t* blob,
                                                 float* c) {
  thread_local std::string error;
  error = dpn_fast::packed_weight_is_bf16(blob) ? dpn_fast::packed_weight_mismatch(blob, n, k, true)
                                                : "the blob holds float32 weights";
  if (!error.empty()) return error.c_str();
  dpn_fast::GemmShape s{m, n, k, k, k, n, false};
  s.b_layout = dpn_fast::BLayout::kPacked;
  s.bf16 = true;
  dpn_fast::gemm_bf16(s, a, static_cast<const dpn_fast::Bf16*>(dpn_fast::packed_weight_data(blob)),
                      c);
  return "";
}

// The implementation a [m, k] x [k, n] GEMM gets: b_layout 0 plain, 1 transposed (b given as
// [n, k], a channels-last 1x1 convolution's weight), 2 packed (as the compiled engine runs it);
// bf16 (packed only). A shape oneDNN refuses answers "error: " and why.
extern "C" const char* dpn_fast_gemm_impl(int64_t m, int64_t n, int64_t k, int b_layout, int bf16) {
  thread_local std::string name;
  dpn_fast::GemmShape s{m, n, k, k, b_layout == 0 ? n : k, n, false};
  s.b_layout = b_layout == 0   ? dpn_fast::BLayout::kPlain
               : b_layout == 1 ? dpn_fast::BLayout::kTransposed
                               : dpn_fast::BLayout::kPacked;
  s.bf16 = bf16 != 0;
  try {
    name = dpn_fast::gemm_impl_name(s);
  } catch (const std::exception& e) {
    name = std::string("error: ") + e.what();
  }
  return name.c_str();
}

// 1 if oneDNN runs bf16 GEMMs on this CPU's bf16 instructions (dpn_fast_pack_1x1_weight with bf16
// works), else 0 (`dpn-fast info`).
extern "C" int dpn_fast_bf16_gemm_supported(void) {
  return dpn_fast::bf16_gemm_unsupported_reason().empty() ? 1 : 0;
}
