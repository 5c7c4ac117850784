// A whole GPTBigCode block for new positions over KV caches (a decode step, a verification pass, a
// batch of sequences) on CPU, in one call: LayerNorm, the qkv product, the cache store, attention,
// the output product with the residual, LayerNorm, the MLP with its GELU and residual. Activations
// are fp32; the dense weights fp32, bf16, int8 or int4. Op by op, a decode step was ~15 libtorch ops and 5
// thread wake-ups per layer, and one thread did the small ops while the other waited; here both
// threads run every step and wake once per block. The products are wizard_linear's and
// wizard_quantized_linear's kernels (dense.h) and attention the decode kernel's, so a position's bits do
// not depend on what else is in the call, or on whether it went through here or op by op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"
#include "cpu.h"
#include "dense.h"
#include "guard.h"
#include "parallel.h"
#include "vector_lanes.h"

// GCC 12's AVX-512 intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// One step of the block: its work in chunks that whichever thread is free claims. A thread goes on
// to the next step once every chunk of this one is done, by anyone, so no barrier counts threads: a
// thread that starts late finds the steps done and catches up.
class Step {
 public:
  Step(int64_t n, int64_t threads, int64_t grain, int64_t multiple) : n_(n), claims_(n, threads, grain, multiple) {}

  template <typename F>
  void run(const F& body) {
    for (int64_t begin, end; claims_.claim(begin, end);) {
      body(begin, end);
      done_.fetch_add(end - begin, std::memory_order_release);
    }
    for (int spins = 0; done_.load(std::memory_order_acquire) < n_; spins++) {
      if (spins < 4096)
        _mm_pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  const int64_t n_;
  wizard::GuidedClaims claims_;
  std::atomic<int64_t> done_{0};
};

// transformers' LayerNorm of one row, the moments in double.
void layer_norm(const float* x, const float* weight, const float* bias, int64_t dim, double eps, float* y) {
  double sum = 0.0;
  for (int64_t i = 0; i < dim; i++) sum += x[i];
  const double mean = sum / dim;
  double squares = 0.0;
  for (int64_t i = 0; i < dim; i++) squares += (x[i] - mean) * (x[i] - mean);
  const float inverse = static_cast<float>(1.0 / std::sqrt(squares / dim + eps));
  const float centre = static_cast<float>(mean);
  for (int64_t i = 0; i < dim; i++) y[i] = (x[i] - centre) * inverse * weight[i] + bias[i];
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

// GELU's tanh form, 0.5 x (1 + tanh(u)), written x / (1 + exp(-2u)): no cancellation where tanh(u)
// is near -1.
float gelu_tanh(float x) {
  const float u = kSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return x / (1.0f + std::exp(-2.0f * u));
}

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
using wizard::avx512::exp;
using wizard::avx512::Lanes;
#include "gelu_kernel.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using wizard::avx2::exp;
using wizard::avx2::Lanes;
#include "gelu_kernel.h"
}  // namespace avx2
#pragma GCC pop_options

// The MLP's activation: y[0, n) = GELU's tanh form, or the exact (erf) one, of x[0, n) (y may be x).
void gelu(const float* x, float* y, int64_t n, bool exact) {
  if (exact) {
    for (int64_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * static_cast<float>(M_SQRT1_2)));
  } else if (wizard::cpu::avx512()) {
    avx512::gelu_tanh(x, y, n);
  } else if (wizard::cpu::avx2()) {
    avx2::gelu_tanh(x, y, n);
  } else {
    for (int64_t i = 0; i < n; i++) y[i] = gelu_tanh(x[i]);
  }
}

bool plain_float(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided && t.is_contiguous();
}

// The block's parameters in checkpoint order: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
// mlp.c_proj, each weight then bias. The dense weights (kDense) are fp32 or bf16 [out, in], or an
// int8 or int4 weight's packed records (uint8).
constexpr int kParameters = 12;
const char* const kParameterNames[kParameters] = {
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",    "mlp.c_fc.bias",    "mlp.c_proj.weight",  "mlp.c_proj.bias"};
constexpr int kDense[4] = {2, 4, 8, 10};

bool is_dense(int i) { return std::find(std::begin(kDense), std::end(kDense), i) != std::end(kDense); }

bool is_packed_quantized(const at::Tensor& w) {
  return w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 1 && w.is_contiguous();
}

bool no_gradient(const at::Tensor& t) { return !(at::GradMode::is_enabled() && t.requires_grad()); }

// The product of dense parameter `i` ([out, in]) for `rows` rows; throws naming it when its
// quantized records do not hold that shape.
std::unique_ptr<wizard::RowProduct> product_of(const at::Tensor& w, const at::Tensor& bias, int i, int64_t rows,
                                               int64_t out, int64_t in) {
  const float* b = bias.data_ptr<float>();
  if (wizard::is_panel_weight(w)) {
    TORCH_CHECK(w.size(0) * 16 == out && w.size(1) == in, kParameterNames[i], " has panels ", w.sizes(),
                " for [", out, ", ", in, "]");
    return wizard::panel_row_product(w, b, rows);
  }
  if (!is_packed_quantized(w)) {
    TORCH_CHECK(w.sizes() == at::IntArrayRef({out, in}), kParameterNames[i], " has shape ", w.sizes(), ", expected [",
                out, ", ", in, "]");
    return wizard::dense_row_product(w, b, rows);
  }
  try {
    return wizard::quantized_row_product(w, b, rows, out, in);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string(kParameterNames[i]) + ": " + e.what());
  }
}

}  // namespace

extern "C" {

// Whether wizard_decode_block takes `x` with these parameters: fp32 contiguous CPU tensors that
// need no gradient, outside autocast, dense weights this CPU has a kernel for.
int wizard_decode_block_applies(void* x_handle, void** parameters) {
  const auto& x = *static_cast<at::Tensor*>(x_handle);
  bool applies = !at::autocast::is_autocast_enabled(at::kCPU) && plain_float(x) && no_gradient(x);
  for (int i = 0; applies && i < kParameters; i++) {
    const auto& p = *static_cast<at::Tensor*>(parameters[i]);
    applies = no_gradient(p) && (is_dense(i) ? is_packed_quantized(p) || wizard::dense_row_product(p, nullptr, 0)
                                             : plain_float(p));
  }
  return applies;
}

// `*result` = GELU's tanh form of `x`, as the block computes it, where `x` is a contiguous fp32 CPU
// tensor needing no gradient (a prefill's MLP); at::gelu otherwise.
int wizard_gelu_tanh(void* x_handle, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    if (!(plain_float(x) && no_gradient(x) && !at::autocast::is_autocast_enabled(at::kCPU))) {
      *result = new at::Tensor(at::gelu(x, "tanh"));
      return;
    }
    auto out = at::empty_like(x);
    const float* from = x.data_ptr<float>();
    float* to = out.data_ptr<float>();
    at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) {
      gelu(from + begin, to + begin, end - begin, false);
    });
    *result = new at::Tensor(std::move(out));
  });
}

// `*result` = the block applied to `x` (`[batch, new, d]`), whose rows are the sequences of caches
// [0, count) in order, as wizard_decode_attention takes them: the new keys and values are stored at
// positions lens[i].. (the caller advances the lengths) and position j attends over [0, lens[i] + j].
// c_attn's output is laid out as transformers splits it: [q | k | v] with one key/value head
// (multi-query), per head [q | k | v] with `heads` of them.
int wizard_decode_block(void* x_handle, void** parameters, int64_t heads, double eps, double scale, int exact_gelu,
                        void** key_caches, void** value_caches, const int64_t* lens, int64_t count, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto param = [&](int i) -> const at::Tensor& { return *static_cast<at::Tensor*>(parameters[i]); };
    TORCH_CHECK(wizard_decode_block_applies(x_handle, parameters),
                "fp32 CPU activations, norms and biases without gradients, dense weights with a kernel");
    TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1 && heads > 0 && x.size(2) % heads == 0,
                "x must be [batch, new, d], d a multiple of the heads");
    const int64_t batch = x.size(0), fresh = x.size(1), d = x.size(2), dim = d / heads;
    TORCH_CHECK(count > 0, "no caches");
    const int64_t kv_heads = static_cast<at::Tensor*>(key_caches[0])->size(1);
    TORCH_CHECK(kv_heads == 1 || kv_heads == heads, kv_heads, " key/value heads for ", heads);
    const int64_t qkv_dim = d + 2 * kv_heads * dim, inner = param(9).dim() == 1 ? param(9).size(0) : 0;
    // [out, in] of each parameter; a vector's is [out].
    const std::vector<int64_t> shapes[kParameters] = {{d},        {d},     {qkv_dim, d}, {qkv_dim}, {d, d},     {d},
                                                       {d},        {d},     {inner, d},   {inner},   {d, inner}, {d}};
    for (int i = 0; i < kParameters; i++)
      TORCH_CHECK(is_dense(i) || param(i).sizes() == at::IntArrayRef(shapes[i]), kParameterNames[i], " has shape ",
                  param(i).sizes(), ", expected ", at::IntArrayRef(shapes[i]));
    const int64_t positions = batch * fresh;
    const auto product = [&](int i) {
      return product_of(param(i), param(i + 1), i, positions, shapes[i][0], shapes[i][1]);
    };
    const auto qkv_product = product(2), out_product = product(4), up_product = product(8), down_product = product(10);
    const auto rows = wizard::cache_rows(key_caches, value_caches, lens, count, kv_heads, dim, fresh, batch);
    const auto ptr = [&](int i) { return param(i).data_ptr<float>(); };

    // Scratch: the normed input, qkv, attention, the residual stream after attention, the normed
    // stream, the MLP's hidden layer.
    auto scratch = at::empty({positions * (4 * d + qkv_dim + inner)}, x.options());
    float* normed = scratch.data_ptr<float>();
    float* qkv = normed + positions * d;
    float* attended = qkv + positions * qkv_dim;
    float* middle = attended + positions * d;
    float* normed_middle = middle + positions * d;
    float* hidden = normed_middle + positions * d;
    auto out = at::empty({batch, fresh, d}, x.options());
    const float* input = x.data_ptr<float>();
    float* output = out.data_ptr<float>();

    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const auto units_of = [&](const std::unique_ptr<wizard::RowProduct>& p) {
      return Step(p->units, threads, p->grain, p->multiple);
    };
    // Rows made ready for a product by a step of their own: none where it needs no preparing.
    const auto ready_for = [&](const std::unique_ptr<wizard::RowProduct>& p) {
      return Step(p->prepares() ? positions : 0, threads, 1, 1);
    };
    const auto tasks = [&](int64_t n) { return Step(n, threads, 1, 1); };
    const wizard::AttentionTasks attention_tasks(batch, heads, kv_heads, fresh, threads);
    Step norm_1 = tasks(positions), project_qkv = units_of(qkv_product), store = tasks(positions),
         attend = tasks(attention_tasks.count()), ready_attended = ready_for(out_product), project_out = units_of(out_product),
         norm_2 = tasks(positions), expand = units_of(up_product), ready_hidden = ready_for(down_product),
         contract = units_of(down_product);
    const auto query_at = [&](int64_t h) { return kv_heads == 1 ? h * dim : h * 3 * dim; };
    const auto key_at = [&](int64_t g) { return kv_heads == 1 ? d : g * 3 * dim + dim; };
    const float softmax_scale = static_cast<float>(scale);
    // `product` of rows of `from` into `to` (`out` columns) for units [begin, end); returns the columns.
    const auto multiply = [](const std::unique_ptr<wizard::RowProduct>& product, const float* from, float* to,
                             int64_t out, int64_t begin, int64_t end) {
      product->run(from, to, begin, end);
      return product->columns(begin, end, out);
    };
    // Norms rows [begin, end) of `from` into `to` and readies them for `next`.
    const auto norm = [&](const float* from, int weight, float* to, wizard::RowProduct& next, int64_t begin,
                          int64_t end) {
      for (int64_t m = begin; m < end; m++) {
        layer_norm(from + m * d, ptr(weight), ptr(weight + 1), d, eps, to + m * d);
        if (next.prepares()) next.prepare(to + m * d, m);
      }
    };

    const auto run = [&] {
      norm_1.run([&](int64_t begin, int64_t end) { norm(input, 0, normed, *qkv_product, begin, end); });
      project_qkv.run([&](int64_t begin, int64_t end) { multiply(qkv_product, normed, qkv, qkv_dim, begin, end); });
      store.run([&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; m++) {
          const wizard::CacheRow& row = rows[m / fresh];
          for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t at = (g * row.capacity + row.past + m % fresh) * dim;
            std::copy_n(qkv + m * qkv_dim + key_at(g), dim, row.keys + at);
            std::copy_n(qkv + m * qkv_dim + key_at(g) + dim, dim, row.values + at);
          }
        }
      });
      attend.run([&](int64_t begin, int64_t end) {
        thread_local std::vector<float> scores;
        for (int64_t i = begin; i < end; i++) {
          const wizard::AttentionTasks::Task task = attention_tasks.at(i);
          const int64_t m = task.sequence * fresh + task.position;
          wizard::attend_task(task, rows[task.sequence], dim, qkv + m * qkv_dim + query_at(task.first_head),
                              query_at(1) - query_at(0), softmax_scale, scores,
                              attended + m * d + task.first_head * dim);
        }
      });
      ready_attended.run([&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; m++) out_product->prepare(attended + m * d, m);
      });
      project_out.run([&](int64_t begin, int64_t end) {
        const auto [first, last] = multiply(out_product, attended, middle, d, begin, end);
        for (int64_t m = 0; m < positions; m++)
          for (int64_t c = first; c < last; c++) middle[m * d + c] += input[m * d + c];
      });
      norm_2.run([&](int64_t begin, int64_t end) { norm(middle, 6, normed_middle, *up_product, begin, end); });
      expand.run([&](int64_t begin, int64_t end) {
        const auto [first, last] = multiply(up_product, normed_middle, hidden, inner, begin, end);
        for (int64_t m = 0; m < positions; m++) {
          float* row = hidden + m * inner + first;
          gelu(row, row, last - first, exact_gelu != 0);
        }
      });
      ready_hidden.run([&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; m++) down_product->prepare(hidden + m * inner, m);
      });
      contract.run([&](int64_t begin, int64_t end) {
        const auto [first, last] = multiply(down_product, hidden, output, d, begin, end);
        for (int64_t m = 0; m < positions; m++)
          for (int64_t c = first; c < last; c++) output[m * d + c] += middle[m * d + c];
      });
    };
    if (threads > 1)
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { run(); });
    else
      run();
    *result = new at::Tensor(std::move(out));
  });
}
}
