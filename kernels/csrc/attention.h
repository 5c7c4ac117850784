// Decode attention's pieces that the fused decode block shares (csrc/attention.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace wizard {

// Where one cached sequence's keys and values live (`[kv_heads, capacity, dim]` each) and how many
// positions it held before this call.
struct CacheRow {
  float* keys;
  float* values;
  int64_t past;
  int64_t capacity;
};

// One row per cached sequence of caches [0, count): key_caches[i] and value_caches[i] are contiguous
// fp32 `[b_i, kv_heads, capacity, dim]` tensors holding lens[i] positions, each with room for
// `fresh` more; the rows must number `batch`. Throws, naming the cache, on anything else.
std::vector<CacheRow> cache_rows(void** key_caches, void** value_caches, const int64_t* lens, int64_t count,
                                 int64_t kv_heads, int64_t dim, int64_t fresh, int64_t batch);

// A call's attention in tasks of one sequence, one key/value group, some of its heads and one new
// position, in that order (neighbouring tasks read the same keys and values). A group's heads are
// split only as far as it takes to give every thread work, since a task streams its group's keys and
// values once.
class AttentionTasks {
 public:
  struct Task {
    int64_t sequence, group, first_head, heads, position;
  };
  AttentionTasks(int64_t sequences, int64_t heads, int64_t kv_heads, int64_t fresh, int64_t threads);
  int64_t count() const { return sequences_ * kv_heads_ * parts_ * fresh_; }
  // What task `i` of count() covers.
  Task at(int64_t i) const;

 private:
  int64_t sequences_, kv_heads_, fresh_, group_, chunk_, parts_;
};

// For each of `task`'s heads h, the weighted sum of its sequence's values (cache `row`: the positions
// before the task's and its own) by softmax(scale * query_h . keys[t]), query_h = query + h *
// query_stride, into rows of `dim` at `out`. A head's bits depend on nothing but its own inputs
// (fixed orders of summation), whichever heads share the task. `scores` is scratch.
void attend_task(const AttentionTasks::Task& task, const CacheRow& row, int64_t dim, const float* query,
                 int64_t query_stride, float scale, std::vector<float>& scores, float* out);

// scores[t] = exp(scores[t] - their largest) for t in [0, count), count >= 1; returns 1 / their sum
// (NaN where a score is NaN). With the widest instructions this CPU has.
float softmax_row(float* scores, int64_t count);

}  // namespace wizard
