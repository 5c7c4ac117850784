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

// `out` = softmax(scale * query . keys[t]) weighted sum of values[t] over t in [0, count) (rows of
// `dim`), summed in a fixed order; `scores` holds `count` floats of scratch.
void attend(const float* query, const float* keys, const float* values, int64_t count, int64_t dim, float scale,
            float* scores, float* out);

}  // namespace wizard
