// The batched standard normals behind the Normal and TruncatedNormal
// initializers (initializers.h).
//
// A new row's initial values were most of the cost of inserting it. The
// integer hashing runs over a tile first, then the float math (branch-free
// series, no libm call), so both loops vectorize; with 64-bit vector
// multiplies (AVX-512) the hashing does too, hence a clone per instruction
// set, picked once at load time. This file is built with -ffp-contract=off:
// every clone does the same IEEE operations in the same order, so a row's
// values are the same bits on every machine and equal StandardNormal().
#include "initializers.h"

namespace monolith {

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MONOLITH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MONOLITH_CLONES
#endif

MONOLITH_CLONES void StandardNormals(uint64_t stream, int n, float* out) {
  constexpr int kTile = 64;
  float u1[kTile], u2[kTile];
  for (int i0 = 0; i0 < n; i0 += kTile) {
    const int m = n - i0 < kTile ? n - i0 : kTile;
    for (int j = 0; j < m; ++j) {
      const uint64_t c = stream + static_cast<uint64_t>(i0 + j) * 0x9E3779B97F4A7C15ULL;
      u1[j] = UnitFloat(Mix64(c));
      u2[j] = UnitFloat(Mix64(c + 0xD1B54A32D192ED03ULL));
    }
    for (int j = 0; j < m; ++j) out[i0 + j] = BoxMuller(u1[j], u2[j]);
  }
}

}  // namespace monolith
