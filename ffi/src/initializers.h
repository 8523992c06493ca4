// Initial values of a new row, a pure function of (table seed, key, element).
//
// A counter-based generator (splitmix64 over seed, key and element index)
// means a row's first values never depend on arrival order, thread count or
// what else is in the table: replaying a stream rebuilds the same rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "hashing.h"

namespace monolith {

enum class InitKind : int32_t {
  kZeros = 0,
  kConstant = 1,         // a
  kUniform = 2,          // U[a, b)
  kNormal = 3,           // N(mean=a, stddev=b)
  kTruncatedNormal = 4,  // N(a, b) redrawn until within 2 stddev, like TF
};

struct InitializerConfig {
  InitKind kind = InitKind::kZeros;
  float a = 0.0f;
  float b = 0.0f;
};

// Uniform in (0, 1]: 24 random bits, never 0 so log() is safe.
inline float UnitFloat(uint64_t bits) {
  return static_cast<float>((bits >> 40) + 1) * (1.0f / 16777216.0f);
}

inline float StandardNormal(uint64_t stream, uint64_t counter) {
  const float u1 = UnitFloat(Mix64(stream + counter * 0x9E3779B97F4A7C15ULL));
  const float u2 = UnitFloat(Mix64(stream + counter * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL));
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864f * u2);
}

inline void InitRowValues(const InitializerConfig& c, uint64_t seed, uint64_t key,
                    int dim, float* w) {
  const uint64_t stream = Mix64(seed ^ Mix64(key + 0x632BE59BD9B4E019ULL));
  switch (c.kind) {
    case InitKind::kZeros:
      for (int i = 0; i < dim; ++i) w[i] = 0.0f;
      return;
    case InitKind::kConstant:
      for (int i = 0; i < dim; ++i) w[i] = c.a;
      return;
    case InitKind::kUniform:
      for (int i = 0; i < dim; ++i) {
        const float u = UnitFloat(Mix64(stream + (i + 1) * 0x9E3779B97F4A7C15ULL)) -
                        (1.0f / 16777216.0f);  // [0, 1)
        w[i] = c.a + (c.b - c.a) * u;
      }
      return;
    case InitKind::kNormal:
      for (int i = 0; i < dim; ++i) w[i] = c.a + c.b * StandardNormal(stream, i);
      return;
    case InitKind::kTruncatedNormal:
      for (int i = 0; i < dim; ++i) {
        float z = StandardNormal(stream, i);
        // Redraws use counters past every element's first draw.
        for (uint64_t k = 1; std::fabs(z) > 2.0f; ++k) {
          z = StandardNormal(stream, i + k * static_cast<uint64_t>(dim));
        }
        w[i] = c.a + c.b * z;
      }
      return;
  }
}

}  // namespace monolith
