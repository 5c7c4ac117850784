// The fp32 dense kernel of csrc/linear.cpp, for the fused decode block.
#pragma once

#include <algorithm>
#include <cstdint>

namespace wizard {

// y[r * out + j] = x[r] . w[j] + bias[j] (bias may be null) for rows [0, rows), columns [begin, end),
// each a dot product in a fixed order.
using DenseFp32 = void (*)(const float* x, int64_t rows, const float* w, const float* bias, float* y, int64_t in,
                           int64_t out, int64_t begin, int64_t end);

// The widest fp32 kernel this CPU runs, or null.
DenseFp32 dense_fp32_kernel();

// About 64K multiply-adds per task: small layers stay on one thread.
inline int64_t dense_grain(int64_t in, int64_t rows) {
  return std::max<int64_t>(12, 65536 / std::max<int64_t>(in * rows, 1));
}

}  // namespace wizard
