// The instructions the kernels may use: the CPU's, capped by WIZARD_CPU_MAX (`avx512`: no AMX,
// `avx2`, or `scalar`), so that the kernels a CPU without them takes run, and are tested, on any
// machine.
#pragma once

#include <cstdlib>
#include <cstring>

namespace wizard::cpu {

enum class Level { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The cap WIZARD_CPU_MAX sets; unset or another value, none (the Rust side warns of other values).
inline Level cap() {
  static const Level level = [] {
    const char* value = std::getenv("WIZARD_CPU_MAX");
    if (value && std::strcmp(value, "scalar") == 0) return Level::kScalar;
    if (value && std::strcmp(value, "avx2") == 0) return Level::kAvx2;
    if (value && std::strcmp(value, "avx512") == 0) return Level::kAvx512;
    return Level::kAmx;
  }();
  return level;
}

// AVX2 with FMA and F16C (every CPU with AVX2 has both; the quantized kernels widen half scales).
inline bool avx2() {
  static const bool usable = cap() >= Level::kAvx2 && __builtin_cpu_supports("avx2") &&
                             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return usable;
}

// AVX-512 F, BW and VL.
inline bool avx512() {
  static const bool usable = cap() >= Level::kAvx512 && avx2() && __builtin_cpu_supports("avx512f") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return usable;
}

// AVX-512 VNNI (int8 dot products).
inline bool avx512_vnni() {
  static const bool usable = avx512() && __builtin_cpu_supports("avx512vnni");
  return usable;
}

// AVX-512 BF16 (bf16 dot products).
inline bool avx512_bf16() {
  static const bool usable = avx512() && __builtin_cpu_supports("avx512bf16");
  return usable;
}

}  // namespace wizard::cpu
