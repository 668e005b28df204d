// Thread count of the CPU cores' OpenMP regions (framework-free; shared by all ops).
#pragma once
#include <omp.h>

#include <cstdlib>

namespace dpn_fast {

// Threads of the OpenMP regions: DPN_FAST_NUM_THREADS, else Paddle's CPU thread setting (the
// library shares Paddle's libiomp5, whose default Paddle sets from FLAGS_paddle_num_threads = 1,
// or Paddle Inference from set_cpu_math_library_num_threads). Staying within Paddle's budget
// matters on small machines: with another busy process on one of 2 cores, a 2-thread region
// waits for its descheduled half and ran 2-5x slower than 1 thread.
inline int cpu_threads() {
  static const int requested = [] {
    const char* env = std::getenv("DPN_FAST_NUM_THREADS");
    return env ? std::atoi(env) : 0;
  }();
  return requested > 0 ? requested : omp_get_max_threads();
}

}  // namespace dpn_fast
