// One dense layer's product inside the fused decode block (block.cpp): fp32 input rows times fp32,
// bf16 or int8 or int4 weights, through the kernels wizard_linear and wizard_quantized_linear run, so a row gets
// the same bits as there. Rows are made ready one at a time (rounded to bf16, quantized) by the
// thread that finished them; then threads claim units of output columns.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <memory>

namespace wizard {

class RowProduct {
 public:
  RowProduct(int64_t units, int64_t columns_per_unit, int64_t grain, int64_t multiple)
      : units(units), columns_per_unit(columns_per_unit), grain(grain), multiple(multiple) {}
  virtual ~RowProduct() = default;

  // Whether each input row must go through prepare() before run().
  virtual bool prepares() const { return false; }
  // Makes input row `r`, at `row`, ready for run().
  virtual void prepare(const float* row, int64_t r) { (void)row, (void)r; }
  // y = x times the weight, plus the bias, for every row and the output columns of units [begin, end).
  virtual void run(const float* x, float* y, int64_t begin, int64_t end) const = 0;

  // The output columns units [begin, end) stand for, of `out`.
  std::pair<int64_t, int64_t> columns(int64_t begin, int64_t end, int64_t out) const {
    return {begin * columns_per_unit, std::min(out, end * columns_per_unit)};
  }

  // Units the threads claim, output columns per unit, and the claims' grain and multiple.
  const int64_t units, columns_per_unit, grain, multiple;
};

// The product of an fp32 or bf16 [out, in] weight (contiguous, on the CPU) for `rows` fp32 rows, with
// an fp32 bias (or null); null where this CPU has no kernel for it. bf16 takes the kernel of steps
// of few positions (wizard_linear's isa 3): AMX tiles or dot products, as calibrated.
std::unique_ptr<RowProduct> dense_row_product(const at::Tensor& weight, const float* bias, int64_t rows);

// The product of a quantized (int8 or int4) weight's packed records holding [out, in] (throws when
// they do not).
std::unique_ptr<RowProduct> quantized_row_product(const at::Tensor& packed, const float* bias, int64_t rows,
                                                  int64_t out, int64_t in);

// Whether `w` is an fp32 or bf16 weight in panels of 16 outputs ([out / 16, in, 16], panel.cpp).
bool is_panel_weight(const at::Tensor& w);

// The product of fp32 or bf16 panels for `rows` fp32 rows, with an fp32 bias (or null); null where this CPU
// has no AVX2 or `panels` are not panels.
std::unique_ptr<RowProduct> panel_row_product(const at::Tensor& panels, const float* bias, int64_t rows);

// `x @ w^T + bias` with `w` as panels: the panel kernel for fp32 rows that need no gradient (outside
// autocast), at::linear over the weight unpacked otherwise.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias);

// About 64K multiply-adds per task: small layers stay on one thread.
inline int64_t dense_grain(int64_t in, int64_t rows) {
  return std::max<int64_t>(12, 65536 / std::max<int64_t>(in * rows, 1));
}

}  // namespace wizard
