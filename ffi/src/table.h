// The collisionless embedding table: exact 64-bit keys -> rows of floats.
//
// Layout
// ------
//   A table is kShards shards (shard.h: a cuckoo index over rows that never
//   move). A key's hash h = Mix64(key ^ seed) picks the shard by its top 4
//   bits and the buckets inside the shard by the rest. Sharding lets inserts
//   of new ids run on several threads at once and keeps each index rebuild
//   (growth) to 1/kShards of the table while the other shards serve on.
//
// Semantics
// ---------
//   * Lookup is find-or-insert: a missing key gets a row whose values are a
//     pure function of (seed, key) (initializers.h).
//   * Apply sums the gradients of duplicate keys in order of appearance and
//     steps each unique key's row once (optimizers.h); a row whose summed
//     gradient is not finite is skipped and counted, never written.
//
// Thread safety
// -------------
//   Each shard has a reader-writer lock; calls that need several take them
//   in shard order. Lookups of present keys, Find, Dump and Stats hold the
//   shards shared and run together. Apply, Load, Erase and Clear hold every
//   shard exclusively; a lookup's inserts hold their shard exclusively. So a
//   reader sees every row either wholly before or wholly after an apply,
//   never half-written. A batched call splits its work over the process-wide
//   ThreadPool while holding its locks.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "shard.h"

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
  int64_t index_rebuilds = 0;     // times a shard's index grew
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
  static constexpr int kShardBits = 4;
  static constexpr int kShards = 1 << kShardBits;

  explicit EmbeddingTable(const TableOptions& options);
  EmbeddingTable(const EmbeddingTable&) = delete;
  EmbeddingTable& operator=(const EmbeddingTable&) = delete;

  int dim() const { return layout_.dim; }
  int slot_width() const { return layout_.slot_width; }
  const TableOptions& options() const { return options_; }

  // Find-or-insert: out[i, :] = value of keys[i], creating missing rows.
  //   keys // (n)   out // (n, dim)
  void Lookup(const uint64_t* keys, int64_t n, float* out);

  // Read-only: out[i, :] = value of keys[i] or zeros; found[i] = present.
  //   keys // (n)   out // (n, dim)   found // (n)
  void Find(const uint64_t* keys, int64_t n, float* out, uint8_t* found) const;

  // One optimizer step per unique key (see Semantics); missing keys are
  // created first.   keys // (n)   grads // (n, dim)
  // Returns {rows updated, rows skipped}.
  std::pair<int64_t, int64_t> Apply(const uint64_t* keys, const float* grads, int64_t n, float lr,
                                    uint32_t time);

  // Removes keys; returns how many were present.
  int64_t Erase(const uint64_t* keys, int64_t n);

  int64_t Size() const;
  TableStats Stats() const;
  TableDump Dump() const;
  // Replaces the whole content with `d` (keys must be unique).
  void Load(const TableDump& d);
  void Clear();

 private:
  // A row found for position i of a batch: shard << 32 | row.
  using RowRef = uint64_t;
  static constexpr RowRef kNoRef = ~0ULL;

  uint64_t Hash(uint64_t key) const { return KeyHash(key, layout_.hash_seed); }
  static int ShardOf(uint64_t h) { return static_cast<int>(h >> (64 - kShardBits)); }

  // on_row(i, shard, row) or on_miss(i) for keys[begin..end), prefetching ahead.
  template <typename OnRow, typename OnMiss>
  void Scan(const uint64_t* keys, int64_t begin, int64_t end, OnRow on_row, OnMiss on_miss) const;
  // Inserts keys[positions[..]] into `shard` (its lock held exclusively),
  // initializes the new rows, then on_row(i, row) for each position.
  template <typename OnRow>
  void InsertInto(Shard& shard, const uint64_t* keys, const std::vector<int64_t>& positions,
                  OnRow on_row);

  const TableOptions options_;
  const RowLayout layout_;
  std::array<std::unique_ptr<Shard>, kShards> shards_;

  mutable std::atomic<int64_t> lookups_{0};
  std::atomic<int64_t> updates_{0}, nonfinite_{0};
};

}  // namespace monolith
