// The sharded table's batched operations and locking (table.h).
#include "table.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>

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

inline bool AllFinite(const float* g, int dim) {
  float acc = 0.0f;
  for (int i = 0; i < dim; ++i) acc += g[i] * 0.0f;  // NaN iff some g is NaN/Inf
  return acc == 0.0f;
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
  const int64_t per_shard = (std::max<int64_t>(options.capacity_hint, 0) + kShards - 1) / kShards;
  for (auto& s : shards_) s = std::make_unique<Shard>(layout_, per_shard);
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
      sl[j].shard = shards_[ShardOf(h)].get();
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
      else on_row(i0 + j, sh, r);
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
  std::vector<uint32_t> row_of(count);
  std::vector<uint32_t> fresh;
  auto prefetch = [&](int64_t j) { sh.PrefetchBuckets(sh.ProbeFor(Hash(keys[positions[j]])), true); };
  for (int64_t j = 0; j < std::min(kInsertAhead, count); ++j) prefetch(j);
  for (int64_t j = 0; j < count; ++j) {
    if (j + kInsertAhead < count) prefetch(j + kInsertAhead);
    const uint32_t next = sh.NextFreeRow(4);
    if (next != Shard::kNoRow) __builtin_prefetch(sh.Row(next), 1);
    const uint64_t key = keys[positions[j]];
    bool inserted;
    row_of[j] = sh.FindOrInsert(key, Hash(key), &inserted);
    if (inserted) fresh.push_back(row_of[j]);
  }
  for (uint32_t r : fresh) sh.InitRow(r);
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
          [&](int64_t i, const Shard& sh, uint32_t r) { CopyRow(out + i * dim, sh.Row(r) + 4, dim); },
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
      InsertInto(sh, keys, by_shard[s],
                 [&](int64_t i, uint32_t r) { CopyRow(out + i * dim, sh.Row(r) + 4, dim); });
    }
  });
}

void EmbeddingTable::Find(const uint64_t* keys, int64_t n, float* out, uint8_t* found) const {
  const int dim = layout_.dim;
  const int parts = Parts(n);
  SharedAll lock(shards_);
  ThreadPool::Global().ParallelFor(parts, [&](int part) {
    Scan(
        keys, n * part / parts, n * (part + 1) / parts,
        [&](int64_t i, const Shard& sh, uint32_t r) {
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
  ExclusiveAll lock(shards_);
  std::vector<RowRef> refs(n);
  const int parts = Parts(n);
  ThreadPool& pool = ThreadPool::Global();
  // 1. Rows of present keys, in parallel.
  pool.ParallelFor(parts, [&](int part) {
    Scan(
        keys, n * part / parts, n * (part + 1) / parts,
        [&](int64_t i, const Shard& sh, uint32_t r) {
          refs[i] = (static_cast<uint64_t>(ShardOf(Hash(keys[i]))) << 32) | r;
          (void)sh;
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
  if (missing) {
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
      if (static_cast<int>(refs[i] >> 32) % parts == part) s.positions.push_back(i);
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
      float* row = row_of(s.unique_refs[u]);
      uint32_t* meta = Shard::Meta(row);
      const uint32_t count = meta[1] == 0xFFFFFFFFu ? meta[1] : meta[1] + 1;
      ApplyRule(opt, dim, lr, count, g, row + 4, row + 4 + dim);
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
  return erased;
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
    held += s->BytesHeld();
  }
  st.bytes_values = st.rows * layout_.dim * 4;
  st.bytes_slots = st.rows * layout_.slot_width * 4;
  st.bytes_overhead = held + static_cast<int64_t>(sizeof(*this)) - st.bytes_values - st.bytes_slots;
  st.lookups = lookups_.load();
  st.updates = updates_.load();
  st.nonfinite_skipped = nonfinite_.load();
  return st;
}

TableDump EmbeddingTable::Dump() const {
  SharedAll lock(shards_);
  int64_t n = 0;
  for (auto& s : shards_) n += s->size();
  const int dim = layout_.dim, width = layout_.slot_width;
  TableDump d;
  d.keys.resize(n);
  d.values.resize(static_cast<size_t>(n) * dim);
  d.slots.resize(static_cast<size_t>(n) * width);
  d.last_update.resize(n);
  d.update_count.resize(n);
  size_t i = 0;
  for (auto& s : shards_) {
    s->ForEachLive([&](const float* row) {
      d.keys[i] = Shard::RowKey(row);
      d.last_update[i] = Shard::Meta(row)[0];
      d.update_count[i] = Shard::Meta(row)[1];
      std::memcpy(&d.values[i * dim], row + 4, dim * sizeof(float));
      if (width) std::memcpy(&d.slots[i * width], row + 4 + dim, width * sizeof(float));
      ++i;
    });
  }
  return d;
}

void EmbeddingTable::Load(const TableDump& d) {
  const int64_t n = static_cast<int64_t>(d.keys.size());
  const int dim = layout_.dim, width = layout_.slot_width;
  ExclusiveAll lock(shards_);
  std::array<int64_t, kShards> per_shard{};
  for (uint64_t k : d.keys) ++per_shard[ShardOf(Hash(k))];
  const int64_t hint = (std::max<int64_t>(options_.capacity_hint, 0) + kShards - 1) / kShards;
  for (int s = 0; s < kShards; ++s) shards_[s]->Reset(std::max(per_shard[s], hint));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = Hash(d.keys[i]);
    Shard& sh = *shards_[ShardOf(h)];
    bool inserted;
    float* row = sh.Row(sh.FindOrInsert(d.keys[i], h, &inserted));
    std::memcpy(row + 4, &d.values[i * dim], dim * sizeof(float));
    if (width) std::memcpy(row + 4 + dim, &d.slots[i * width], width * sizeof(float));
    for (int k = 4 + dim + width; k < layout_.stride; ++k) row[k] = 0.0f;
    Shard::Meta(row)[0] = d.last_update[i];
    Shard::Meta(row)[1] = d.update_count[i];
  }
}

void EmbeddingTable::Clear() {
  ExclusiveAll lock(shards_);
  const int64_t hint = (std::max<int64_t>(options_.capacity_hint, 0) + kShards - 1) / kShards;
  for (auto& s : shards_) s->Reset(hint);
}

}  // namespace monolith
