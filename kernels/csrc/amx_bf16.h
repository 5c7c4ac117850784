// bf16 inputs times bf16 weights on AMX tiles (Intel Sapphire Rapids and later), for the dense
// kernel in linear.cpp. Each output element is one dot product taken 32 values per tile step in the
// same order whatever the row count, tile grouping or thread split, so a row's result does not
// depend on how many rows share the call (as linear.cpp promises).
#pragma once

#include <cstdint>

namespace wizard::amx {

// Output columns go in blocks of this many (one tile's rows of weights); a column range given to
// `rows_times_weight` starts and ends on a block boundary.
constexpr int64_t kColumns = 16;

enum class State { kAbsent = 0, kNotGranted = 1, kGranted = 2 };

// Whether the CPU has AMX-BF16 and the OS lets this process use the tile state (asked for once).
State state();

// Dwords that `rows` packed rows take.
int64_t packed_dwords(int64_t rows, int64_t in);

// fp32 rows (rounded to bf16 as at::BFloat16 rounds) one at a time, as each is ready: row `r`
// written into zeroed `packed`.
void pack_row(const float* row, int64_t r, int64_t in, uint32_t* packed);

// The blocks of 16 rows [first_block, last_block) of `x` (`rows` x `in`, fp32 rounded to bf16 as
// at::BFloat16 rounds, or bf16 bits) packed into `packed` in the order the tiles take them (zeros
// past the rows written too), so that threads can share a chunk's rows. Needs AVX-512 (as AMX
// CPUs have).
void pack_rows(const float* x, int64_t rows, int64_t in, int64_t first_block, int64_t last_block, uint32_t* packed);
void pack_rows(const uint16_t* x, int64_t rows, int64_t in, int64_t first_block, int64_t last_block, uint32_t* packed);

// `y[r][j]` = packed input row r . weight row j + bias[j] (bias may be null), in fp32, for
// columns [begin, end) and every row; `y` has `out` columns. Needs `state() == kGranted`.
void rows_times_weight(const uint32_t* packed, int64_t rows, const uint16_t* w, const float* bias, float* y,
                       int64_t in, int64_t out, int64_t begin, int64_t end);

}  // namespace wizard::amx
