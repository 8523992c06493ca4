// One shard of an embedding table: an exact-key cuckoo index over rows that
// never move. The table (table.h) owns the locking; every method here
// expects the caller to hold the shard's `mu` (shared for const methods,
// exclusive for the others).
//
// Layout
// ------
//   index:  Bucket[num_buckets]            bucketized cuckoo hash, 2 choices
//             struct Bucket {                (40 bytes, 8 slots)
//               uint8_t  tag[8];             0 = empty, else 1..255 from the key's hash
//               uint32_t row[8];             row number of the slot's key
//             };
//   rows:   chunks of 2^k rows (~64 KiB), each row `stride` floats:
//             struct Row {
//               uint64_t key;                the exact key (every value is allowed)
//               uint32_t last_update;        time (or step) of the last apply
//               uint32_t update_count;       applies so far (saturates at 2^32-1)
//               float    value[dim];
//               float    slot[SlotWidth(optimizer, dim)];
//               (padding to 8 bytes)
//             };
//   live:    one bit per row number: the row holds a key of the shard.
//   touched: one bit per row number: created or updated since the last drain.
//   dirty:   one bit per row number: changed since the last snapshot base
//            (a delta snapshot's rows; independent of the drain's marks).
//   removed: keys erased since the last snapshot base, while tracked.
//   sketch:  the admission filter's counting sketch (uint8 counters), present
//            only when the table filters admission.
//
// A key's 64-bit hash h (the table's) picks bucket b1 from bits 59..0, a
// second bucket b2 != b1 from the low half, and the tag from the low byte.
// Empty is a tag, not a key, so no key value is reserved.
//
// Invariants
// ----------
//   * Every live key sits in exactly one slot, in b1(key) or b2(key), and its
//     slot's tag is tag(key). Two keys never share a row.
//   * Rows never move: chunks are allocated once and freed with the shard, so
//     a row number stays valid while the index grows. Erased rows go to a
//     free list and are reused.
//   * The index holds at most kMaxLoad of its slots; an insert that finds no
//     place after kMaxKicks cuckoo displacements rebuilds the index 1.3x
//     larger from the live rows (no row is copied).
#pragma once

#include <cstdint>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include "hashing.h"
#include "initializers.h"
#include "optimizers.h"

namespace monolith {

// What every shard of a table shares.
namespace tags {
constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
constexpr uint64_t kOnes = 0x0101010101010101ULL;
// 0x80 in each byte of x that is zero, 0 elsewhere (exact, no false hits).
inline uint64_t ZeroBytes(uint64_t x) { return ~(((x & kLow7) + kLow7) | x | kLow7); }
// How many bytes of x are zero (a multiply, not a popcount: without a
// -mpopcnt build that is a library call on the insert path).
inline int CountZeroBytes(uint64_t x) { return static_cast<int>(((ZeroBytes(x) >> 7) * kOnes) >> 56); }
inline uint64_t Load(const uint8_t* tags) {
  uint64_t t;
  std::memcpy(&t, tags, 8);
  return t;
}
}  // namespace tags

inline uint64_t KeyHash(uint64_t key, uint64_t hash_seed) { return Mix64(key ^ hash_seed); }

struct RowLayout {
  int dim;
  int slot_width;  // floats of optimizer state
  int stride;      // floats per row: 4 (header) + dim + slot_width, even
  uint64_t seed;   // initializer seed
  uint64_t hash_seed;  // index hash: h = Mix64(key ^ hash_seed)
  InitializerConfig initializer;
  OptimizerConfig optimizer;
};

// A shard's row memory: chunks carved by a bump pointer from regions of
// reserved address space, so taking a chunk is no system call, and each
// shard faults its pages in its own regions. (Per-chunk malloc grew heaps
// with mprotect, and shards sharing pages' page tables contended on their
// locks: inserts on two threads ran slower than on one.)
class RowArena {
 public:
  RowArena() = default;
  ~RowArena() { Release(); }
  RowArena(const RowArena&) = delete;
  RowArena& operator=(const RowArena&) = delete;
  // `bytes` of fresh zeroed memory, 64-byte aligned; thread-safe.
  float* Take(size_t bytes);
  // Returns every region; the caller guarantees no chunk is in use.
  void Release();
  void Swap(RowArena& other);

 private:
  struct Region {
    char* base;
    size_t size, used;
  };
  std::mutex mu_;
  std::vector<Region> regions_;
};

class Shard {
 public:
  static constexpr uint32_t kNoRow = 0xFFFFFFFFu;
  static constexpr int kSlotsPerBucket = 8;
  static constexpr double kMaxLoad = 0.93;
  // About 64 KiB of rows per chunk: small enough that 16 shards' partly
  // filled chunks cost little, large enough to allocate rarely.
  static constexpr size_t kChunkBytes = 64 << 10;

  struct Probe {
    uint64_t b1, b2;
    uint8_t tag;
  };
  struct Bucket {
    uint8_t tag[kSlotsPerBucket];
    uint32_t row[kSlotsPerBucket];
  };

  // sketch_counters: this shard's share of the admission filter (0: none).
  Shard(const RowLayout& layout, int64_t capacity, int64_t sketch_counters);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  mutable std::shared_mutex mu;

  // --- reads (shared lock); inline, they are the lookup's hot path ---
  Probe ProbeFor(uint64_t h) const { return ProbeIn(h, index_.size()); }
  void PrefetchBuckets(const Probe& p, bool write = false) const {
    if (write) {
      __builtin_prefetch(&index_[p.b1], 1);
      __builtin_prefetch(&index_[p.b2], 1);
    } else {
      __builtin_prefetch(&index_[p.b1]);
      __builtin_prefetch(&index_[p.b2]);
    }
  }
  // Row of the first tag match (b1, then b2), or kNoRow; prefetches that row.
  uint32_t Candidate(const Probe& p) const {
    const Bucket* b = &index_[p.b1];
    uint64_t hit = tags::ZeroBytes(tags::Load(b->tag) ^ (tags::kOnes * p.tag));
    if (!hit) {
      b = &index_[p.b2];
      hit = tags::ZeroBytes(tags::Load(b->tag) ^ (tags::kOnes * p.tag));
    }
    if (!hit) return kNoRow;
    const uint32_t r = b->row[__builtin_ctzll(hit) >> 3];
    // Every cache line of the header and values (not the optimizer slots).
    const char* row = reinterpret_cast<const char*>(Row(r));
    const char* end = row + (4 + layout_.dim) * sizeof(float);
    for (const char* line = row; line < end; line += 64) __builtin_prefetch(line);
    __builtin_prefetch(end - 1);
    return r;
  }
  uint32_t FindRow(uint64_t key, const Probe& p) const {
    for (uint64_t bi : {p.b1, p.b2}) {
      const Bucket& b = index_[bi];
      uint64_t m = tags::ZeroBytes(tags::Load(b.tag) ^ (tags::kOnes * p.tag));
      while (m) {
        const uint32_t r = b.row[__builtin_ctzll(m) >> 3];
        if (RowKey(Row(r)) == key) return r;
        m &= m - 1;
      }
    }
    return kNoRow;
  }
  float* Row(uint32_t r) const {
    return chunks_[r >> chunk_shift_] + static_cast<size_t>(r & chunk_mask_) * layout_.stride;
  }
  static uint64_t RowKey(const float* row) {
    uint64_t k;
    std::memcpy(&k, row, 8);
    return k;
  }
  static uint32_t* Meta(float* row) { return reinterpret_cast<uint32_t*>(row) + 2; }
  static const uint32_t* Meta(const float* row) { return reinterpret_cast<const uint32_t*>(row) + 2; }
  int64_t size() const { return size_; }
  // f(row pointer) for every live row, in row order.
  template <typename F>
  void ForEachLive(F f) const {
    for (uint32_t r = 0; r < next_row_; ++r) {
      if ((live_[r >> 6] >> (r & 63)) & 1) f(Row(r));
    }
  }
  // Bytes held (index, rows incl. free and unused ones, bookkeeping).
  int64_t BytesHeld() const;
  int64_t index_slots() const { return static_cast<int64_t>(index_.size()) * kSlotsPerBucket; }
  int64_t row_capacity() const { return static_cast<int64_t>(chunks_.size()) << chunk_shift_; }
  int64_t inserts() const { return inserts_; }
  int64_t touched() const;
  int64_t sketch_bytes() const { return static_cast<int64_t>(sketch_.size()); }
  const std::vector<uint8_t>& sketch() const { return sketch_; }
  bool IsTouched(uint32_t r) const { return (touched_[r >> 6] >> (r & 63)) & 1; }
  // Row number of a row pointer from this shard (for ForEachLive callers).
  template <typename F>
  void ForEachLiveRow(F f) const {
    for (uint32_t r = 0; r < next_row_; ++r) {
      if ((live_[r >> 6] >> (r & 63)) & 1) f(r);
    }
  }
  int64_t rebuilds() const { return rebuilds_; }
  int64_t kicks() const { return kicks_; }

  // --- writes (exclusive lock) ---
  // The key's row; a new one (values NOT initialized: see InitRow), stamped
  // last_update = now and marked touched, when absent.
  uint32_t FindOrInsert(uint64_t key, uint64_t h, uint32_t now, bool* inserted);
  // Records one sighting of an unadmitted key in the counting sketch
  // (conservative update) and returns its estimated count, >= the true one.
  uint32_t Sighting(uint64_t h);
  void Touch(uint32_t r) {
    touched_[r >> 6] |= 1ULL << (r & 63);
    dirty_[r >> 6] |= 1ULL << (r & 63);
  }
  void DrainOne(uint32_t r) { touched_[r >> 6] &= ~(1ULL << (r & 63)); }
  bool IsDirty(uint32_t r) const { return (dirty_[r >> 6] >> (r & 63)) & 1; }
  // Live rows changed since the last snapshot base.
  int64_t dirty() const;
  // Starts a new change record: no row dirty, no key removed; erases from
  // now on record their keys (track) or not.
  void ResetChanges(bool track) {
    std::fill(dirty_.begin(), dirty_.end(), 0);
    removed_.clear();
    track_removed_ = track;
  }
  const std::vector<uint64_t>& removed() const { return removed_; }
  // Exchanges everything this shard holds with `other` (same table).
  void SwapContent(Shard& other);
  // f(row number) for every touched live row, clearing the marks (which
  // makes those rows dirty: their mark is part of a snapshot).
  template <typename F>
  void DrainTouched(F f) {
    for (size_t w = 0; w < touched_.size(); ++w) {
      uint64_t bits = touched_[w] & live_[w];
      touched_[w] = 0;
      dirty_[w] |= bits;  // their touched mark changed: the next delta holds it
      while (bits) {
        f(static_cast<uint32_t>(w * 64 + __builtin_ctzll(bits)));
        bits &= bits - 1;
      }
    }
  }
  // f(row number) for every dirty live row, in row order.
  template <typename F>
  void ForEachDirty(F f) const {
    for (size_t w = 0; w < dirty_.size(); ++w) {
      uint64_t bits = dirty_[w] & live_[w];
      while (bits) {
        f(static_cast<uint32_t>(w * 64 + __builtin_ctzll(bits)));
        bits &= bits - 1;
      }
    }
  }
  // Removes the row `r` (live); returns its key.
  uint64_t EraseRow(uint32_t r);
  void SetSketch(const uint8_t* counters, int64_t n);
  // Initial values and optimizer slots of a new row.
  void InitRow(uint32_t r) const;
  // The row that the next insert will take, for prefetching; kNoRow if unknown.
  uint32_t NextFreeRow(int ahead) const;
  bool Erase(uint64_t key, uint64_t h);
  void Reset(int64_t capacity);

 private:
  static constexpr int kMaxKicks = 512;

  static Probe ProbeIn(uint64_t h, uint64_t n) {
    Probe p;
    p.b1 = FastRange(h << 4, n);  // the top 4 bits chose the shard
    p.b2 = p.b1 + 1 + FastRange(RotL(h, 32), n - 1);
    if (p.b2 >= n) p.b2 -= n;
    p.tag = static_cast<uint8_t>(h);
    if (p.tag == 0) p.tag = 1;
    return p;
  }
  uint32_t AllocateRow(uint64_t key, uint32_t now);
  size_t ChunkBytes() const { return (static_cast<size_t>(1) << chunk_shift_) * layout_.stride * sizeof(float); }
  void FreeChunks();
  bool PlaceInIndex(std::vector<Bucket>& index, uint32_t row, uint64_t h);
  void RebuildIndex(uint64_t min_buckets);

  const RowLayout& layout_;
  RowArena arena_;
  const int chunk_shift_;       // rows per chunk = 2^chunk_shift_
  const uint32_t chunk_mask_;
  std::vector<Bucket> index_;
  std::vector<float*> chunks_;
  std::vector<uint64_t> live_;
  std::vector<uint64_t> touched_;
  std::vector<uint64_t> dirty_;
  std::vector<uint64_t> removed_;
  bool track_removed_ = false;
  std::vector<uint8_t> sketch_;
  std::vector<uint32_t> free_rows_;
  uint32_t next_row_ = 0;  // rows ever handed out (live + free)
  int64_t size_ = 0;
  int64_t inserts_ = 0, rebuilds_ = 0, kicks_ = 0;
  uint64_t kick_state_ = 0x243F6A8885A308D3ULL;

  friend class EmbeddingTable;
};

}  // namespace monolith
