// `x @ w^T + b` for the few rows of a decode step or a speculative verification pass, fp32 on CPU.
// BLAS packs the weight for every call with more than one row, so scoring 5 tokens costs about 3
// one-row products; this kernel streams each weight row once for up to 4 input rows at a time, so a
// few rows cost little more than one. Every output element is one dot product accumulated in the
// same order whatever the row count or thread split, so a row's result does not depend on how many
// rows share the call: a verification pass gives exactly what one-token steps give.
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ATen.h>
#include <immintrin.h>

#include "guard.h"

// GCC 12's AVX-512 reduction intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kMaxRows = 16;

// Lanes of the last, partial 16-float chunk of a row of `in` floats.
__attribute__((target("avx512f"))) inline __mmask16 tail_mask(int64_t in) {
  int64_t left = in % 16;
  return left == 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// R input rows times J weight rows: R*J accumulators of 16 lanes, reduced at the end. Written as
// one function so that GCC keeps the accumulators in registers.
template <int R, int J>
__attribute__((target("avx512f"))) inline void dots(const float* x, const float* w, const float* bias, float* y,
                                                    int64_t in, int64_t out, int64_t j) {
  __m512 acc[R][J];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) acc[r][c] = _mm512_setzero_ps();
  const int64_t full = in / 16 * 16;
  for (int64_t i = 0; i < full; i += 16) {
    __m512 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm512_loadu_ps(x + r * in + i);
    for (int c = 0; c < J; c++) {
      __m512 wv = _mm512_loadu_ps(w + (j + c) * in + i);
      for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  if (full < in) {
    const __mmask16 mask = tail_mask(in);
    __m512 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm512_maskz_loadu_ps(mask, x + r * in + full);
    for (int c = 0; c < J; c++) {
      __m512 wv = _mm512_maskz_loadu_ps(mask, w + (j + c) * in + full);
      for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++)
      y[r * out + j + c] = _mm512_reduce_add_ps(acc[r][c]) + (bias ? bias[j + c] : 0.0f);
}

// Output columns [begin, end) for R rows, J weight rows at a time.
template <int R>
__attribute__((target("avx512f"))) void columns(const float* x, const float* w, const float* bias, float* y,
                                                int64_t in, int64_t out, int64_t begin, int64_t end) {
  constexpr int J = 4;
  int64_t j = begin;
  for (; j + J <= end; j += J) dots<R, J>(x, w, bias, y, in, out, j);
  for (; j < end; j++) dots<R, 1>(x, w, bias, y, in, out, j);
}

__attribute__((target("avx512f"))) void rows_times_weight(const float* x, int64_t rows, const float* w,
                                                          const float* bias, float* y, int64_t in, int64_t out,
                                                          int64_t begin, int64_t end) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) columns<4>(x + r * in, w, bias, y + r * out, in, out, begin, end);
  switch (rows - r) {
    case 3: columns<3>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    case 2: columns<2>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    case 1: columns<1>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    default: break;
  }
}

bool kernel_applies(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  static const bool has_avx512 = __builtin_cpu_supports("avx512f");
  auto plain = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.layout() == at::kStrided;
  };
  bool needs_grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (bias && bias->requires_grad()));
  return has_avx512 && !needs_grad && plain(x) && plain(w) && w.dim() == 2 && w.size(1) > 0 && x.dim() >= 1 &&
         x.size(-1) == w.size(1) && x.numel() / w.size(1) <= kMaxRows &&
         (!bias || (plain(*bias) && bias->dim() == 1 && bias->size(0) == w.size(0)));
}

}  // namespace

extern "C" {

// `*result` = a new tch tensor holding x @ w^T + bias (bias may be null), as at::linear computes it;
// this kernel when it applies, at::linear otherwise (training, other dtypes or devices, many rows).
int wizard_linear(void* x_handle, void* w_handle, void* bias_handle, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto& w = *static_cast<at::Tensor*>(w_handle);
    c10::optional<at::Tensor> bias;
    if (bias_handle) bias = *static_cast<at::Tensor*>(bias_handle);
    if (!kernel_applies(x, w, bias)) {
      *result = new at::Tensor(at::linear(x, w, bias));
      return;
    }
    const int64_t in = w.size(1), out = w.size(0), rows = x.numel() / in;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    auto y = at::empty(sizes, x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    const float* bp = bias ? bias->data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    // About 64K multiply-adds per task: small layers stay on one thread.
    const int64_t grain = std::max<int64_t>(8, 65536 / std::max<int64_t>(in * std::max<int64_t>(rows, 1), 1));
    at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
      rows_times_weight(xp, rows, wp, bp, yp, in, out, begin, end);
    });
    *result = new at::Tensor(std::move(y));
  });
}
}
