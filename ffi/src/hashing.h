// 64-bit mixing shared by the table index and the row initializers.
#pragma once

#include <cstdint>

namespace monolith {

// splitmix64's finalizer: a bijection on 64 bits with full avalanche.
inline uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

// floor(x * n / 2^64): maps a uniform 64-bit value onto [0, n) without division.
inline uint64_t FastRange(uint64_t x, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(x) * n) >> 64);
}

inline uint64_t RotL(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

}  // namespace monolith
