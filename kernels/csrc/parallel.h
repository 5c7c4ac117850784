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
// Chunks are a multiple of every kernel's column tile (6 and 3 dense, 4 and 1 int8).
constexpr int64_t kChunkMultiple = 12;

// Chunks of [0, n) for `threads` threads to claim when they are free, each half of what remains per
// thread (guided scheduling), down to a tail chunk: at least a quarter of `grain`, a fixed fraction of
// a thread's share, and a multiple of `multiple`.
class GuidedClaims {
 public:
  GuidedClaims(int64_t n, int64_t threads, int64_t grain, int64_t multiple)
      : n_(n),
        threads_(std::max<int64_t>(threads, 1)),
        multiple_(multiple),
        tail_(round_up(std::max({int64_t{1}, grain / 4, n / (threads_ * kTailChunksPerThread)}))) {}

  int64_t tail() const { return tail_; }

  // Claims [begin, end); false when nothing is left.
  bool claim(int64_t& begin, int64_t& end) {
    begin = next_.load(std::memory_order_relaxed);
    do {
      if (begin >= n_) return false;
      end = std::min(n_, begin + std::max(tail_, round_up((n_ - begin) / (2 * threads_))));
    } while (!next_.compare_exchange_weak(begin, end, std::memory_order_relaxed));
    return true;
  }

 private:
  int64_t round_up(int64_t columns) const { return (columns + multiple_ - 1) / multiple_ * multiple_; }

  const int64_t n_, threads_, multiple_, tail_;
  std::atomic<int64_t> next_{0};
};

// `body(begin, end)` over columns [0, n) on libtorch's threads, in GuidedClaims' chunks. A fixed
// split (at::parallel_for's) made the faster thread wait for the slower at the end of every product
// (a decode step is ~50 products of 30-100 us each), and so did equal chunks, by half a chunk on
// average. Each column is computed whole by one call, so results do not depend on the split. At most
// `grain` columns stay on one thread.
template <typename F>
void balanced_for(int64_t n, int64_t grain, const F& body, int64_t multiple = kChunkMultiple) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || at::in_parallel_region()) {
    if (n > 0) body(0, n);
    return;
  }
  GuidedClaims claims(n, threads, grain, multiple);
  at::parallel_for(0, std::min(threads, (n + claims.tail() - 1) / claims.tail()), 1, [&](int64_t, int64_t) {
    for (int64_t begin, end; claims.claim(begin, end);) body(begin, end);
  });
}

}  // namespace wizard
