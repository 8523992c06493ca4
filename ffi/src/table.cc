// The sharded table's batched operations and locking (table.h).
#include "table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace monolith {
namespace {

// Below this many ids a batched call runs on the calling thread alone.
constexpr int64_t kParallelMin = 4096;
// Below this many new rows, inserts run on the calling thread alone.
constexpr int64_t kParallelInsertMin = 512;
// Keys per block of the lookup pipeline, and how far inserts prefetch ahead.
constexpr int kBlock = 8;
constexpr int64_t kInsertAhead = 16;

inline int Parts(int64_t n) {
  if (n < kParallelMin) return 1;
  return ThreadPool::Global().Parallelism();
}

// Copies one row of `dim` floats; the common dims get a fixed-size copy that
// compiles to a few vector moves instead of a call to memcpy.
inline void CopyRow(float* __restrict dst, const float* __restrict src, int dim) {
  switch (dim) {
    case 8: std::memcpy(dst, src, 32); return;
    case 16: std::memcpy(dst, src, 64); return;
    case 32: std::memcpy(dst, src, 128); return;
    case 64: std::memcpy(dst, src, 256); return;
    default: std::memcpy(dst, src, static_cast<size_t>(dim) * sizeof(float));
  }
}

inline bool AllFinite(const float* g, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += g[i] * 0.0f;  // NaN iff some g is NaN/Inf
  return acc == 0.0f;
}

// How many of v[0..n) are NaN or infinite.
inline int64_t CountNonFinite(const float* v, size_t n) {
  int64_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += !std::isfinite(v[i]);
  return bad;
}

using Shards = std::array<std::unique_ptr<Shard>, EmbeddingTable::kShards>;

// Every shard's lock, taken in shard order (so callers never deadlock).
class SharedAll {
 public:
  explicit SharedAll(const Shards& s) : s_(s) {
    for (auto& sh : s_) sh->mu.lock_shared();
  }
  ~SharedAll() {
    for (auto it = s_.rbegin(); it != s_.rend(); ++it) (*it)->mu.unlock_shared();
  }

 private:
  const Shards& s_;
};

class ExclusiveAll {
 public:
  explicit ExclusiveAll(const Shards& s) : s_(s) {
    for (auto& sh : s_) sh->mu.lock();
  }
  ~ExclusiveAll() {
    for (auto it = s_.rbegin(); it != s_.rend(); ++it) (*it)->mu.unlock();
  }

 private:
  const Shards& s_;
};

// Per-thread scratch for Apply, kept between calls to avoid reallocation.
struct ApplyScratch {
  std::vector<int64_t> positions;
  std::vector<uint64_t> map_ref;    // RowRef, ~0 = empty
  std::vector<uint32_t> map_index;  // its unique index
  std::vector<uint64_t> unique_refs;
  std::vector<float> grad_sum;
  std::vector<float> row;  // one row's values and slots, stepped before they are kept
};

}  // namespace

EmbeddingTable::EmbeddingTable(const TableOptions& options)
    : options_(options),
      layout_{options.dim,
              SlotWidth(options.optimizer.kind, options.dim),
              ((4 + options.dim + SlotWidth(options.optimizer.kind, options.dim)) + 1) & ~1,
              options.seed,
              Mix64(options.seed ^ 0x5851F42D4C957F2DULL),
              options.initializer,
              options.optimizer} {
  if (options.dim <= 0) throw std::invalid_argument("dim must be positive");
  if (Filtering() && options.filter_counters < kShards * 64) {
    throw std::invalid_argument("an admission filter needs filter_counters >= 1024");
  }
  const int64_t per_shard = (std::max<int64_t>(options.capacity_hint, 0) + kShards - 1) / kShards;
  const int64_t sketch = Filtering() ? options.filter_counters / kShards : 0;
  for (auto& s : shards_) s = std::make_unique<Shard>(layout_, per_shard, sketch);
}

bool EmbeddingTable::Admit(uint64_t key, uint32_t sightings) const {
  if (options_.occurrence_threshold > 1) return sightings >= options_.occurrence_threshold;
  // One seeded draw per (key, sighting): a replay of the stream decides alike.
  const uint64_t draw = Mix64(layout_.hash_seed ^ Mix64(key) ^ (sightings * 0xD1B54A32D192ED03ULL));
  return UnitFloat(draw) <= options_.admit_probability;
}

void EmbeddingTable::WriteDefault(uint64_t key, float* out) const {
  if (options_.unadmitted_initializer) {
    InitRowValues(layout_.initializer, layout_.seed, key, layout_.dim, out);
  } else {
    std::memset(out, 0, static_cast<size_t>(layout_.dim) * sizeof(float));
  }
}

template <typename OnRow, typename OnMiss>
void EmbeddingTable::Scan(const uint64_t* keys, int64_t begin, int64_t end, OnRow on_row,
                          OnMiss on_miss) const {
  // A three-stage software pipeline over blocks of keys: hash and prefetch
  // the buckets of block k+kHashAhead, find (and prefetch) the rows that the
  // tags of block k+kRowAhead point to, compare and copy block k. Each stage
  // runs about one memory latency ahead of the next.
  constexpr int kHashAhead = 4, kRowAhead = 2, kRing = 8;
  struct Slot {
    Shard::Probe probe;
    const Shard* shard;
    int shard_index;
    uint32_t candidate;
  };
  Slot ring[kRing][kBlock];
  const int64_t blocks = (end - begin + kBlock - 1) / kBlock;
  auto block_size = [&](int64_t b) {
    return static_cast<int>(std::min<int64_t>(kBlock, end - (begin + b * kBlock)));
  };
  auto hash_stage = [&](int64_t b) {
    Slot* sl = ring[b % kRing];
    const uint64_t* k = keys + begin + b * kBlock;
    for (int j = 0, m = block_size(b); j < m; ++j) {
      const uint64_t h = Hash(k[j]);
      sl[j].shard_index = ShardOf(h);
      sl[j].shard = shards_[sl[j].shard_index].get();
      sl[j].probe = sl[j].shard->ProbeFor(h);
      sl[j].shard->PrefetchBuckets(sl[j].probe);
    }
  };
  auto row_stage = [&](int64_t b) {
    Slot* sl = ring[b % kRing];
    for (int j = 0, m = block_size(b); j < m; ++j) sl[j].candidate = sl[j].shard->Candidate(sl[j].probe);
  };
  for (int64_t b = 0; b < std::min<int64_t>(kHashAhead, blocks); ++b) hash_stage(b);
  for (int64_t b = 0; b < std::min<int64_t>(kRowAhead, blocks); ++b) row_stage(b);
  for (int64_t b = 0; b < blocks; ++b) {
    if (b + kHashAhead < blocks) hash_stage(b + kHashAhead);
    if (b + kRowAhead < blocks) row_stage(b + kRowAhead);
    const Slot* sl = ring[b % kRing];
    const int64_t i0 = begin + b * kBlock;
    for (int j = 0, m = block_size(b); j < m; ++j) {
      const uint64_t key = keys[i0 + j];
      const Shard& sh = *sl[j].shard;
      // The first tag match is almost always the key; else search in full.
      const uint32_t c = sl[j].candidate;
      const uint32_t r = (c != Shard::kNoRow && Shard::RowKey(sh.Row(c)) == key) ? c : sh.FindRow(key, sl[j].probe);
      if (r == Shard::kNoRow) on_miss(i0 + j);
      else on_row(i0 + j, sl[j].shard_index, sh, r);
    }
  }
}

template <typename OnRow>
void EmbeddingTable::InsertInto(Shard& sh, const uint64_t* keys, const std::vector<int64_t>& positions,
                                OnRow on_row) {
  // Index inserts are serial within a shard. Buckets are prefetched a few
  // keys early so their cache misses overlap (a rebuild in between only
  // makes a prefetch useless, never wrong), and so is the row the next
  // insert takes.
  const int64_t count = static_cast<int64_t>(positions.size());
  const bool filtering = Filtering();
  const uint32_t now = clock_.load(std::memory_order_relaxed);
  std::vector<uint32_t> row_of(count);
  std::vector<uint32_t> fresh;
  auto prefetch = [&](int64_t j) { sh.PrefetchBuckets(sh.ProbeFor(Hash(keys[positions[j]])), true); };
  for (int64_t j = 0; j < std::min(kInsertAhead, count); ++j) prefetch(j);
  for (int64_t j = 0; j < count; ++j) {
    if (j + kInsertAhead < count) prefetch(j + kInsertAhead);
    const uint32_t next = sh.NextFreeRow(4);
    if (next != Shard::kNoRow) __builtin_prefetch(sh.Row(next), 1);
    const uint64_t key = keys[positions[j]];
    const uint64_t h = Hash(key);
    if (filtering && sh.FindRow(key, sh.ProbeFor(h)) == Shard::kNoRow && !Admit(key, sh.Sighting(h))) {
      row_of[j] = Shard::kNoRow;
      continue;
    }
    bool inserted;
    row_of[j] = sh.FindOrInsert(key, h, now, &inserted);
    if (inserted) fresh.push_back(row_of[j]);
  }
  for (uint32_t r : fresh) sh.InitRow(r);
  rows_.fetch_add(static_cast<int64_t>(fresh.size()), std::memory_order_relaxed);
  for (int64_t j = 0; j < count; ++j) on_row(positions[j], row_of[j]);
}

void EmbeddingTable::Lookup(const uint64_t* keys, int64_t n, float* out) {
  lookups_.fetch_add(n, std::memory_order_relaxed);
  const int dim = layout_.dim;
  const int parts = Parts(n);
  std::vector<std::vector<int64_t>> misses(parts);
  ThreadPool& pool = ThreadPool::Global();
  {
    SharedAll lock(shards_);
    pool.ParallelFor(parts, [&](int part) {
      Scan(
          keys, n * part / parts, n * (part + 1) / parts,
          [&](int64_t i, int, const Shard& sh, uint32_t r) { CopyRow(out + i * dim, sh.Row(r) + 4, dim); },
          [&](int64_t i) { misses[part].push_back(i); });
    });
  }
  std::array<std::vector<int64_t>, kShards> by_shard;
  int64_t missing = 0;
  for (auto& m : misses) {
    for (int64_t i : m) by_shard[ShardOf(Hash(keys[i]))].push_back(i);
    missing += static_cast<int64_t>(m.size());
  }
  if (missing == 0) return;
  // New rows: each worker owns whole shards and locks one at a time.
  const int workers = missing < kParallelInsertMin ? 1 : pool.Parallelism();
  pool.ParallelFor(workers, [&](int w) {
    for (int s = w; s < kShards; s += workers) {
      if (by_shard[s].empty()) continue;
      Shard& sh = *shards_[s];
      std::unique_lock<std::shared_mutex> lock(sh.mu);
      int64_t refused = 0;
      InsertInto(sh, keys, by_shard[s], [&](int64_t i, uint32_t r) {
        if (r == Shard::kNoRow) {
          WriteDefault(keys[i], out + i * dim);
          ++refused;
        } else {
          CopyRow(out + i * dim, sh.Row(r) + 4, dim);
        }
      });
      filtered_.fetch_add(refused, std::memory_order_relaxed);
    }
  });
  EnforceCapacity();
}

void EmbeddingTable::Find(const uint64_t* keys, int64_t n, float* out, uint8_t* found) const {
  const int dim = layout_.dim;
  const int parts = Parts(n);
  SharedAll lock(shards_);
  ThreadPool::Global().ParallelFor(parts, [&](int part) {
    Scan(
        keys, n * part / parts, n * (part + 1) / parts,
        [&](int64_t i, int, const Shard& sh, uint32_t r) {
          CopyRow(out + i * dim, sh.Row(r) + 4, dim);
          found[i] = 1;
        },
        [&](int64_t i) {
          std::memset(out + i * dim, 0, static_cast<size_t>(dim) * sizeof(float));
          found[i] = 0;
        });
  });
}

std::pair<int64_t, int64_t> EmbeddingTable::Apply(const uint64_t* keys, const float* grads, int64_t n,
                                                  float lr, uint32_t time) {
  if (n == 0) return {0, 0};
  for (uint32_t c = clock_.load(); c < time && !clock_.compare_exchange_weak(c, time);) {
  }
  std::pair<int64_t, int64_t> result = ApplyLocked(keys, grads, n, lr, time);
  EnforceCapacity();
  return result;
}

std::pair<int64_t, int64_t> EmbeddingTable::ApplyLocked(const uint64_t* keys, const float* grads,
                                                        int64_t n, float lr, uint32_t time) {
  ExclusiveAll lock(shards_);
  std::vector<RowRef> refs(n);
  const int parts = Parts(n);
  ThreadPool& pool = ThreadPool::Global();
  // 1. Rows of present keys, in parallel.
  pool.ParallelFor(parts, [&](int part) {
    Scan(
        keys, n * part / parts, n * (part + 1) / parts,
        [&](int64_t i, int shard, const Shard&, uint32_t r) {
          refs[i] = (static_cast<uint64_t>(shard) << 32) | r;
        },
        [&](int64_t i) { refs[i] = kNoRef; });
  });
  // 2. Missing keys get rows; each worker owns whole shards.
  std::array<std::vector<int64_t>, kShards> by_shard;
  int64_t missing = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (refs[i] == kNoRef) {
      by_shard[ShardOf(Hash(keys[i]))].push_back(i);
      ++missing;
    }
  }
  if (missing && Filtering()) {
    // Ids without a row were not admitted: their gradients are dropped.
    dropped_.fetch_add(missing, std::memory_order_relaxed);
  } else if (missing) {
    const int workers = missing < kParallelInsertMin ? 1 : pool.Parallelism();
    pool.ParallelFor(workers, [&](int w) {
      for (int s = w; s < kShards; s += workers) {
        if (by_shard[s].empty()) continue;
        InsertInto(*shards_[s], keys, by_shard[s],
                   [&](int64_t i, uint32_t r) { refs[i] = (static_cast<uint64_t>(s) << 32) | r; });
      }
    });
  }
  // 3. Each part owns the shards s with s % parts == part: sum the gradients
  //    of duplicate keys in order of appearance, then step each row once.
  std::atomic<int64_t> updated{0}, skipped{0};
  const OptimizerConfig& opt = layout_.optimizer;
  const int dim = layout_.dim;
  const int row_bytes = layout_.stride * static_cast<int>(sizeof(float));
  pool.ParallelFor(parts, [&](int part) {
    thread_local ApplyScratch s;
    s.positions.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (refs[i] != kNoRef && static_cast<int>(refs[i] >> 32) % parts == part) s.positions.push_back(i);
    }
    size_t cap = 16;
    while (cap < 2 * s.positions.size()) cap <<= 1;
    s.map_ref.assign(cap, kNoRef);
    s.map_index.resize(cap);
    s.unique_refs.clear();
    s.grad_sum.resize(s.positions.size() * dim);
    const size_t mask = cap - 1;
    const int shift = 64 - __builtin_ctzll(cap);
    for (int64_t i : s.positions) {
      const RowRef ref = refs[i];
      const float* g = grads + i * dim;
      for (size_t h = (ref * 0x9E3779B97F4A7C15ULL) >> shift;; h = (h + 1) & mask) {
        if (s.map_ref[h] == kNoRef) {
          const uint32_t u = static_cast<uint32_t>(s.unique_refs.size());
          s.map_ref[h] = ref;
          s.map_index[h] = u;
          s.unique_refs.push_back(ref);
          std::memcpy(&s.grad_sum[static_cast<size_t>(u) * dim], g, dim * sizeof(float));
          break;
        }
        if (s.map_ref[h] == ref) {
          float* acc = &s.grad_sum[static_cast<size_t>(s.map_index[h]) * dim];
          for (int k = 0; k < dim; ++k) acc[k] += g[k];
          break;
        }
      }
    }
    int64_t ok = 0, bad = 0;
    const size_t u_count = s.unique_refs.size();
    const int state = dim + layout_.slot_width;  // values, then slots
    s.row.resize(static_cast<size_t>(state));
    auto row_of = [&](RowRef ref) { return shards_[ref >> 32]->Row(static_cast<uint32_t>(ref)); };
    for (size_t u = 0; u < u_count; ++u) {
      if (u + 6 < u_count) {  // the whole row: values and optimizer slots
        const char* row = reinterpret_cast<const char*>(row_of(s.unique_refs[u + 6]));
        for (int off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 1);
      }
      const float* g = &s.grad_sum[u * dim];
      if (!AllFinite(g, dim)) {
        ++bad;
        continue;
      }
      const RowRef ref = s.unique_refs[u];
      float* row = row_of(ref);
      uint32_t* meta = Shard::Meta(row);
      const uint32_t count = meta[1] == 0xFFFFFFFFu ? meta[1] : meta[1] + 1;
      // The step goes to a copy; a result with a NaN or Inf anywhere in the
      // values or slots (a finite gradient times a large rate can overflow)
      // is dropped and counted, and the row stays as it was.
      float* next = s.row.data();
      std::memcpy(next, row + 4, static_cast<size_t>(state) * sizeof(float));
      ApplyRule(opt, dim, lr, count, g, next, next + dim);
      if (!AllFinite(next, state)) {
        ++bad;
        continue;
      }
      std::memcpy(row + 4, next, static_cast<size_t>(state) * sizeof(float));
      shards_[ref >> 32]->Touch(static_cast<uint32_t>(ref));
      meta[0] = time;
      meta[1] = count;
      ++ok;
    }
    updated.fetch_add(ok, std::memory_order_relaxed);
    skipped.fetch_add(bad, std::memory_order_relaxed);
  });
  updates_.fetch_add(updated.load(), std::memory_order_relaxed);
  nonfinite_.fetch_add(skipped.load(), std::memory_order_relaxed);
  return {updated.load(), skipped.load()};
}

int64_t EmbeddingTable::Erase(const uint64_t* keys, int64_t n) {
  ExclusiveAll lock(shards_);
  int64_t erased = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = Hash(keys[i]);
    erased += shards_[ShardOf(h)]->Erase(keys[i], h);
  }
  rows_.fetch_sub(erased, std::memory_order_relaxed);
  return erased;
}

int64_t EmbeddingTable::Assign(const uint64_t* keys, const float* values, int64_t n, uint32_t now) {
  const int dim = layout_.dim, width = layout_.slot_width;
  std::array<std::vector<int64_t>, kShards> by_shard;
  std::vector<uint64_t> hashes(n);
  for (int64_t i = 0; i < n; ++i) {
    hashes[i] = Hash(keys[i]);
    by_shard[ShardOf(hashes[i])].push_back(i);
  }
  int64_t created = 0;
  for (int s = 0; s < kShards; ++s) {
    if (by_shard[s].empty()) continue;
    Shard& sh = *shards_[s];
    std::unique_lock<std::shared_mutex> lock(sh.mu);
    for (int64_t i : by_shard[s]) {
      bool inserted;
      const uint32_t r = sh.FindOrInsert(keys[i], hashes[i], now, &inserted);
      float* row = sh.Row(r);
      std::memcpy(row + 4, values + i * dim, dim * sizeof(float));
      if (inserted) {
        ++created;
        for (int k = 4 + dim; k < layout_.stride; ++k) row[k] = 0.0f;
        (void)width;
      }
      Shard::Meta(row)[0] = now;
    }
  }
  rows_.fetch_add(created, std::memory_order_relaxed);
  EnforceCapacity();
  return created;
}

int64_t EmbeddingTable::Expire(uint32_t now) {
  if (options_.expire_after == 0) return 0;
  if (now == 0) now = clock_.load();
  if (now <= options_.expire_after) return 0;
  const uint32_t cutoff = now - options_.expire_after;  // rows updated before it go
  int64_t removed = 0;
  for (auto& shard : shards_) {
    std::unique_lock<std::shared_mutex> lock(shard->mu);
    std::vector<uint32_t> old;
    shard->ForEachLiveRow([&](uint32_t r) {
      if (Shard::Meta(shard->Row(r))[0] < cutoff) old.push_back(r);
    });
    for (uint32_t r : old) shard->EraseRow(r);
    removed += static_cast<int64_t>(old.size());
  }
  rows_.fetch_sub(removed, std::memory_order_relaxed);
  expired_.fetch_add(removed, std::memory_order_relaxed);
  return removed;
}

void EmbeddingTable::EnforceCapacity() {
  const int64_t cap = options_.max_rows;
  if (cap <= 0 || rows_.load(std::memory_order_relaxed) <= cap) return;
  ExclusiveAll lock(shards_);
  struct Victim {
    uint64_t first, second, key;
    uint32_t shard, row;
  };
  std::vector<Victim> all;
  all.reserve(static_cast<size_t>(rows_.load()));
  const bool lru = options_.eviction == Eviction::kLRU;
  for (uint32_t s = 0; s < kShards; ++s) {
    const Shard& sh = *shards_[s];
    sh.ForEachLiveRow([&](uint32_t r) {
      const float* row = sh.Row(r);
      const uint64_t last = Shard::Meta(row)[0], count = Shard::Meta(row)[1];
      all.push_back({lru ? last : count, lru ? count : last, Shard::RowKey(row), s, r});
    });
  }
  const int64_t total = static_cast<int64_t>(all.size());
  const int64_t keep = cap - std::max<int64_t>(1, cap / 20);  // low watermark: 95%
  if (total <= cap) return;
  const int64_t k = total - keep;
  // LRU: oldest last update first (then fewest updates); LFU: fewest updates
  // first (then oldest); the key breaks ties, so the choice is exact.
  auto less = [](const Victim& a, const Victim& b) {
    if (a.first != b.first) return a.first < b.first;
    if (a.second != b.second) return a.second < b.second;
    return a.key < b.key;
  };
  std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), less);
  for (int64_t i = 0; i < k; ++i) shards_[all[i].shard]->EraseRow(all[i].row);
  rows_.fetch_sub(k, std::memory_order_relaxed);
  evicted_.fetch_add(k, std::memory_order_relaxed);
}

TableRows EmbeddingTable::DrainTouched() {
  const int dim = layout_.dim;
  TableRows out;
  for (auto& shard : shards_) {
    std::unique_lock<std::shared_mutex> lock(shard->mu);
    shard->DrainTouched([&](uint32_t r) {
      const float* row = shard->Row(r);
      out.keys.push_back(Shard::RowKey(row));
      out.values.insert(out.values.end(), row + 4, row + 4 + dim);
    });
  }
  return out;
}

TableRows EmbeddingTable::Export() const {
  SharedAll lock(shards_);
  const int dim = layout_.dim;
  TableRows out;
  int64_t n = 0;
  for (auto& s : shards_) n += s->size();
  out.keys.resize(n);
  out.values.resize(static_cast<size_t>(n) * dim);
  size_t i = 0;
  for (auto& s : shards_) {
    s->ForEachLive([&](const float* row) {
      out.keys[i] = Shard::RowKey(row);
      std::memcpy(&out.values[i * dim], row + 4, dim * sizeof(float));
      ++i;
    });
  }
  return out;
}

int64_t EmbeddingTable::Size() const {
  SharedAll lock(shards_);
  int64_t n = 0;
  for (auto& s : shards_) n += s->size();
  return n;
}

TableStats EmbeddingTable::Stats() const {
  SharedAll lock(shards_);
  TableStats st;
  int64_t held = 0;
  for (auto& s : shards_) {
    st.rows += s->size();
    st.row_capacity += s->row_capacity();
    st.index_slots += s->index_slots();
    st.inserts += s->inserts();
    st.index_rebuilds += s->rebuilds();
    st.index_kicks += s->kicks();
    st.bytes_filter += s->sketch_bytes();
    st.touched += s->touched();
    held += s->BytesHeld();
  }
  held -= st.bytes_filter;
  st.bytes_values = st.rows * layout_.dim * 4;
  st.bytes_slots = st.rows * layout_.slot_width * 4;
  st.bytes_overhead = held + static_cast<int64_t>(sizeof(*this)) - st.bytes_values - st.bytes_slots;
  st.lookups = lookups_.load();
  st.updates = updates_.load();
  st.nonfinite_skipped = nonfinite_.load();
  st.filtered = filtered_.load();
  st.dropped = dropped_.load();
  st.expired = expired_.load();
  st.evicted = evicted_.load();
  return st;
}

bool EmbeddingTable::Dump(DumpMode mode, const DumpAlloc& alloc, DumpSizes* sizes) {
  std::optional<SharedAll> shared;
  std::optional<ExclusiveAll> exclusive;
  if (mode == DumpMode::kAll) shared.emplace(shards_);
  else exclusive.emplace(shards_);
  const bool changes = mode == DumpMode::kChanges;
  if (changes && !changes_tracked_.load()) return false;
  std::array<int64_t, kShards + 1> start{}, gone{};
  DumpSizes z;
  for (int s = 0; s < kShards; ++s) {
    const Shard& sh = *shards_[s];
    start[s + 1] = start[s] + (changes ? sh.dirty() : sh.size());
    gone[s + 1] = gone[s] + (changes ? static_cast<int64_t>(sh.removed().size()) : 0);
    z.filter += sh.sketch_bytes();
  }
  z.rows = start[kShards];
  z.removed = gone[kShards];
  z.clock = clock_.load();
  const DumpArrays d = alloc(z);
  const int dim = layout_.dim, width = layout_.slot_width;
  ThreadPool::Global().ParallelFor(kShards, [&](int s) {
    const Shard& sh = *shards_[s];
    int64_t i = start[s];
    auto put = [&](uint32_t r) {
      const float* row = sh.Row(r);
      d.keys[i] = Shard::RowKey(row);
      d.last_update[i] = Shard::Meta(row)[0];
      d.update_count[i] = Shard::Meta(row)[1];
      d.touched[i] = sh.IsTouched(r);
      CopyRow(d.values + i * dim, row + 4, dim);
      if (width) std::memcpy(d.slots + i * width, row + 4 + dim, width * sizeof(float));
      ++i;
    };
    if (changes) sh.ForEachDirty(put);
    else sh.ForEachLiveRow(put);
    const int64_t w = sh.sketch_bytes();
    if (w) std::memcpy(d.filter + s * w, sh.sketch().data(), static_cast<size_t>(w));
    if (gone[s + 1] > gone[s]) {
      std::memcpy(d.removed + gone[s], sh.removed().data(), (gone[s + 1] - gone[s]) * sizeof(uint64_t));
    }
  });
  if (mode != DumpMode::kAll) {
    for (auto& sh : shards_) sh->ResetChanges(true);
    changes_tracked_.store(true);
  }
  *sizes = z;
  return true;
}

void EmbeddingTable::Load(const LoadArrays& d, const DumpSizes& z) {
  const int64_t n = z.rows;
  const int dim = layout_.dim, width = layout_.slot_width;
  const int64_t sketch = Filtering() ? options_.filter_counters / kShards : 0;
  if (n < 0 || z.filter != sketch * kShards) {
    throw std::invalid_argument("the dump's admission filter does not match this table's filter_counters");
  }
  ThreadPool& pool = ThreadPool::Global();
  // Checked before anything changes: a refused dump leaves the table whole.
  const int parts = Parts(n);
  std::atomic<int64_t> bad_values{0}, bad_slots{0};
  pool.ParallelFor(parts, [&](int p) {
    const int64_t lo = n * p / parts, hi = n * (p + 1) / parts;
    bad_values.fetch_add(CountNonFinite(d.values + lo * dim, static_cast<size_t>((hi - lo) * dim)));
    bad_slots.fetch_add(CountNonFinite(d.slots + lo * width, static_cast<size_t>((hi - lo) * width)));
  });
  if (bad_values.load() || bad_slots.load()) {
    throw std::invalid_argument("the dump holds " + std::to_string(bad_values.load()) + " non-finite values and " +
                                std::to_string(bad_slots.load()) +
                                " non-finite optimizer slots; nothing was loaded");
  }
  // Rows grouped by shard (a counting sort on the shard of each key's
  // hash), then each shard built aside by one task: shards share nothing,
  // so the pool fills them in parallel with no locks.
  std::vector<uint8_t> shard_of(n);
  std::vector<std::array<int64_t, kShards>> counts(parts);
  pool.ParallelFor(parts, [&](int p) {
    counts[p].fill(0);
    for (int64_t i = n * p / parts, hi = n * (p + 1) / parts; i < hi; ++i) {
      shard_of[i] = static_cast<uint8_t>(ShardOf(Hash(d.keys[i])));
      ++counts[p][shard_of[i]];
    }
  });
  std::array<int64_t, kShards + 1> start{};
  for (int s = 0; s < kShards; ++s) {
    start[s + 1] = start[s];
    for (int p = 0; p < parts; ++p) start[s + 1] += counts[p][s];
  }
  std::vector<int64_t> order(n);
  {
    std::array<int64_t, kShards> next;
    std::copy(start.begin(), start.end() - 1, next.begin());
    for (int64_t i = 0; i < n; ++i) order[next[shard_of[i]]++] = i;
  }
  const int64_t hint = (std::max<int64_t>(options_.capacity_hint, 0) + kShards - 1) / kShards;
  std::array<std::unique_ptr<Shard>, kShards> fresh;
  std::atomic<int64_t> duplicates{0};
  pool.ParallelFor(kShards, [&](int s) {
    fresh[s] = std::make_unique<Shard>(layout_, std::max(start[s + 1] - start[s], hint), sketch);
    Shard& sh = *fresh[s];
    if (sketch) sh.SetSketch(d.filter + s * sketch, sketch);
    for (int64_t j = start[s]; j < start[s + 1]; ++j) {
      const int64_t i = order[j];
      bool inserted;
      const uint32_t r = sh.FindOrInsert(d.keys[i], Hash(d.keys[i]), 0, &inserted);
      if (!inserted) {
        duplicates.fetch_add(1);
        return;
      }
      if (d.touched != nullptr && !d.touched[i]) sh.DrainOne(r);
      float* row = sh.Row(r);
      CopyRow(row + 4, d.values + i * dim, dim);
      if (width) std::memcpy(row + 4 + dim, d.slots + i * width, width * sizeof(float));
      for (int k = 4 + dim + width; k < layout_.stride; ++k) row[k] = 0.0f;
      Shard::Meta(row)[0] = d.last_update[i];
      Shard::Meta(row)[1] = d.update_count[i];
    }
  });
  if (duplicates.load()) throw std::invalid_argument("the dump's keys are not unique; nothing was loaded");
  {
    ExclusiveAll lock(shards_);
    for (int s = 0; s < kShards; ++s) shards_[s]->SwapContent(*fresh[s]);
    clock_.store(z.clock);
    rows_.store(n);
    changes_tracked_.store(false);
  }
  // `fresh` now holds the old rows, freed here outside the locks.
}

void EmbeddingTable::Clear() {
  ExclusiveAll lock(shards_);
  const int64_t hint = (std::max<int64_t>(options_.capacity_hint, 0) + kShards - 1) / kShards;
  for (auto& s : shards_) s->Reset(hint);
  rows_.store(0);
  changes_tracked_.store(false);
}

}  // namespace monolith
