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
//     steps each unique key's row once (optimizers.h). A row whose summed
//     gradient is not finite, or whose stepped values or optimizer slots
//     would not be (a finite gradient times a large learning rate can
//     overflow), is skipped and counted, never written: it keeps its values,
//     slots, update count, last update and touched mark.
//   * With an admission filter, only admitted ids get rows (see TableOptions).
//   * Memory control: Expire() drops rows not updated for expire_after; with
//     max_rows, a call that leaves more rows evicts the least recently
//     updated (LRU) or least often updated (LFU) ones down to 95% of it at
//     its end (so a batch may overshoot by its own new rows until then).
//   * Touched rows (created or updated since the last DrainTouched) are kept
//     as one bit per row, for incremental sync to serving.
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
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "shard.h"

namespace monolith {

enum class Eviction : int32_t { kLRU = 0, kLFU = 1 };

struct TableOptions {
  int dim = 8;                    // floats per row
  InitializerConfig initializer;  // values of a new row
  OptimizerConfig optimizer;      // fused update rule and its slots
  uint64_t seed = 0;              // initializer and hash seed
  int64_t capacity_hint = 0;      // rows to size the index for up front
  // Admission (the paper's feature filter). An unadmitted id has no row: a
  // lookup reads the default (zeros, or its initializer values) and an apply
  // drops its gradient. Sightings are counted in a counting sketch of
  // filter_counters uint8 counters, so memory does not grow with the ids.
  uint32_t occurrence_threshold = 0;    // > 1: admit at this many sightings
  float admit_probability = 1.0f;       // < 1 (threshold <= 1): admit each sighting with it
  int64_t filter_counters = 0;          // sketch size in bytes, all shards together
  bool unadmitted_initializer = false;  // unadmitted ids read as initializer values
  uint32_t expire_after = 0;            // Expire(now) drops rows older than this; 0: never
  int64_t max_rows = 0;                 // capacity bound; 0: none
  Eviction eviction = Eviction::kLRU;   // which rows go when over max_rows
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
  int64_t nonfinite_skipped = 0;  // row updates refused: NaN/Inf gradient or result
  int64_t index_rebuilds = 0;     // times a shard's index grew
  int64_t index_kicks = 0;        // cuckoo displacements so far
  int64_t bytes_filter = 0;       // admission sketch
  int64_t filtered = 0;           // lookups of ids not admitted (read the default)
  int64_t dropped = 0;            // gradient rows of ids not admitted (not applied)
  int64_t expired = 0;            // rows removed by Expire
  int64_t evicted = 0;            // rows removed by the capacity bound
  int64_t touched = 0;            // rows created or updated since the last drain
};

// A table's rows as arrays that the caller owns: what Dump writes and Load
// reads, so neither copies through a buffer of its own.
template <bool Const>
struct RowArraysT {
  template <typename T>
  using P = std::conditional_t<Const, const T*, T*>;
  P<uint64_t> keys = nullptr;          // (rows)
  P<float> values = nullptr;           // (rows, dim)
  P<float> slots = nullptr;            // (rows, slot_width)
  P<uint32_t> last_update = nullptr;   // (rows)
  P<uint32_t> update_count = nullptr;  // (rows)
  P<uint8_t> touched = nullptr;        // (rows); Load: null = every row touched
  P<uint8_t> filter = nullptr;         // (filter) admission sketch
  P<uint64_t> removed = nullptr;       // (removed) Dump of changes: keys erased since the base
};
using DumpArrays = RowArraysT<false>;
using LoadArrays = RowArraysT<true>;

struct DumpSizes {
  int64_t rows = 0, filter = 0, removed = 0;
  uint32_t clock = 0;  // the latest apply time seen
};

// What a Dump takes: every row (kAll, the table unchanged); every row and
// start a new change record (kBase: a full snapshot that deltas follow);
// the rows changed and the keys removed since the last kBase or kChanges
// dump, starting a new record (kChanges: a delta snapshot).
enum class DumpMode : int { kAll = 0, kBase = 1, kChanges = 2 };
// Called once, under the table's locks, with the sizes: returns the arrays
// to fill (it must not call into the table).
using DumpAlloc = std::function<DumpArrays(const DumpSizes&)>;

// Rows as keys and values only (a serving copy).
struct TableRows {
  std::vector<uint64_t> keys;  // (n)
  std::vector<float> values;   // (n, dim)
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
  // Sets the values of rows, creating missing ones (no admission filter,
  // optimizer slots zeroed, last_update = now): the serving side's write.
  // Each shard is written under its own exclusive lock, so a concurrent
  // reader sees a row either before or after, never torn. Duplicate keys:
  // the last wins. Returns the number of rows created.
  int64_t Assign(const uint64_t* keys, const float* values, int64_t n, uint32_t now);

  // Removes rows whose last update is more than expire_after before `now`
  // (0: the latest apply time seen), one shard at a time so lookups go on in
  // the others. Returns how many.
  int64_t Expire(uint32_t now);
  // The rows created or updated since the last drain, clearing the marks
  // (one shard at a time).
  TableRows DrainTouched();
  // Every row's key and values.
  TableRows Export() const;

  int64_t Size() const;
  TableStats Stats() const;
  // Fills the arrays `alloc` returns, every shard by its own task of the
  // pool. kAll holds the shards shared; kBase and kChanges exclusively (they
  // clear the change record). kChanges returns false, taking nothing, when
  // the record does not cover everything since the last snapshot (no kBase
  // dump yet, or a Load or Clear since): take a kBase dump instead.
  bool Dump(DumpMode mode, const DumpAlloc& alloc, DumpSizes* sizes);
  // Whether a kChanges dump would cover everything since the last one.
  bool ChangesTracked() const { return changes_tracked_.load(); }
  // Replaces the whole content with `d` (sizes.rows rows; sizes.removed is
  // ignored). The new shards are built aside, in parallel, and swapped in
  // only when whole: arrays that do not fit, a NaN or Inf value or slot, or
  // a key given twice throw std::invalid_argument with the table unchanged.
  void Load(const LoadArrays& d, const DumpSizes& sizes);
  void Clear();

 private:
  // A row found for position i of a batch: shard << 32 | row.
  using RowRef = uint64_t;
  static constexpr RowRef kNoRef = ~0ULL;

  uint64_t Hash(uint64_t key) const { return KeyHash(key, layout_.hash_seed); }
  static int ShardOf(uint64_t h) { return static_cast<int>(h >> (64 - kShardBits)); }

  // on_row(i, shard index, shard, row) or on_miss(i) for keys[begin..end),
  // prefetching ahead.
  template <typename OnRow, typename OnMiss>
  void Scan(const uint64_t* keys, int64_t begin, int64_t end, OnRow on_row, OnMiss on_miss) const;
  // Inserts keys[positions[..]] into `shard` (its lock held exclusively),
  // initializes the new rows, then on_row(i, row) for each position.
  // on_row gets Shard::kNoRow for an id the admission filter refuses.
  template <typename OnRow>
  void InsertInto(Shard& shard, const uint64_t* keys, const std::vector<int64_t>& positions,
                  OnRow on_row);
  bool Filtering() const { return options_.occurrence_threshold > 1 || options_.admit_probability < 1.0f; }
  bool Admit(uint64_t key, uint32_t sightings) const;
  void WriteDefault(uint64_t key, float* out) const;
  std::pair<int64_t, int64_t> ApplyLocked(const uint64_t* keys, const float* grads, int64_t n, float lr,
                                          uint32_t time);
  // Evicts down to the low watermark when over max_rows (takes every lock).
  void EnforceCapacity();

  const TableOptions options_;
  const RowLayout layout_;
  std::array<std::unique_ptr<Shard>, kShards> shards_;

  mutable std::atomic<int64_t> lookups_{0};
  std::atomic<int64_t> updates_{0}, nonfinite_{0};
  std::atomic<int64_t> filtered_{0}, dropped_{0}, expired_{0}, evicted_{0};
  std::atomic<int64_t> rows_{0};     // live rows, all shards
  std::atomic<uint32_t> clock_{0};  // the latest apply time seen
  std::atomic<bool> changes_tracked_{false};  // see ChangesTracked()
};

}  // namespace monolith
