// fp32 or bf16 weights in panels of 16 outputs, [out / 16][in][16], and `x @ w^T + b` over them for
// fp32 rows (AVX2 with FMA; bf16 widened as it is read; fp32 on AVX-512 too, a step in one vector;
// bf16 on AVX-512 BF16 in pairs of steps, against the rows rounded to bf16). The row kernel
// (linear_kernel.h) sums each output along `in` in vector lanes, so every multiply-add needs an
// input vector and a weight vector, and past a few rows the inputs come from L2; here each step
// broadcasts one input value against 16 outputs' weights (an outer product), so a tile of 6 rows
// does 12 multiply-adds per 2 weight loads and 6 broadcasts, from L1: prefill ran at 1.3x the row
// kernel's rate on an AVX2 EPYC.
// Which layout a shape takes is measured at load (kernels::calibrate).
//
// Every output is one lane's chain y = fma(x[k], w[k], y) for k = 0, 1, ... in order, then + bias:
// the same bits whatever the row count, the tiles or the thread split.
//
// A bf16 step holds its 16 values with the middle two quads swapped (outputs 0-3, 8-11, 4-7, 12-15),
// so that interleaving it with zeros (unpacklo/unpackhi, which work within 128-bit halves) gives
// outputs 0-7 and 8-15 as fp32 in one instruction each.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16_round.h"
#include "cpu.h"
#include "dense.h"
#include "guard.h"
#include "parallel.h"

namespace {

constexpr int64_t kPanel = 16;
// Steps of `in` per chunk: one panel's chunk (16 KiB) stays in L1 while every row tile passes it.
constexpr int64_t kChunk = 256;
// Rows per tile: 12 accumulators, 2 weight vectors and a broadcast of the 16 registers.
constexpr int kTileRows = 6;
// Rows up to which a tile takes two panels at once: fp32 up to 16 accumulators; bf16, which needs
// registers to widen, only 2 rows (3 and 4 spilled and took twice as long).
template <typename W>
constexpr int64_t kPairedRows = std::is_same_v<W, float> ? 4 : 2;
// fp32 rows that go 4 + 3 over two panels, in chunks whose two panels' steps (16 KiB) stay in L1.
constexpr int64_t kSplitRows = 7;
constexpr int64_t kPairedChunk = 128;
// Panels a one-row step takes at once: 8 accumulators, so the multiply-adds' latency is hidden.
constexpr int kOneRowPanels = 4;
// How far ahead of the chunk being read the first tile prefetches, in fp32 values (1 KiB).
constexpr int64_t kLead = 256;

// Output order of a bf16 step's stored values (its own inverse).
const int64_t kBf16Order[kPanel] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace avx2 {
struct Lanes {
  using V = __m256;
  static constexpr int kStepVectors = 2;  // outputs 0-7 and 8-15
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void load_step(const float* step, V* w) {
    w[0] = _mm256_loadu_ps(step);
    w[1] = _mm256_loadu_ps(step + 8);
  }
  static void load_step(const uint16_t* step, V* w) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step));
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), bits));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), bits));
  }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V acc) { return _mm256_fmadd_ps(a, b, acc); }
};
#include "panel_tile.h"
}  // namespace avx2

void add_bias(const float* bias, float* y, int64_t rows, int64_t out, int64_t begin, int64_t end) {
  if (!bias) return;
  for (int64_t r = 0; r < rows; r++)
    for (int64_t j = begin; j < end; j++) y[r * out + j] += bias[j];
}

// Output columns [begin, end) (multiples of 16) of `rows` rows, their sums kept in `y` itself.
template <typename W>
void rows_times_panels(const float* x, int64_t rows, const W* panels, const float* bias, float* y, int64_t in,
                       int64_t out, int64_t begin, int64_t end) {
  for (int64_t r = 0; r < rows; r++) std::fill(y + r * out + begin, y + r * out + end, 0.0f);
  const int64_t stride = in * kPanel;
  if (rows == 1) {
    int64_t j = begin;
    for (; j + kOneRowPanels * kPanel <= end; j += kOneRowPanels * kPanel)
      avx2::tile<1, kOneRowPanels>(x, in, panels + j / kPanel * stride, 0, in, y + j, out, false);
    for (; j < end; j += kPanel) avx2::tile<1, 1>(x, in, panels + j / kPanel * stride, 0, in, y + j, out, false);
    return add_bias(bias, y, rows, out, begin, end);
  }
  if (rows <= kPairedRows<W>) {
    // Two panels a step: over one panel, 2 to 4 rows make too few multiply-add chains (or one
    // stream too few) to keep up with memory, and verifying 3 positions cost 1.4 decode steps.
    int64_t j = begin;
    for (; j + 2 * kPanel <= end; j += 2 * kPanel)
      avx2::tile_of<4, 2>(static_cast<int>(rows), x, in, panels + j / kPanel * stride, 0, in, y + j, out, true);
    for (; j < end; j += kPanel)
      avx2::tile_of<kTileRows, 1>(static_cast<int>(rows), x, in, panels + j / kPanel * stride, 0, in, y + j, out, true);
    return add_bias(bias, y, rows, out, begin, end);
  }
  int64_t j = begin;
  if (rows == kSplitRows && std::is_same_v<W, float>) {
    // 4 + 3 rows over two panels a chunk: on one panel the 3-row tile's 6 multiply-add chains
    // cannot hide their latency, and a 7-row pass took 15% longer.
    for (; j + 2 * kPanel <= end; j += 2 * kPanel) {
      const W* pair = panels + j / kPanel * stride;
      for (int64_t k0 = 0; k0 < in; k0 += kPairedChunk) {
        const int64_t k1 = std::min(in, k0 + kPairedChunk);
        avx2::tile<4, 2>(x, in, pair, k0, k1, y + j, out, true);
        avx2::tile<3, 2>(x + 4 * in, in, pair, k0, k1, y + 4 * out + j, out, false);
      }
    }
  }
  // Rows in tiles of at most 6 over each panel left.
  for (; j < end; j += kPanel)
    avx2::tiles_over_chunks<kTileRows, 1>(rows, x, in, panels + j / kPanel * stride, kChunk, true, y + j, out);
  add_bias(bias, y, rows, out, begin, end);
}

#pragma GCC pop_options

// fp32 panels with AVX-512: a step of a panel is one vector, and 32 registers hold 7 rows times 4
// panels (28 accumulators, each multiply-add broadcasting its input value from memory), so a
// verification pass of up to 7 positions reads each weight once, with no chunks: on a Zen 4 EPYC
// such a pass ran at 92% of the FMA peak from L2 and, from memory, as fast as a one-row step, where
// the row kernel's 4 + 3 tiles took 1.2-1.5 steps. The same chains as the AVX2 tiles, so the same bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {

constexpr int kPanels = 4;
constexpr int kTileRows = 7;
// Steps per chunk when rows take several tiles: 4 panels' chunk (256 KiB) stays in L2 while every
// tile passes it (at 128 rows of 1B's shapes 96% of the FMA peak; chunks of 64 steps, in L1, 87%).
constexpr int64_t kChunk = 1024;

struct Lanes {
  using V = __m512;
  static constexpr int kStepVectors = 1;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void load_step(const float* step, V* w) { w[0] = _mm512_loadu_ps(step); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
};
#include "panel_tile.h"

// Output columns [begin, end) (multiples of 16) of `rows` rows, their sums kept in `y` itself.
void rows_times_panels(const float* x, int64_t rows, const float* panels, const float* bias, float* y, int64_t in,
                       int64_t out, int64_t begin, int64_t end) {
  for (int64_t r = 0; r < rows; r++) std::fill(y + r * out + begin, y + r * out + end, 0.0f);
  // Rows in tiles of at most 7 (13 rows: 6 and 7).
  tiles_over_panels<kTileRows, kPanels>(rows, x, in, panels, kChunk, y, out, begin, end);
  add_bias(bias, y, rows, out, begin, end);
}

}  // namespace avx512
#pragma GCC pop_options

// bf16 panels on AVX-512 BF16: the inputs rounded to bf16 (as the dot-product kernel rounds them)
// and each panel's steps held in pairs, [out / 16][in / 2][16][2], so that one dot-product
// instruction takes two steps of 16 outputs against a broadcast pair of inputs. A pair is read as
// one 32-bit unit: the tiles are the fp32 ones over in / 2 "steps" of such units, x's rows included.
// 7 rows x 4 panels ran at 85-97% of the instruction's peak at 128 rows of d768's and 1B's shapes,
// where the dot-product kernel, which sums each output across lanes at the end, ran at 73-86%.
// Each output is one lane's chain of those instructions in k order: the same bits whatever the rows.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx2,fma")
namespace avx512bf16 {

struct Lanes {
  using V = __m512;
  static constexpr int kStepVectors = 1;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void load_step(const uint32_t* pair, V* w) { w[0] = _mm512_castsi512_ps(_mm512_loadu_si512(pair)); }
  static V broadcast(const float* pair) {
    uint32_t bits;
    std::memcpy(&bits, pair, sizeof bits);
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(bits)));
  }
  static V fma(V x, V w, V acc) { return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w); }
};
#include "panel_tile.h"

// Output columns [begin, end) (multiples of 16) of `rows` rows of bf16 inputs (`narrowed`), their
// sums kept in `y` itself: fp32's tiles and chunks (a pair of steps is 64 bytes, as an fp32 step).
void rows_times_panels(const uint16_t* narrowed, int64_t rows, const uint16_t* panels, const float* bias, float* y,
                       int64_t in, int64_t out, int64_t begin, int64_t end) {
  for (int64_t r = 0; r < rows; r++) std::fill(y + r * out + begin, y + r * out + end, 0.0f);
  tiles_over_panels<avx512::kTileRows, avx512::kPanels>(rows, reinterpret_cast<const float*>(narrowed), in / 2,
                                                        reinterpret_cast<const uint32_t*>(panels), avx512::kChunk, y,
                                                        out, begin, end);
  add_bias(bias, y, rows, out, begin, end);
}

}  // namespace avx512bf16
#pragma GCC pop_options

// Whether `type` panels of `in` inputs are held in pairs of steps for the AVX-512 BF16 tiles.
bool in_pairs(at::ScalarType type, int64_t in) {
  return type == at::kBFloat16 && wizard::cpu::avx512_bf16() && in % 2 == 0;
}

// Over fp32 panels, AVX-512 where the CPU has it; over bf16 ones, pairs where they are, from the
// rows rounded to bf16 (`narrowed`).
template <typename W>
void panel_product(const float* x, const uint16_t* narrowed, int64_t rows, const W* panels, const float* bias,
                   float* y, int64_t in, int64_t out, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<W, float>) {
    if (wizard::cpu::avx512()) return avx512::rows_times_panels(x, rows, panels, bias, y, in, out, begin, end);
  } else {
    if (in_pairs(at::kBFloat16, in)) return avx512bf16::rows_times_panels(narrowed, rows, panels, bias, y, in, out, begin, end);
  }
  rows_times_panels(x, rows, panels, bias, y, in, out, begin, end);
}

// The order of a step's stored values for `type`.
at::Tensor step_order(at::ScalarType type) {
  at::Tensor order = at::arange(kPanel, at::kLong);
  if (type == at::kBFloat16) order = at::tensor(std::vector<int64_t>(kBf16Order, kBf16Order + kPanel), at::kLong);
  return order;
}

// Rows [16 p, 16 p + 16) of `rows` (`cols` 32-bit words each) as panel p of `panels`: column k's 16
// words side by side. Through a tile of 16 columns: each row's run read in order, the tile written
// out in order. Panels split among the threads, so each writes (and first touches) its own.
void transpose_into_panels(const uint32_t* rows, uint32_t* panels, int64_t count, int64_t cols) {
  constexpr int64_t kColumnsAtOnce = 16;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    uint32_t tile[kColumnsAtOnce][kPanel];
    for (int64_t p = begin; p < end; ++p) {
      const uint32_t* from = rows + p * kPanel * cols;
      uint32_t* to = panels + p * kPanel * cols;
      for (int64_t k0 = 0; k0 < cols; k0 += kColumnsAtOnce) {
        const int64_t width = std::min(kColumnsAtOnce, cols - k0);
        for (int64_t j = 0; j < kPanel; ++j)
          for (int64_t k = 0; k < width; ++k) tile[k][j] = from[j * cols + k0 + k];
        std::memcpy(to + k0 * kPanel, tile, sizeof(uint32_t) * kPanel * width);
      }
    }
  });
}

// `w` [out, in] as panels [out / 16, in, 16] (in pairs, [out / 16, in / 2, 16, 2], where they are):
// fp32 values, or bf16 pairs, move as 32-bit words (libtorch's copy where they are not aligned so).
at::Tensor pack(const at::Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  const bool pairs = in_pairs(w.scalar_type(), in);
  const at::Tensor rows = w.contiguous();
  const bool words = reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % alignof(uint32_t) == 0;
  if ((w.scalar_type() == at::kFloat || pairs) && words) {
    at::Tensor panels = at::empty({out / kPanel, in, kPanel}, w.options());
    transpose_into_panels(static_cast<const uint32_t*>(rows.const_data_ptr()),
                          static_cast<uint32_t*>(panels.mutable_data_ptr()), out / kPanel,
                          pairs ? in / 2 : in);
    return panels;
  }
  if (pairs)
    return w.reshape({out / kPanel, kPanel, in / 2, 2})
        .permute({0, 2, 1, 3})
        .contiguous()
        .view({out / kPanel, in, kPanel});
  return w.reshape({out / kPanel, kPanel, in})
      .transpose(1, 2)
      .index_select(2, step_order(w.scalar_type()))
      .contiguous();
}

// `panels` back as [out, in].
at::Tensor unpack(const at::Tensor& panels) {
  const int64_t out = panels.size(0) * kPanel, in = panels.size(1);
  if (in_pairs(panels.scalar_type(), in))
    return panels.view({out / kPanel, in / 2, kPanel, 2}).permute({0, 2, 1, 3}).reshape({out, in});
  return panels.index_select(2, step_order(panels.scalar_type())).transpose(1, 2).reshape({out, in});
}

// `panels`' values as the kernel reads them: floats, or bf16's bits.
template <typename W>
const W* values_of(const at::Tensor& panels) {
  if constexpr (std::is_same_v<W, float>) {
    return panels.data_ptr<float>();
  } else {
    return reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>());
  }
}

template <typename W>
class PanelRowProduct : public wizard::RowProduct {
 public:
  PanelRowProduct(const at::Tensor& panels, const float* bias, int64_t rows)
      : RowProduct(panels.size(0), kPanel, std::max<int64_t>(1, wizard::dense_grain(panels.size(1), rows) / kPanel),
                   kOneRowPanels),
        panels_(values_of<W>(panels)), bias_(bias), rows_(rows), in_(panels.size(1)),
        out_(panels.size(0) * kPanel), narrowed_(in_pairs(panels.scalar_type(), in_) ? rows * in_ : 0) {}

  bool prepares() const override { return !narrowed_.empty(); }
  void prepare(const float* row, int64_t r) override { wizard::narrow_to_bf16(row, in_, narrowed_.data() + r * in_); }

  void run(const float* x, float* y, int64_t begin, int64_t end) const override {
    panel_product(x, narrowed_.data(), rows_, panels_, bias_, y, in_, out_, begin * kPanel,
                  std::min(out_, end * kPanel));
  }

 private:
  const W* panels_;
  const float* bias_;
  const int64_t rows_, in_, out_;
  std::vector<uint16_t> narrowed_;  // the rows in bf16, for panels in pairs
};

}  // namespace

bool wizard::is_panel_weight(const at::Tensor& w) {
  return w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
         w.dim() == 3 && w.size(2) == kPanel && w.size(1) > 0 && w.is_contiguous();
}

std::unique_ptr<wizard::RowProduct> wizard::panel_row_product(const at::Tensor& panels, const float* bias,
                                                              int64_t rows) {
  if (!wizard::cpu::avx2() || !is_panel_weight(panels)) return nullptr;
  if (panels.scalar_type() == at::kBFloat16) return std::make_unique<PanelRowProduct<uint16_t>>(panels, bias, rows);
  return std::make_unique<PanelRowProduct<float>>(panels, bias, rows);
}

at::Tensor wizard::panel_linear(const at::Tensor& x, const at::Tensor& panels, const c10::optional<at::Tensor>& bias) {
  const int64_t groups = panels.size(0), in = panels.size(1), out = groups * kPanel;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "input of width ", x.size(-1), " for a weight of ", in, " inputs");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == out), "bias of ", out, " outputs expected");
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || panels.requires_grad() || (bias && bias->requires_grad()));
  const bool plain = x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                     (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
  if (!wizard::cpu::avx2() || needs_grad || !plain || at::autocast::is_autocast_enabled(at::kCPU)) {
    // What at::linear takes: the [out, in] weight back, in the activations' dtype.
    const auto type = x.scalar_type();
    return at::linear(x, unpack(panels).to(type), bias ? c10::optional<at::Tensor>(bias->to(type)) : bias);
  }
  const int64_t rows = x.numel() / in;
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = at::empty(sizes, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  std::vector<uint16_t> narrowed(in_pairs(panels.scalar_type(), in) ? rows * in : 0);
  if (!narrowed.empty()) wizard::narrow_to_bf16(xp, rows * in, narrowed.data());
  const int64_t grain = std::max<int64_t>(1, wizard::dense_grain(in, rows) / kPanel);
  wizard::balanced_for(
      groups, grain,
      [&](int64_t first, int64_t last) {
        if (panels.scalar_type() == at::kBFloat16)
          panel_product(xp, narrowed.data(), rows, values_of<uint16_t>(panels), bp, yp, in, out, first * kPanel,
                        last * kPanel);
        else
          panel_product(xp, nullptr, rows, values_of<float>(panels), bp, yp, in, out, first * kPanel, last * kPanel);
      },
      kOneRowPanels);
  return y;
}

extern "C" {

// `*result` = `w` ([out, in] fp32 or bf16 on the CPU, out a multiple of 16) as panels [out / 16, in, 16];
// fails naming what does not fit. Without AVX2 products over panels go through at::linear.
int wizard_panel_pack(void* w_handle, void** result) {
  return wizard::guarded([&] {
    const auto& w = *static_cast<at::Tensor*>(w_handle);
    TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
                    w.dim() == 2,
                "panels are packed from an fp32 or bf16 [out, in] CPU weight, not ", w.scalar_type(), " ",
                w.sizes());
    TORCH_CHECK(w.size(0) % kPanel == 0 && w.size(1) > 0, "a weight of ", w.sizes(),
                ": panels take outputs in multiples of 16");
    *result = new at::Tensor(pack(w));
  });
}

// `*result` = `panels` back as the [out, in] weight.
int wizard_panel_unpack(void* panels_handle, void** result) {
  return wizard::guarded([&] {
    const auto& panels = *static_cast<at::Tensor*>(panels_handle);
    TORCH_CHECK(wizard::is_panel_weight(panels), "not panels: ", panels.scalar_type(), " ", panels.sizes());
    *result = new at::Tensor(unpack(panels));
  });
}
}
