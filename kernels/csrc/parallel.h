// Splitting a product's output columns among the threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace wizard {

// The smallest chunk is this fraction of a thread's share: small enough that the thread which
// finishes first waits little for the other at the end of a product, large enough that claiming
// costs nothing.
constexpr int64_t kTailChunksPerThread = 64;
// Chunks are a multiple of every kernel's column tile (6 and 2 dense, 4 and 1 int8).
constexpr int64_t kChunkMultiple = 12;

// `body(begin, end)` over columns [0, n) on libtorch's threads, in chunks each thread claims when it
// is free, each half of what remains per thread (guided scheduling), down to a tail chunk. A fixed
// split (at::parallel_for's) made the faster thread wait for the slower at the end of every product
// (a decode step is ~50 products of 30-100 us each), and so did equal chunks, by half a chunk on
// average. Each column is computed whole by one call, so results do not depend on the split. At most
// `grain` columns stay on one thread; a chunk is at least a quarter of that and a multiple of `multiple`.
template <typename F>
void balanced_for(int64_t n, int64_t grain, const F& body, int64_t multiple = kChunkMultiple) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  const auto round_up = [multiple](int64_t columns) { return (columns + multiple - 1) / multiple * multiple; };
  const int64_t tail = round_up(std::max({int64_t{1}, grain / 4, n / (threads * kTailChunksPerThread)}));
  std::atomic<int64_t> next{0};
  // Claims [begin, end) from `next`; false when nothing is left.
  const auto claim = [&](int64_t& begin, int64_t& end) {
    begin = next.load(std::memory_order_relaxed);
    do {
      if (begin >= n) return false;
      end = std::min(n, begin + std::max(tail, round_up((n - begin) / (2 * threads))));
    } while (!next.compare_exchange_weak(begin, end, std::memory_order_relaxed));
    return true;
  };
  at::parallel_for(0, std::min(threads, (n + tail - 1) / tail), 1, [&](int64_t, int64_t) {
    for (int64_t begin, end; claim(begin, end);) body(begin, end);
  });
}

}  // namespace wizard
