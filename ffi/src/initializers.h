// Initial values of a new row, a pure function of (table seed, key, element).
//
// A counter-based generator (splitmix64 over seed, key and element index)
// means a row's first values never depend on arrival order, thread count or
// what else is in the table: replaying a stream rebuilds the same rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// log(x) for x in (0, 1], a normal float: x = m * 2^e with m in [sqrt(1/2),
// sqrt(2)), log(m) = 2 atanh((m-1)/(m+1)) by its series. Branch-free, so a
// loop over it vectorizes (the libm call does not); within a few ulp.
inline float LogUnit(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t off = bits - 0x3F3504F3u;  // the bits of sqrt(1/2)
  const int32_t e = static_cast<int32_t>(off) >> 23;
  const uint32_t mb = (off & 0x007FFFFFu) + 0x3F3504F3u;
  float m;
  std::memcpy(&m, &mb, 4);
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float p = 2.0f + t2 * (2.0f / 3 + t2 * (2.0f / 5 + t2 * (2.0f / 7 + t2 * (2.0f / 9))));
  return static_cast<float>(e) * 0.693147180559945f + t * p;
}

// cos(2 pi u) for u in [0, 1]: with v = u - 1/2 (exact for u a multiple of
// 2^-24), cos(2 pi u) = 2 sin^2(pi v) - 1, sin by its Taylor series to y^13
// on [-pi/2, pi/2]; arithmetic only, so the loop vectorizes. Within 5e-7.
inline float CosTwoPi(float u) {
  const float y = (u - 0.5f) * 3.14159265358979f;
  const float y2 = y * y;
  const float s = y * (1.0f + y2 * (-1.0f / 6 + y2 * (1.0f / 120 + y2 * (-1.0f / 5040 + y2 * (1.0f / 362880 +
                 y2 * (-1.0f / 39916800 + y2 * (1.0f / 6227020800.0f)))))));
  return 2.0f * s * s - 1.0f;
}

inline float BoxMuller(float u1, float u2) { return std::sqrt(-2.0f * LogUnit(u1)) * CosTwoPi(u2); }

inline float StandardNormal(uint64_t stream, uint64_t counter) {
  const float u1 = UnitFloat(Mix64(stream + counter * 0x9E3779B97F4A7C15ULL));
  const float u2 = UnitFloat(Mix64(stream + counter * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL));
  return BoxMuller(u1, u2);
}

// out[j] = StandardNormal(stream, j) for j < n, bit for bit (initializers.cc:
// vectorized, with a clone per instruction set).
void StandardNormals(uint64_t stream, int n, float* out);

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
      StandardNormals(stream, dim, w);
      for (int i = 0; i < dim; ++i) w[i] = c.a + c.b * w[i];
      return;
    case InitKind::kTruncatedNormal:
      StandardNormals(stream, dim, w);
      for (int i = 0; i < dim; ++i) {
        float z = w[i];
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
