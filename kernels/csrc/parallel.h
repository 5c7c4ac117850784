// Splitting a product's output columns among the threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace wizard {

// Chunks per thread: enough that a thread which starts late or runs slow (a VM's vCPU, a thread
// waking from sleep) takes fewer, few enough that claiming them costs nothing.
constexpr int64_t kChunksPerThread = 8;
// Chunks are a multiple of every kernel's column tile (6 and 2 dense, 4 and 1 int8).
constexpr int64_t kChunkMultiple = 12;

// `body(begin, end)` over columns [0, n) on libtorch's threads, in chunks each thread claims when it
// is free. A fixed split (at::parallel_for's) made the faster thread wait for the slower at the end
// of every product: a decode step is ~50 products of 30-100 us each. Each column is computed whole
// by one call, so results do not depend on the split. At most `grain` columns stay on one thread;
// a chunk is at least a quarter of that and a multiple of `multiple`.
template <typename F>
void balanced_for(int64_t n, int64_t grain, const F& body, int64_t multiple = kChunkMultiple) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  int64_t chunk = std::max({int64_t{1}, grain / 4, n / (threads * kChunksPerThread)});
  chunk = (chunk + multiple - 1) / multiple * multiple;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, (n + chunk - 1) / chunk), 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
      body(begin, std::min(n, begin + chunk));
  });
}

}  // namespace wizard
