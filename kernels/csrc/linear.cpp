// `x @ w^T + b` for inference, fp32 or bf16 on CPU (AVX-512, or AVX2 with FMA), at any row count: a decode
// step, a batch of sequences, a verification pass, a prefill chunk. Every output element is one dot
// product accumulated in the same order whatever the row count or thread split, so a row's result
// does not depend on how many rows share the call: the dense layers of a verification pass give
// exactly what one-token steps give, and a sequence decoded beside 15 others gets the tokens it gets
// alone. (BLAS gives neither, and measured slower at every row count on the machines we bench.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <immintrin.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx_bf16.h"
#include "bf16_round.h"
#include "cpu.h"
#include "dense.h"
#include "guard.h"
#include "parallel.h"

// GCC 12's AVX-512 reduction intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// Whether one-row products prefetch the next tile's weight rows, for fp32 and for bf16 weights. A
// one-row product is memory-bound, and whether the hardware prefetchers keep up differs between
// machines (for bf16 under dot products an Intel Xeon read 17-24 GB/s without, 29-38 with; for fp32
// prefetching measured slower there and faster on an AMD EPYC), so the load-time calibration
// (kernels::calibrate) times both and sets these.
std::atomic<bool> one_row_prefetch_of[2] = {false, true};

template <typename W>
bool one_row_prefetch() {
  return one_row_prefetch_of[std::is_same_v<W, uint16_t>].load(std::memory_order_relaxed);
}

// Whether one-row products read the weight rows one after another (a single stream, which the
// hardware prefetchers follow) instead of in tiles of several rows: an AMD EPYC (Zen 4) read a d768
// model's bf16 rows at 34 GB/s so, 28 in tiles; its 1B fp32 rows the other way round. Calibrated too.
std::atomic<bool> one_row_stream_of[2] = {false, false};

template <typename W>
bool one_row_stream() {
  return one_row_stream_of[std::is_same_v<W, uint16_t>].load(std::memory_order_relaxed);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace avx512 {
struct Lanes {
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static constexpr int kRows = 4;        // 24 accumulators, 6 weight vectors and 1 input vector
  static constexpr int kWeightRows = 6;  // of 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static V load_weight(const float* p) { return load(p); }
  static V load_weight_first(const float* p, int64_t n) { return load_first(p, n); }
  // bf16 is the high half of an fp32: widen the 16 bits and shift them up.
  static V widen(__m256i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)); }
  static V load_weight(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load_weight_first(const uint16_t* p, int64_t n) {
    return widen(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
  }
  static V fma(V a, V b, V acc) { return _mm512_fmadd_ps(a, b, acc); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#include "linear_kernel.h"
}  // namespace avx512
#pragma GCC pop_options

// bf16 inputs times bf16 weights with AVX-512 BF16's dot-product instruction: 32 products per
// instruction (pairs summed into fp32 lanes), twice what widening gives; the inputs are rounded to
// bf16 first, as llama.cpp does for bf16 weights.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512bf16 {
struct Lanes {
  static constexpr int64_t kWidth = 32;
  static constexpr int kRows = 4;
  static constexpr int kWeightRows = 6;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load_first(const uint16_t* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  static __m512bh load_weight(const uint16_t* p) { return load(p); }
  static __m512bh load_weight_first(const uint16_t* p, int64_t n) { return load_first(p, n); }
  static __m512 fma(__m512bh a, __m512bh b, __m512 acc) { return _mm512_dpbf16_ps(acc, a, b); }
  static float sum(__m512 v) { return _mm512_reduce_add_ps(v); }
};
#include "linear_kernel.h"

}  // namespace avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Lanes {
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr int kRows = 4;        // 12 accumulators, 3 weight vectors and 1 input vector:
  static constexpr int kWeightRows = 3;  // all 16 registers, an input load per 3 multiply-adds
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_first(const float* p, int64_t n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
  }
  static V load_weight(const float* p) { return load(p); }
  static V load_weight_first(const float* p, int64_t n) { return load_first(p, n); }
  // bf16 is the high half of an fp32: widen the 16 bits and shift them up.
  static V widen(__m128i bits) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)); }
  static V load_weight(const uint16_t* p) { return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V load_weight_first(const uint16_t* p, int64_t n) {
    uint16_t tail[8] = {};
    std::memcpy(tail, p, n * sizeof(uint16_t));
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail)));
  }
  static V fma(V a, V b, V acc) { return _mm256_fmadd_ps(a, b, acc); }
  static float sum(V v) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  }
};
#include "linear_kernel.h"
}  // namespace avx2
#pragma GCC pop_options

template <typename X, typename W>
using RowsTimesWeight = void (*)(const X*, int64_t, const W*, const float*, float*, int64_t, int64_t, int64_t,
                                 int64_t);

// One instruction set's kernels: fp32 weights, bf16 weights (their bits as uint16_t) under fp32
// inputs, and bf16 times bf16 where the CPU has a bf16 dot product (else null), on AMX tiles where
// the CPU has them and the OS grants them (`amx`; the dot product then takes the columns past the
// last whole tile).
struct Kernels {
  RowsTimesWeight<float, float> fp32;
  RowsTimesWeight<float, uint16_t> bf16;
  RowsTimesWeight<uint16_t, uint16_t> bf16_dot;
  bool amx;
};

// Whether steps of few positions (decode, verification: isa 3, and the fused block) take bf16 on
// AMX tiles, or dot products; calibrate.rs measures which is faster on this machine.
std::atomic<bool> few_positions_on_amx{true};

// The kernels for `isa` (0: the widest this CPU runs, 1: AVX2, 2: AVX-512 without AMX, 3: the
// widest for steps of few positions), or none.
const Kernels* kernels_for(int isa) {
  static const bool has_bf16_dot = wizard::cpu::avx512_bf16();
  static const auto bf16_dot = has_bf16_dot ? avx512bf16::rows_times_weight<uint16_t, uint16_t> : nullptr;
  static const Kernels avx512{avx512::rows_times_weight<float, float>, avx512::rows_times_weight<float, uint16_t>,
                              bf16_dot, false};
  static const Kernels widest{avx512.fp32, avx512.bf16, bf16_dot,
                              has_bf16_dot && wizard::amx::state() == wizard::amx::State::kGranted};
  static const Kernels avx2{avx2::rows_times_weight<float, float>, avx2::rows_times_weight<float, uint16_t>,
                            nullptr, false};
  if (isa == 1 || !wizard::cpu::avx512()) return wizard::cpu::avx2() ? &avx2 : nullptr;
  if (isa == 3) isa = few_positions_on_amx.load(std::memory_order_relaxed) ? 0 : 2;
  return isa == 2 ? &avx512 : &widest;
}

// Weights in fp32 or bf16; input and bias in the weights' dtype or in fp32 (bf16 weights under fp32
// activations); contiguous CPU tensors that need no gradient, outside autocast.
bool kernel_applies(const Kernels* kernels, const at::Tensor& x, const at::Tensor& w,
                    const c10::optional<at::Tensor>& bias) {
  const auto type = w.scalar_type();
  auto plain = [](const at::Tensor& t) { return t.device().is_cpu() && t.is_contiguous() && t.layout() == at::kStrided; };
  auto activation = [&](const at::Tensor& t) {
    return plain(t) && (t.scalar_type() == type || t.scalar_type() == at::kFloat);
  };
  bool needs_grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || w.requires_grad() || (bias && bias->requires_grad()));
  // Under CPU autocast at::linear computes in the autocast dtype; so must every linear.
  return kernels && (type == at::kFloat || type == at::kBFloat16) && !needs_grad &&
         !at::autocast::is_autocast_enabled(at::kCPU) && activation(x) && plain(w) && w.dim() == 2 &&
         w.size(1) > 0 && x.dim() >= 1 && x.size(-1) == w.size(1) &&
         (!bias || (activation(*bias) && bias->dim() == 1 && bias->size(0) == w.size(0)));
}

}  // namespace

namespace {

class Fp32RowProduct : public wizard::RowProduct {
 public:
  Fp32RowProduct(RowsTimesWeight<float, float> kernel, const at::Tensor& w, const float* bias, int64_t rows)
      : RowProduct(w.size(0), 1, wizard::dense_grain(w.size(1), rows), wizard::kChunkMultiple),
        kernel_(kernel), w_(w.data_ptr<float>()), bias_(bias), rows_(rows), in_(w.size(1)), out_(w.size(0)) {}

  void run(const float* x, float* y, int64_t begin, int64_t end) const override {
    kernel_(x, rows_, w_, bias_, y, in_, out_, begin, end);
  }

 private:
  const RowsTimesWeight<float, float> kernel_;
  const float* w_;
  const float* bias_;
  const int64_t rows_, in_, out_;
};

// bf16 weights as wizard_linear multiplies them without AMX: in dot products over inputs rounded to
// bf16 where the CPU has them, else widened under fp32 inputs.
class Bf16RowProduct : public wizard::RowProduct {
 public:
  Bf16RowProduct(const Kernels& kernels, const at::Tensor& w, const float* bias, int64_t rows)
      : RowProduct(w.size(0), 1, wizard::dense_grain(w.size(1), rows), wizard::kChunkMultiple),
        kernels_(kernels),
        w_(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>())),
        bias_(bias), rows_(rows), in_(w.size(1)), out_(w.size(0)),
        narrowed_(kernels.bf16_dot ? rows * in_ : 0) {}

  bool prepares() const override { return kernels_.bf16_dot != nullptr; }
  void prepare(const float* row, int64_t r) override { wizard::narrow_to_bf16(row, in_, narrowed_.data() + r * in_); }

  void run(const float* x, float* y, int64_t begin, int64_t end) const override {
    if (kernels_.bf16_dot)
      kernels_.bf16_dot(narrowed_.data(), rows_, w_, bias_, y, in_, out_, begin, end);
    else
      kernels_.bf16(x, rows_, w_, bias_, y, in_, out_, begin, end);
  }

 private:
  const Kernels& kernels_;
  const uint16_t* w_;
  const float* bias_;
  const int64_t rows_, in_, out_;
  std::vector<uint16_t> narrowed_;
};

// bf16 weights on AMX tiles, as wizard_linear multiplies them there: whole tiles of 16 output
// columns on the tiles, the columns past the last whole tile in dot products.
class AmxRowProduct : public wizard::RowProduct {
 public:
  AmxRowProduct(const Kernels& kernels, const at::Tensor& w, const float* bias, int64_t rows)
      : RowProduct((w.size(0) + kTileColumns - 1) / kTileColumns, kTileColumns,
                   std::max<int64_t>(1, wizard::dense_grain(w.size(1), rows) / kTileColumns), 2),
        kernels_(kernels),
        w_(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>())),
        bias_(bias), rows_(rows), in_(w.size(1)), out_(w.size(0)), tiled_(out_ / kTileColumns * kTileColumns),
        packed_(wizard::amx::packed_dwords(rows, in_), 0),
        narrowed_(tiled_ < out_ ? rows * in_ : 0) {}

  bool prepares() const override { return true; }
  void prepare(const float* row, int64_t r) override {
    wizard::amx::pack_row(row, r, in_, packed_.data());
    if (tiled_ < out_) wizard::narrow_to_bf16(row, in_, narrowed_.data() + r * in_);
  }

  void run(const float*, float* y, int64_t begin, int64_t end) const override {
    begin *= kTileColumns;
    end = std::min(out_, end * kTileColumns);
    if (begin < tiled_)
      wizard::amx::rows_times_weight(packed_.data(), rows_, w_, bias_, y, in_, out_, begin, std::min(end, tiled_));
    if (end > tiled_) kernels_.bf16_dot(narrowed_.data(), rows_, w_, bias_, y, in_, out_, std::max(begin, tiled_), end);
  }

 private:
  static constexpr int64_t kTileColumns = wizard::amx::kColumns;
  const Kernels& kernels_;
  const uint16_t* w_;
  const float* bias_;
  const int64_t rows_, in_, out_, tiled_;
  std::vector<uint32_t> packed_;
  std::vector<uint16_t> narrowed_;
};

}  // namespace

std::unique_ptr<wizard::RowProduct> wizard::dense_row_product(const at::Tensor& w, const float* bias, int64_t rows) {
  if (is_panel_weight(w)) return panel_row_product(w, bias, rows);
  const Kernels* kernels = kernels_for(3);
  if (!kernels || !w.device().is_cpu() || !w.is_contiguous() || w.dim() != 2 || w.size(1) == 0) return nullptr;
  if (w.scalar_type() == at::kFloat) return std::make_unique<Fp32RowProduct>(kernels->fp32, w, bias, rows);
  if (w.scalar_type() != at::kBFloat16) return nullptr;
  if (kernels->amx) return std::make_unique<AmxRowProduct>(*kernels, w, bias, rows);
  return std::make_unique<Bf16RowProduct>(*kernels, w, bias, rows);
}

extern "C" {

// Whether this CPU runs the dense kernels for `isa` (as in wizard_linear).
int wizard_linear_kernel_available(int isa) { return kernels_for(isa) != nullptr; }

// Whether one-row products over fp32 (`bf16` 0) or bf16 weights prefetch the next tile's rows; `on`
// below 0 asks without changing it.
int wizard_linear_one_row_prefetch(int bf16, int on) {
  auto& flag = one_row_prefetch_of[bf16 != 0];
  if (on >= 0) flag.store(on != 0, std::memory_order_relaxed);
  return flag.load(std::memory_order_relaxed);
}

// Whether one-row products over fp32 (`bf16` 0) or bf16 weights read the rows one at a time; `on`
// below 0 asks without changing it.
int wizard_linear_one_row_stream(int bf16, int on) {
  auto& flag = one_row_stream_of[bf16 != 0];
  if (on >= 0) flag.store(on != 0, std::memory_order_relaxed);
  return flag.load(std::memory_order_relaxed);
}

// Whether steps of few positions take bf16 on AMX tiles (where wizard_linear_bf16_kernel is 3) or
// dot products; `on` below 0 asks without changing it.
int wizard_linear_few_positions_on_amx(int on) {
  if (on >= 0) few_positions_on_amx.store(on != 0, std::memory_order_relaxed);
  return few_positions_on_amx.load(std::memory_order_relaxed);
}

// How bf16 weights meet inputs: 3 on AMX tiles, 2 in AVX-512 BF16 dot products because the OS did
// not grant the CPU's AMX, 1 in dot products (no AMX), 0 widened to fp32.
int wizard_linear_bf16_kernel() {
  const Kernels* kernels = kernels_for(0);
  if (!kernels || !kernels->bf16_dot) return 0;
  if (kernels->amx) return 3;
  return wizard::amx::state() == wizard::amx::State::kNotGranted ? 2 : 1;
}

// `*result` = a new tch tensor holding x @ w^T + bias (bias may be null), as at::linear computes it;
// the kernel for `isa` (as kernels_for takes it) when it applies, at::linear otherwise
// (training, autocast, other dtypes or devices, no such kernel on this CPU).
int wizard_linear(void* x_handle, void* w_handle, void* bias_handle, int isa, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto& w = *static_cast<at::Tensor*>(w_handle);
    c10::optional<at::Tensor> bias;
    if (bias_handle) bias = *static_cast<at::Tensor*>(bias_handle);
    if (wizard::is_panel_weight(w)) {
      *result = new at::Tensor(wizard::panel_linear(x, w, bias));
      return;
    }
    const Kernels* kernels = kernels_for(isa);
    if (!kernel_applies(kernels, x, w, bias)) {
      // at::linear wants one dtype: bf16 weights under fp32 activations are widened for it.
      const bool mixed = w.scalar_type() != x.scalar_type();
      *result = new at::Tensor(at::linear(x, mixed ? w.to(x.scalar_type()) : w,
                                          mixed && bias ? c10::optional<at::Tensor>(bias->to(x.scalar_type())) : bias));
      return;
    }
    const int64_t in = w.size(1), out = w.size(0), rows = x.numel() / in;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    auto y = at::empty(sizes, x.options());
    const int64_t grain = wizard::dense_grain(in, rows);
    if (w.scalar_type() == at::kFloat) {
      const float* xp = x.data_ptr<float>();
      const float* wp = w.data_ptr<float>();
      const float* bp = bias ? bias->data_ptr<float>() : nullptr;
      float* yp = y.data_ptr<float>();
      wizard::balanced_for(out, grain, [&](int64_t begin, int64_t end) {
        kernels->fp32(xp, rows, wp, bp, yp, in, out, begin, end);
      });
    } else {
      // bf16 weights. With a bf16 dot-product instruction the inputs are rounded to bf16 (once per
      // call) and multiplied as they are; without, they are widened to fp32 and so are the weights as
      // they are read. Sums are fp32 either way, and a bf16 output is rounded once (as at::linear
      // does in bf16). Plain loops: a libtorch op per conversion cost more than a one-row product.
      const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
      std::vector<float> bias_wide;
      const float* bp = nullptr;
      if (bias && bias->scalar_type() == at::kFloat) {
        bp = bias->data_ptr<float>();
      } else if (bias) {
        const at::BFloat16* p = bias->data_ptr<at::BFloat16>();
        bias_wide.assign(p, p + bias->numel());
        bp = bias_wide.data();
      }
      // On AMX the dot products take only the columns past the last whole tile, if any.
      constexpr int64_t kTileColumns = wizard::amx::kColumns;
      const int64_t tiled = kernels->amx ? out / kTileColumns * kTileColumns : 0;
      std::vector<float> x_wide;
      std::vector<uint16_t> x_narrow;
      const float* x32 = nullptr;
      const uint16_t* x16 = nullptr;
      if (kernels->bf16_dot && x.scalar_type() == at::kBFloat16) {
        x16 = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
      } else if (kernels->bf16_dot && tiled < out) {
        x_narrow.resize(x.numel());
        wizard::narrow_to_bf16(x.data_ptr<float>(), x.numel(), x_narrow.data());
        x16 = x_narrow.data();
      } else if (x.scalar_type() == at::kBFloat16) {
        const at::BFloat16* p = x.data_ptr<at::BFloat16>();
        x_wide.assign(p, p + x.numel());
        x32 = x_wide.data();
      } else {
        x32 = x.data_ptr<float>();
      }
      // Every dword is written by the packing: no zeroing first.
      std::unique_ptr<uint32_t[]> packed(kernels->amx ? new uint32_t[wizard::amx::packed_dwords(rows, in)] : nullptr);
      if (kernels->amx) {
        // A prompt chunk's rows packed by every thread: one alone kept the others waiting for about
        // a tenth of a bf16 prefill.
        const bool narrow = x.scalar_type() == at::kBFloat16;
        const float* rows_in = narrow ? nullptr : x.data_ptr<float>();
        wizard::balanced_for((rows + kTileColumns - 1) / kTileColumns, 2, [&](int64_t first, int64_t last) {
          if (narrow)
            wizard::amx::pack_rows(x16, rows, in, first, last, packed.get());
          else
            wizard::amx::pack_rows(rows_in, rows, in, first, last, packed.get());
        });
      }
      auto product = [&](float* yp, int64_t begin, int64_t end) {
        if (begin < tiled) wizard::amx::rows_times_weight(packed.get(), rows, wp, bp, yp, in, out, begin, std::min(end, tiled));
        begin = std::max(begin, tiled);
        if (begin >= end) return;
        if (x16)
          kernels->bf16_dot(x16, rows, wp, bp, yp, in, out, begin, end);
        else
          kernels->bf16(x32, rows, wp, bp, yp, in, out, begin, end);
      };
      // On AMX threads take whole tiles of columns, two at a time (the kernel's step).
      auto columns_for = [&](const auto& body) {
        if (!kernels->amx) return wizard::balanced_for(out, grain, body);
        wizard::balanced_for(
            (out + kTileColumns - 1) / kTileColumns, std::max<int64_t>(1, grain / kTileColumns),
            [&](int64_t first, int64_t last) { body(first * kTileColumns, std::min(out, last * kTileColumns)); }, 2);
      };
      if (x.scalar_type() == at::kFloat) {
        float* yp = y.data_ptr<float>();
        columns_for([&](int64_t begin, int64_t end) { product(yp, begin, end); });
      } else {
        std::vector<float> y_wide(rows * out);
        at::BFloat16* yp = y.data_ptr<at::BFloat16>();
        columns_for([&](int64_t begin, int64_t end) {
          product(y_wide.data(), begin, end);
          for (int64_t r = 0; r < rows; r++)
            for (int64_t j = begin; j < end; j++) yp[r * out + j] = at::BFloat16(y_wide[r * out + j]);
        });
      }
    }
    *result = new at::Tensor(std::move(y));
  });
}
}
