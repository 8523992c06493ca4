// The collisionless embedding table: exact 64-bit keys -> rows of floats.
//
// Layout
// ------
//   index:  Bucket[num_buckets]            bucketized cuckoo hash, 2 choices
//             struct Bucket {                (40 bytes, 8 slots)
//               uint8_t  tag[8];             0 = empty, else 1..255 from the key's hash
//               uint32_t row[8];             row number of the slot's key
//             };
//   rows:   chunks of kRowsPerChunk rows, each row `stride` floats:
//             struct Row {
//               uint64_t key;                the exact key (every value is allowed)
//               uint32_t last_update;        time (or step) of the last apply
//               uint32_t update_count;       applies so far (saturates at 2^32-1)
//               float    value[dim];
//               float    slot[SlotWidth(optimizer, dim)];
//               (padding to 8 bytes)
//             };
//   live:   one bit per row number: the row holds a key of the table.
//
// A key's hash h = Mix64(key ^ seed) picks bucket b1 = FastRange(h, n), a
// second bucket b2 != b1 from the other half of h, and the tag from its low
// byte. Empty is a tag, not a key, so no key value is reserved.
//
// Invariants
// ----------
//   * Every live key sits in exactly one slot, in b1(key) or b2(key), and its
//     slot's tag is tag(key). Two keys never share a row.
//   * Rows never move: chunks are allocated once and freed with the table, so
//     a row number stays valid while the index grows. Erased rows go to a
//     free list and are reused. A growing table faults its next chunk in on
//     another thread ahead of need.
//   * The index holds at most kMaxLoad of its slots; an insert that finds no
//     place after kMaxKicks cuckoo displacements rebuilds the index 1.3x
//     larger from the live rows (rows are read in order; no row is copied).
//
// Thread safety
// -------------
//   One reader-writer lock. Lookups of present keys, Find, Dump and Stats
//   hold it shared and run together. Inserts, Apply, Load, Erase and index
//   growth hold it exclusively, so a reader sees every row either wholly
//   before or wholly after an apply, never half-written. A batched call
//   splits its work over the process-wide ThreadPool while holding the lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <future>
#include <memory>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "initializers.h"
#include "optimizers.h"

namespace monolith {

struct TableOptions {
  int dim = 8;                    // floats per row
  InitializerConfig initializer;  // values of a new row
  OptimizerConfig optimizer;      // fused update rule and its slots
  uint64_t seed = 0;              // initializer and hash seed
  int64_t capacity_hint = 0;      // rows to size the index for up front
};

struct TableStats {
  int64_t rows = 0;               // live keys
  int64_t row_capacity = 0;       // rows allocated in chunks
  int64_t index_slots = 0;        // buckets * 8
  int64_t bytes_values = 0;       // rows * dim * 4
  int64_t bytes_slots = 0;        // rows * slot width * 4
  int64_t bytes_overhead = 0;     // everything else the table holds
  int64_t lookups = 0;            // ids looked up
  int64_t inserts = 0;            // rows created
  int64_t updates = 0;            // row updates applied
  int64_t nonfinite_skipped = 0;  // row updates refused for NaN/Inf gradients
  int64_t index_rebuilds = 0;     // times the index grew
  int64_t index_kicks = 0;        // cuckoo displacements so far
};

// A whole table as contiguous arrays (n rows).
struct TableDump {
  std::vector<uint64_t> keys;          // (n)
  std::vector<float> values;           // (n, dim)
  std::vector<float> slots;            // (n, slot_width)
  std::vector<uint32_t> last_update;   // (n)
  std::vector<uint32_t> update_count;  // (n)
};

class EmbeddingTable {
 public:
  explicit EmbeddingTable(const TableOptions& options);
  ~EmbeddingTable();
  EmbeddingTable(const EmbeddingTable&) = delete;
  EmbeddingTable& operator=(const EmbeddingTable&) = delete;

  int dim() const { return dim_; }
  int slot_width() const { return slot_width_; }
  const TableOptions& options() const { return options_; }

  // Find-or-insert: out[i, :] = value of keys[i], creating missing rows.
  //   keys // (n)   out // (n, dim)
  void Lookup(const uint64_t* keys, int64_t n, float* out);

  // Read-only: out[i, :] = value of keys[i] or zeros; found[i] = present.
  //   keys // (n)   out // (n, dim)   found // (n)
  void Find(const uint64_t* keys, int64_t n, float* out, uint8_t* found) const;

  // One optimizer step per unique key with the gradients of its duplicates
  // summed in order of appearance; missing keys are created first. Rows with
  // a non-finite summed gradient are skipped and counted.
  //   keys // (n)   grads // (n, dim)
  // Returns {rows updated, rows skipped}.
  std::pair<int64_t, int64_t> Apply(const uint64_t* keys, const float* grads,
                                    int64_t n, float lr, uint32_t time);

  // Removes keys; returns how many were present.
  int64_t Erase(const uint64_t* keys, int64_t n);

  int64_t Size() const;
  TableStats Stats() const;
  TableDump Dump() const;
  // Replaces the whole content with `d` (keys must be unique).
  void Load(const TableDump& d);
  void Clear();

 private:
  static constexpr int kSlotsPerBucket = 8;
  static constexpr int kChunkShift = 12;
  static constexpr uint32_t kRowsPerChunk = 1u << kChunkShift;
  static constexpr uint32_t kNoRow = 0xFFFFFFFFu;
  static constexpr double kMaxLoad = 0.80;
  static constexpr int kMaxKicks = 512;

  struct Bucket {
    uint8_t tag[kSlotsPerBucket];
    uint32_t row[kSlotsPerBucket];
  };
  struct Probe {
    uint64_t b1, b2;
    uint8_t tag;
  };

  Probe ProbeFor(uint64_t key, uint64_t num_buckets) const;
  uint32_t FindIn(const Bucket& b, uint8_t tag, uint64_t key) const;
  uint32_t FindRow(uint64_t key, const Probe& p) const;
  // Runs on_row(i, row) or on_miss(i) for keys[begin..end), prefetching ahead.
  template <typename OnRow, typename OnMiss>
  void ScanBlock(const uint64_t* keys, int64_t begin, int64_t end, OnRow on_row,
                 OnMiss on_miss) const;
  // The rest need the lock held exclusively.
  // Find-or-insert keys[positions[..]] (initializing new rows); on_row(i, row).
  template <typename OnRow>
  void InsertMissing(const uint64_t* keys, const int64_t* positions, int64_t count, OnRow on_row);
  uint32_t FindOrInsert(uint64_t key, bool* inserted);  // values not initialized
  uint32_t AllocateRow(uint64_t key);
  static float* NewChunk(size_t bytes, bool touch);
  float* NextChunk();
  void DropSpareChunk();
  void InitNewRow(uint32_t row, uint64_t key);
  static bool PutInEmpty(Bucket& b, uint8_t tag, uint32_t row);
  bool PlaceInIndex(std::vector<Bucket>& index, uint32_t row, uint64_t key);
  void RebuildIndex(uint64_t min_buckets);
  void ResetLocked(int64_t capacity);

  float* RowPtr(uint32_t r) const {
    return chunks_[r >> kChunkShift] + static_cast<size_t>(r & (kRowsPerChunk - 1)) * stride_;
  }
  static uint64_t RowKey(const float* row) {
    uint64_t k;
    std::memcpy(&k, row, 8);
    return k;
  }
  static uint32_t* RowMeta(float* row) { return reinterpret_cast<uint32_t*>(row) + 2; }
  static const uint32_t* RowMeta(const float* row) {
    return reinterpret_cast<const uint32_t*>(row) + 2;
  }
  bool IsLive(uint32_t r) const { return (live_[r >> 6] >> (r & 63)) & 1; }
  void SetLive(uint32_t r, bool on) {
    if (on) live_[r >> 6] |= 1ULL << (r & 63);
    else live_[r >> 6] &= ~(1ULL << (r & 63));
  }

  const TableOptions options_;
  const int dim_;
  const int slot_width_;
  const int stride_;  // floats per row: 4 (header) + dim + slot_width, even
  const uint64_t hash_seed_;

  mutable std::shared_mutex mu_;
  std::vector<Bucket> index_;
  std::vector<float*> chunks_;
  std::future<float*> spare_chunk_;  // next chunk, being faulted in
  std::vector<uint64_t> live_;
  std::vector<uint32_t> free_rows_;
  uint32_t next_row_ = 0;  // rows ever handed out (live + free)
  int64_t size_ = 0;
  uint64_t kick_state_ = 0x243F6A8885A308D3ULL;
  int64_t kicks_ = 0;

  mutable std::atomic<int64_t> lookups_{0};
  int64_t inserts_ = 0;  // guarded by mu_ (exclusive)
  std::atomic<int64_t> updates_{0}, nonfinite_{0}, rebuilds_{0};
};

}  // namespace monolith
