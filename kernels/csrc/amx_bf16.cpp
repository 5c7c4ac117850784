// AMX bf16 products (see amx_bf16.h). The weights are the tiles' first operand, 16 weight rows by
// 32 values, read in place in the checkpoint's [out, in] layout; the inputs are the second, packed
// as pairs so that a tile holds 16 pairs of 16 input rows. A tile of sums is then 16 weight rows by
// 16 input rows, and each sum sees its 32 products per step in k order, alone: the same bits for one
// row (a decode step) as for 512 (a prefill chunk).
#include "amx_bf16.h"
#include "bf16_round.h"
#include "cpu.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

// GCC 12's AVX-512 gather intrinsic reads an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace wizard::amx {
namespace {

constexpr int64_t kDepth = 32;  // bf16 values along `in` per tile row (64 bytes)
constexpr int64_t kTile = kColumns * kDepth;        // bf16 values in a tile of weights
constexpr int64_t kTileDwords = kColumns * kColumns;  // dwords in a tile of input pairs or of sums

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16 || !__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;
  unsigned xcr0_low, xcr0_high;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  return (xcr0_low >> 17 & 3) == 3;  // the OS saves tile config and data
}

// Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool tile_state_granted() {
  constexpr long kRequestPermission = 0x1023, kTileData = 18;
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
}

}  // namespace

State state() {
  static const State found = cpu::cap() < cpu::Level::kAmx || !cpu_has_amx_bf16() ? State::kAbsent
                             : tile_state_granted() ? State::kGranted
                                                    : State::kNotGranted;
  return found;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,bmi2,amx-tile,amx-bf16")
namespace {

// Offsets of one column of a 16 x 16 tile of dwords: 0, 16, ..., 240.
__m512i tile_column() {
  return _mm512_mullo_epi32(_mm512_set1_epi32(kColumns),
                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// Block [input block][depth step] of 16 x 16 dwords: dword [p][r] is the pair of values 2p, 2p + 1
// of the step for input row r; zero past the rows and past `in`. `step(i, n)` gives 32 bf16 values
// of row r from i, the n < 32 there are when fewer, zeros after.
template <typename Step>
void pack_one(int64_t r, int64_t in, uint32_t* packed, const Step& step) {
  const int64_t depth_steps = (in + kDepth - 1) / kDepth;
  const __m512i pairs = tile_column();
  uint32_t* column = packed + r / kColumns * depth_steps * kTileDwords + r % kColumns;
  for (int64_t i = 0; i < in; i += kDepth, column += kTileDwords)
    _mm512_i32scatter_epi32(column, pairs, step(i, std::min(kDepth, in - i)), 4);
}

// The 16 x 16 dwords of `r` (row i in r[i]) transposed in place: four rounds of shuffles, a fraction
// of what 16 scatters or gathers of a row each cost.
inline void transpose(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 4) {
    const __m512i a = _mm512_unpacklo_epi32(r[i], r[i + 1]), b = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    const __m512i c = _mm512_unpacklo_epi32(r[i + 2], r[i + 3]), d = _mm512_unpackhi_epi32(r[i + 2], r[i + 3]);
    // Per 128-bit lane, t[i + k] holds element k of rows i..i + 3.
    t[i] = _mm512_unpacklo_epi64(a, c);
    t[i + 1] = _mm512_unpackhi_epi64(a, c);
    t[i + 2] = _mm512_unpacklo_epi64(b, d);
    t[i + 3] = _mm512_unpackhi_epi64(b, d);
  }
  for (int k = 0; k < 4; k++) {
    // Lanes 0, 2 and 1, 3 of row groups 0-3 and 4-7, then 8-11 and 12-15.
    const __m512i even_low = _mm512_shuffle_i32x4(t[k], t[4 + k], 0x88);
    const __m512i odd_low = _mm512_shuffle_i32x4(t[k], t[4 + k], 0xdd);
    const __m512i even_high = _mm512_shuffle_i32x4(t[8 + k], t[12 + k], 0x88);
    const __m512i odd_high = _mm512_shuffle_i32x4(t[8 + k], t[12 + k], 0xdd);
    r[k] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(even_low, even_high, 0xdd);
    r[k + 4] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
    r[k + 12] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xdd);
  }
}

// Input block `block` (rows 16 block.. of `rows`) packed: per depth step, the 16 rows' 32 values
// (`step(r, i, n)` as in pack_one) transposed into the step's tile, zeros past the rows.
template <typename Step>
void pack_block(int64_t block, int64_t rows, int64_t in, uint32_t* packed, const Step& step) {
  const int64_t depth_steps = (in + kDepth - 1) / kDepth, first = block * kColumns;
  const int64_t count = std::min(kColumns, rows - first);
  uint32_t* tile = packed + block * depth_steps * kTileDwords;
  __m512i r[16];
  for (int64_t i = 0; i < in; i += kDepth, tile += kTileDwords) {
    const int64_t n = std::min(kDepth, in - i);
    for (int64_t k = 0; k < kColumns; k++) r[k] = k < count ? step(first + k, i, n) : _mm512_setzero_si512();
    transpose(r);
    for (int64_t p = 0; p < kColumns; p++) _mm512_storeu_si512(tile + p * kColumns, r[p]);
  }
}

// 32 fp32 values from p (n of them when fewer, zeros after) rounded to bf16.
__m512i rounded(const float* p, int64_t n) {
  const __m256i low = round_to_bf16(_mm512_maskz_loadu_ps(_bzhi_u32(0xffff, n), p));
  const __m256i high = round_to_bf16(_mm512_maskz_loadu_ps(_bzhi_u32(0xffff, std::max<int64_t>(n - 16, 0)), p + 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

}  // namespace

int64_t packed_dwords(int64_t rows, int64_t in) {
  return (rows + kColumns - 1) / kColumns * ((in + kDepth - 1) / kDepth) * kTileDwords;
}

void pack_row(const float* row, int64_t r, int64_t in, uint32_t* packed) {
  pack_one(r, in, packed, [&](int64_t i, int64_t n) { return rounded(row + i, n); });
}

void pack_rows(const float* x, int64_t rows, int64_t in, int64_t first_block, int64_t last_block, uint32_t* packed) {
  for (int64_t block = first_block; block < last_block; block++)
    pack_block(block, rows, in, packed, [&](int64_t r, int64_t i, int64_t n) { return rounded(x + r * in + i, n); });
}

void pack_rows(const uint16_t* x, int64_t rows, int64_t in, int64_t first_block, int64_t last_block, uint32_t* packed) {
  for (int64_t block = first_block; block < last_block; block++)
    pack_block(block, rows, in, packed, [&](int64_t r, int64_t i, int64_t n) {
      return _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, n), x + r * in + i);
    });
}

namespace {

// Tiles 0-3: sums (weight block b, input block i at 2i + b); 4-5: weights; 6-7: inputs. All 16 x 64
// bytes. A constant: GCC dropped the stores of a config built on the stack before `ldtilecfg`.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64);
constexpr TileConfig kTileConfig{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// The weights of column blocks [j, j + 32), read in place; when `in` is not a whole number of
// tile steps the last step is copied, zero past `in`, so that no tile reads past its rows.
// (Copying every tile to dodge the 4 KiB L1 aliasing of rows 4 KiB apart measured slower at every
// shape, 128 rows of StarCoder-1B's included.)
class Weights {
 public:
  Weights(const uint16_t* w, int64_t in) : w_(w), in_(in), edge_step_(in % kDepth ? in / kDepth : -1) {}

  void select(int64_t j, int blocks) {
    j_ = j;
    if (edge_step_ < 0) return;
    edge_.assign(blocks * kTile, 0);
    const int64_t i = edge_step_ * kDepth;
    for (int b = 0; b < blocks; b++)
      for (int64_t r = 0; r < kColumns; r++)
        std::memcpy(&edge_[b * kTile + r * kDepth], w_ + (j + b * kColumns + r) * in_ + i, (in_ - i) * sizeof(uint16_t));
  }

  // Tile `b`'s 16 rows at depth step `step` and their stride in bytes.
  const uint16_t* tile(int b, int64_t step) const {
    return step == edge_step_ ? &edge_[b * kTile] : w_ + (j_ + b * kColumns) * in_ + step * kDepth;
  }
  int64_t stride(int64_t step) const { return step == edge_step_ ? kDepth * 2 : in_ * 2; }

 private:
  const uint16_t* w_;
  int64_t in_, edge_step_, j_ = 0;
  std::vector<uint16_t> edge_;
};

// Sums of W column blocks by I input blocks (`block`, `block + 1`) over every depth step, stored
// into `sums` (tile 2i + b for weight block b, input block i).
template <int W, int I>
void tiles(const Weights& weights, const uint32_t* packed, int64_t depth_steps, int64_t block, float* sums) {
  _tile_zero(0);
  if (W > 1) _tile_zero(1);
  if (I > 1) _tile_zero(2);
  if (W > 1 && I > 1) _tile_zero(3);
  const uint32_t* inputs = packed + block * depth_steps * kTileDwords;
  const uint32_t* next_inputs = inputs + depth_steps * kTileDwords;
  for (int64_t step = 0; step < depth_steps; step++) {
    _tile_loadd(4, weights.tile(0, step), weights.stride(step));
    if (W > 1) _tile_loadd(5, weights.tile(1, step), weights.stride(step));
    _tile_loadd(6, inputs + step * kTileDwords, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (W > 1) _tile_dpbf16ps(1, 5, 6);
    if (I > 1) {
      _tile_loadd(7, next_inputs + step * kTileDwords, 64);
      _tile_dpbf16ps(2, 4, 7);
      if (W > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 64);
  if (W > 1) _tile_stored(1, sums + kTileDwords, 64);
  if (I > 1) _tile_stored(2, sums + 2 * kTileDwords, 64);
  if (W > 1 && I > 1) _tile_stored(3, sums + 3 * kTileDwords, 64);
}

// A tile of sums holds [weight row][input row]: column r of it, plus the bias, is 16 outputs of row r.
void write_rows(const float* sums, const float* bias, float* y, int64_t rows, int64_t out) {
  const __m512 added = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  __m512i columns[16];
  for (int64_t w = 0; w < kColumns; w++) columns[w] = _mm512_load_si512(sums + w * kColumns);
  transpose(columns);
  for (int64_t r = 0; r < rows; r++) _mm512_storeu_ps(y + r * out, _mm512_add_ps(_mm512_castsi512_ps(columns[r]), added));
}

}  // namespace

void rows_times_weight(const uint32_t* packed, int64_t rows, const uint16_t* w, const float* bias, float* y,
                       int64_t in, int64_t out, int64_t begin, int64_t end) {
  _tile_loadconfig(&kTileConfig);
  const int64_t depth_steps = (in + kDepth - 1) / kDepth, input_blocks = (rows + kColumns - 1) / kColumns;
  Weights weights(w, in);
  alignas(64) float sums[4 * kTileDwords];
  for (int64_t j = begin; j < end; j += 2 * kColumns) {
    const int blocks = j + kColumns < end ? 2 : 1;
    weights.select(j, blocks);
    for (int64_t block = 0; block < input_blocks; block += 2) {
      const bool pair = block + 1 < input_blocks;
      const auto run = blocks == 2 ? (pair ? tiles<2, 2> : tiles<2, 1>) : (pair ? tiles<1, 2> : tiles<1, 1>);
      run(weights, packed, depth_steps, block, sums);
      for (int i = 0; i < (pair ? 2 : 1); i++)
        for (int b = 0; b < blocks; b++) {
          const int64_t row = (block + i) * kColumns, column = j + b * kColumns;
          write_rows(sums + (2 * i + b) * kTileDwords, bias ? bias + column : nullptr, y + row * out + column,
                     std::min(kColumns, rows - row), out);
        }
    }
  }
  _tile_release();
}
#pragma GCC pop_options

}  // namespace wizard::amx
