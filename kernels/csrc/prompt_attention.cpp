// Causal attention of a prompt chunk for grouped (multi-query) keys, in fp32 on the CPU. libtorch's
// flash kernel takes one head at a time in 64 x 512 blocks (a d768 model's 512-token prompt: 4.3 ms a
// layer on two cores); here a block of positions times a key/value group's heads is one matrix, whose
// scores against every key it may see are one BLAS product and whose weighted values are another.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "attention.h"
#include "guard.h"

namespace {

// Rows (positions times heads) per block: its scores stay in L2 beside the keys and values.
constexpr int64_t kBlockRows = 256;

bool usable(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided && t.dim() == 4 &&
         (t.stride(3) == 1 || t.size(3) == 1);
}

// `rows` x `columns` fp32 at `data` with rows `stride` apart, as a tensor that does not own it.
at::Tensor matrix(const float* data, int64_t rows, int64_t columns, int64_t stride) {
  return at::from_blob(const_cast<float*>(data), {rows, columns}, {stride, 1}, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

extern "C" {

// `*result` = causal attention of `query` (`[batch, heads, len, dim]`, the last `len` of `k_len`
// positions) over `key` and `value` (`[batch, kv_heads, k_len, dim]`), as `[batch, len, heads * dim]`:
// query position i sees keys [0, k_len - len + i]. Any strides with `dim` contiguous.
int wizard_prompt_attention(void* query_handle, void* key_handle, void* value_handle, double scale, void** result) {
  return wizard::guarded([&] {
    const auto& query = *static_cast<at::Tensor*>(query_handle);
    const auto& key = *static_cast<at::Tensor*>(key_handle);
    const auto& value = *static_cast<at::Tensor*>(value_handle);
    TORCH_CHECK(usable(query) && usable(key) && usable(value),
                "prompt attention: fp32 CPU tensors of 4 dimensions, the last contiguous");
    const int64_t batch = query.size(0), heads = query.size(1), len = query.size(2), dim = query.size(3);
    const int64_t kv_heads = key.size(1), k_len = key.size(2);
    TORCH_CHECK(key.size(0) == batch && key.size(3) == dim && value.sizes() == key.sizes() && kv_heads > 0 &&
                    heads % kv_heads == 0 && len >= 1 && k_len >= len,
                "prompt attention: query [batch, heads, len, dim] over keys and values [batch, kv_heads, k_len, dim]");
    const int64_t group = heads / kv_heads, past = k_len - len;
    const int64_t block = std::max<int64_t>(1, kBlockRows / group), blocks = (len + block - 1) / block;
    const int64_t lanes = batch * kv_heads, items = blocks * lanes;
    auto out = at::empty({batch, len, heads * dim}, query.options());
    const float* q = query.data_ptr<float>();
    const float* k = key.data_ptr<float>();
    const float* v = value.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const int64_t q_batch = query.stride(0), q_head = query.stride(1), q_position = query.stride(2);
    const int64_t k_batch = key.stride(0), k_head = key.stride(1), k_row = key.stride(2);
    const int64_t v_batch = value.stride(0), v_head = value.stride(1), v_row = value.stride(2);
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      std::vector<float> queries, scores, weighted;
      // The last blocks first: they see the most keys, so the threads finish close together.
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        const int64_t first = (blocks - 1 - i / lanes) * block, lane = i % lanes;
        const int64_t b = lane / kv_heads, g = lane % kv_heads;
        const int64_t count = std::min(block, len - first), rows = count * group, seen = past + first + count;
        queries.resize(rows * dim);
        scores.resize(rows * seen);
        weighted.resize(rows * dim);
        // Row p * group + h: position first + p of head g * group + h, scaled.
        for (int64_t p = 0; p < count; p++)
          for (int64_t h = 0; h < group; h++) {
            const float* from = q + b * q_batch + (g * group + h) * q_head + (first + p) * q_position;
            float* to = queries.data() + (p * group + h) * dim;
            for (int64_t d = 0; d < dim; d++) to[d] = from[d] * static_cast<float>(scale);
          }
        const float* keys = k + b * k_batch + g * k_head;
        const float* values = v + b * v_batch + g * v_head;
        auto score_matrix = matrix(scores.data(), rows, seen, seen);
        at::mm_out(score_matrix, matrix(queries.data(), rows, dim, dim), matrix(keys, seen, dim, k_row).t());
        for (int64_t r = 0; r < rows; r++) {
          float* row = scores.data() + r * seen;
          const int64_t visible = past + first + r / group + 1;
          const float inverse = wizard::softmax_row(row, visible);
          for (int64_t t = 0; t < visible; t++) row[t] *= inverse;
          std::fill(row + visible, row + seen, 0.0f);
        }
        auto weighted_matrix = matrix(weighted.data(), rows, dim, dim);
        at::mm_out(weighted_matrix, score_matrix, matrix(values, seen, dim, v_row));
        for (int64_t p = 0; p < count; p++)
          std::copy_n(weighted.data() + p * group * dim, group * dim,
                      o + ((b * len + first + p) * heads + g * group) * dim);
      }
    });
    *result = new at::Tensor(std::move(out));
  });
}
}
