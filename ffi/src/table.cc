// The embedding table's index, row storage and batched operations (table.h).
#include "table.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "hashing.h"
#include "thread_pool.h"

namespace monolith {
namespace {

constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr double kGrowth = 1.25;
constexpr int64_t kMinBuckets = 16;
// Below this many ids a batched call runs on the calling thread alone.
constexpr int64_t kParallelMin = 4096;
// Keys handled per prefetch block in Lookup/Find.
constexpr int kBlock = 8;

// 0x80 in each byte of x that is zero, 0 elsewhere (exact, no false hits).
inline uint64_t ZeroBytes(uint64_t x) { return ~(((x & kLow7) + kLow7) | x | kLow7); }

inline uint64_t LoadTags(const uint8_t* tags) {
  uint64_t t;
  std::memcpy(&t, tags, 8);
  return t;
}

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

}  // namespace

EmbeddingTable::EmbeddingTable(const TableOptions& options)
    : options_(options),
      dim_(options.dim),
      slot_width_(SlotWidth(options.optimizer.kind, options.dim)),
      stride_(((4 + options.dim + SlotWidth(options.optimizer.kind, options.dim)) + 1) & ~1),
      hash_seed_(Mix64(options.seed ^ 0x5851F42D4C957F2DULL)) {
  if (dim_ <= 0) throw std::invalid_argument("dim must be positive");
  const double want = static_cast<double>(std::max<int64_t>(options.capacity_hint, 0)) /
                      (kMaxLoad * kSlotsPerBucket);
  index_.assign(std::max<int64_t>(kMinBuckets, static_cast<int64_t>(std::ceil(want))), Bucket{});
}

EmbeddingTable::~EmbeddingTable() {
  DropSpareChunk();
  for (float* c : chunks_) std::free(c);
}

inline __attribute__((always_inline)) EmbeddingTable::Probe EmbeddingTable::ProbeFor(uint64_t key, uint64_t n) const {
  const uint64_t h = Mix64(key ^ hash_seed_);
  Probe p;
  p.b1 = FastRange(h, n);
  p.b2 = p.b1 + 1 + FastRange(RotL(h, 32), n - 1);
  if (p.b2 >= n) p.b2 -= n;
  p.tag = static_cast<uint8_t>(h);
  if (p.tag == 0) p.tag = 1;
  return p;
}

inline __attribute__((always_inline)) uint32_t EmbeddingTable::FindIn(const Bucket& b, uint8_t tag, uint64_t key) const {
  uint64_t m = ZeroBytes(LoadTags(b.tag) ^ (kOnes * tag));
  while (m) {
    const int s = __builtin_ctzll(m) >> 3;
    const uint32_t r = b.row[s];
    if (RowKey(RowPtr(r)) == key) return r;
    m &= m - 1;
  }
  return kNoRow;
}

inline __attribute__((always_inline)) uint32_t EmbeddingTable::FindRow(uint64_t key, const Probe& p) const {
  const uint32_t r = FindIn(index_[p.b1], p.tag, key);
  if (r != kNoRow) return r;
  return FindIn(index_[p.b2], p.tag, key);
}

bool EmbeddingTable::PutInEmpty(Bucket& b, uint8_t tag, uint32_t row) {
  const uint64_t m = ZeroBytes(LoadTags(b.tag));
  if (!m) return false;
  const int s = __builtin_ctzll(m) >> 3;
  b.tag[s] = tag;
  b.row[s] = row;
  return true;
}

bool EmbeddingTable::PlaceInIndex(std::vector<Bucket>& index, uint32_t row, uint64_t key) {
  const uint64_t n = index.size();
  const Probe p = ProbeFor(key, n);
  // The emptier of the two buckets keeps both near the same load.
  const int free1 = __builtin_popcountll(ZeroBytes(LoadTags(index[p.b1].tag)));
  const int free2 = __builtin_popcountll(ZeroBytes(LoadTags(index[p.b2].tag)));
  if (free1 || free2) {
    return PutInEmpty(index[free1 >= free2 ? p.b1 : p.b2], p.tag, row);
  }
  // Random-walk cuckoo: evict a random slot, move its key to its other bucket.
  uint64_t bucket = (kick_state_ & 1) ? p.b1 : p.b2;
  uint8_t tag = p.tag;
  for (int kick = 0; kick < kMaxKicks; ++kick) {
    kick_state_ = Mix64(kick_state_ + 0x9E3779B97F4A7C15ULL);
    ++kicks_;
    const int s = static_cast<int>(kick_state_ >> 61);
    Bucket& b = index[bucket];
    std::swap(tag, b.tag[s]);
    std::swap(row, b.row[s]);
    const Probe v = ProbeFor(RowKey(RowPtr(row)), n);
    bucket = (v.b1 == bucket) ? v.b2 : v.b1;
    if (PutInEmpty(index[bucket], tag, row)) return true;
  }
  // `row` is now homeless; it is still live, so a rebuild places it.
  return false;
}

void EmbeddingTable::RebuildIndex(uint64_t min_buckets) {
  uint64_t n = std::max<uint64_t>(min_buckets, kMinBuckets);
  for (;;) {
    std::vector<Bucket> fresh(n, Bucket{});
    bool ok = true;
    for (uint32_t r = 0; r < next_row_ && ok; ++r) {
      if (IsLive(r)) ok = PlaceInIndex(fresh, r, RowKey(RowPtr(r)));
    }
    if (ok) {
      index_.swap(fresh);
      rebuilds_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    n = static_cast<uint64_t>(static_cast<double>(n) * kGrowth) + 1;
  }
}

uint32_t EmbeddingTable::AllocateRow(uint64_t key) {
  uint32_t r;
  if (!free_rows_.empty()) {
    r = free_rows_.back();
    free_rows_.pop_back();
  } else {
    if (next_row_ == kNoRow) throw std::length_error("table is full: 2^32-1 rows");
    r = next_row_++;
    if ((r >> kChunkShift) >= chunks_.size()) {
      chunks_.push_back(NextChunk());
      live_.resize(static_cast<size_t>(chunks_.size()) * kRowsPerChunk / 64, 0);
    }
  }
  float* row = RowPtr(r);
  std::memcpy(row, &key, 8);
  RowMeta(row)[0] = 0;
  RowMeta(row)[1] = 0;
  SetLive(r, true);
  ++size_;
  return r;
}

float* EmbeddingTable::NewChunk(size_t bytes, bool touch) {
  void* mem = std::aligned_alloc(64, bytes);
  if (!mem) throw std::bad_alloc();
  if (touch) std::memset(mem, 0, bytes);  // take the first-touch page faults now
  return static_cast<float*>(mem);
}

float* EmbeddingTable::NextChunk() {
  const size_t bytes = static_cast<size_t>(kRowsPerChunk) * stride_ * sizeof(float);
  float* chunk = spare_chunk_.valid() ? spare_chunk_.get() : NewChunk(bytes, false);
  // A growing table gets its next chunk faulted in on another thread while
  // this one inserts: page faults were the largest cost of an insert.
  if (!chunks_.empty() && std::getenv("MONOLITH_NO_PREFAULT") == nullptr) {
    spare_chunk_ = std::async(std::launch::async, [bytes] { return NewChunk(bytes, true); });
  }
  return chunk;
}

void EmbeddingTable::DropSpareChunk() {
  if (spare_chunk_.valid()) std::free(spare_chunk_.get());
}

void EmbeddingTable::InitNewRow(uint32_t r, uint64_t key) {
  float* row = RowPtr(r);
  InitRow(options_.initializer, options_.seed, key, dim_, row + 4);
  InitSlots(options_.optimizer, dim_, row + 4 + dim_);
  for (int i = 4 + dim_ + slot_width_; i < stride_; ++i) row[i] = 0.0f;
}

uint32_t EmbeddingTable::FindOrInsert(uint64_t key, bool* inserted) {
  const uint32_t found = FindRow(key, ProbeFor(key, index_.size()));
  *inserted = found == kNoRow;
  if (found != kNoRow) return found;
  const double slots = static_cast<double>(index_.size()) * kSlotsPerBucket;
  if (static_cast<double>(size_ + 1) > kMaxLoad * slots) {
    RebuildIndex(static_cast<uint64_t>(static_cast<double>(index_.size()) * kGrowth) + 1);
  }
  const uint32_t r = AllocateRow(key);
  if (!PlaceInIndex(index_, r, key)) {
    RebuildIndex(static_cast<uint64_t>(static_cast<double>(index_.size()) * kGrowth) + 1);
  }
  ++inserts_;  // a plain counter: inserts hold the lock exclusively
  return r;
}

template <typename OnRow, typename OnMiss>
void EmbeddingTable::ScanBlock(const uint64_t* keys, int64_t begin, int64_t end,
                               OnRow on_row, OnMiss on_miss) const {
  // A three-stage software pipeline over blocks of keys: hash and prefetch
  // the buckets of block k+kHashAhead, prefetch the rows that the tags of
  // block k+kRowAhead point to, compare and copy block k. Each stage runs
  // about one memory latency ahead of the one after it.
  constexpr int kHashAhead = 4, kRowAhead = 2, kRing = 8;
  Probe probes[kRing][kBlock];
  uint32_t cand[kRing][kBlock];  // row of the first tag match, or kNoRow
  const uint64_t n = index_.size();
  const int64_t blocks = (end - begin + kBlock - 1) / kBlock;
  auto block_size = [&](int64_t b) {
    return static_cast<int>(std::min<int64_t>(kBlock, end - (begin + b * kBlock)));
  };
  auto hash_stage = [&](int64_t b) {
    Probe* pr = probes[b % kRing];
    const uint64_t* k = keys + begin + b * kBlock;
    for (int j = 0, m = block_size(b); j < m; ++j) {
      pr[j] = ProbeFor(k[j], n);
      __builtin_prefetch(&index_[pr[j].b1]);
      __builtin_prefetch(&index_[pr[j].b2]);
    }
  };
  auto row_stage = [&](int64_t b) {
    const Probe* pr = probes[b % kRing];
    uint32_t* c = cand[b % kRing];
    for (int j = 0, m = block_size(b); j < m; ++j) {
      const Bucket* bk = &index_[pr[j].b1];
      uint64_t hit = ZeroBytes(LoadTags(bk->tag) ^ (kOnes * pr[j].tag));
      if (!hit) {
        bk = &index_[pr[j].b2];
        hit = ZeroBytes(LoadTags(bk->tag) ^ (kOnes * pr[j].tag));
      }
      c[j] = kNoRow;
      if (hit) {
        c[j] = bk->row[__builtin_ctzll(hit) >> 3];
        const float* row = RowPtr(c[j]);
        __builtin_prefetch(row);
        __builtin_prefetch(row + 16);
      }
    }
  };
  for (int64_t b = 0; b < std::min<int64_t>(kHashAhead, blocks); ++b) hash_stage(b);
  for (int64_t b = 0; b < std::min<int64_t>(kRowAhead, blocks); ++b) row_stage(b);
  for (int64_t b = 0; b < blocks; ++b) {
    if (b + kHashAhead < blocks) hash_stage(b + kHashAhead);
    if (b + kRowAhead < blocks) row_stage(b + kRowAhead);
    const Probe* pr = probes[b % kRing];
    const uint32_t* c = cand[b % kRing];
    const int64_t i0 = begin + b * kBlock;
    for (int j = 0, m = block_size(b); j < m; ++j) {
      const uint64_t key = keys[i0 + j];
      // The first tag match is almost always the key; else search in full.
      const uint32_t r = (c[j] != kNoRow && RowKey(RowPtr(c[j])) == key) ? c[j] : FindRow(key, pr[j]);
      if (r == kNoRow) on_miss(i0 + j);
      else on_row(i0 + j, r);
    }
  }
}

void EmbeddingTable::Lookup(const uint64_t* keys, int64_t n, float* out) {
  lookups_.fetch_add(n, std::memory_order_relaxed);
  const size_t row_bytes = static_cast<size_t>(dim_) * sizeof(float);
  const int parts = Parts(n);
  std::vector<std::vector<int64_t>> misses(parts);
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    ThreadPool::Global().ParallelFor(parts, [&](int part) {
      const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
      ScanBlock(
          keys, lo, hi,
          [&](int64_t i, uint32_t r) { CopyRow(out + i * dim_, RowPtr(r) + 4, dim_); },
          [&](int64_t i) { misses[part].push_back(i); });
    });
  }
  bool any = false;
  for (auto& m : misses) any |= !m.empty();
  if (!any) return;
  std::unique_lock<std::shared_mutex> lock(mu_);
  for (auto& m : misses) {
    InsertMissing(keys, m.data(), static_cast<int64_t>(m.size()), [&](int64_t i, uint32_t r) {
      std::memcpy(out + i * dim_, RowPtr(r) + 4, row_bytes);
    });
  }
}

template <typename OnRow>
void EmbeddingTable::InsertMissing(const uint64_t* keys, const int64_t* positions, int64_t count,
                                   OnRow on_row) {
  // 1. Index inserts, serially (they change the index). Buckets are
  //    prefetched kAhead keys early so their cache misses overlap; a rebuild
  //    in between only makes a prefetch useless, never wrong.
  constexpr int64_t kAhead = 16;
  std::vector<uint32_t> row_of(count);
  std::vector<uint32_t> fresh;
  auto prefetch = [&](int64_t j) {
    const Probe p = ProbeFor(keys[positions[j]], index_.size());
    __builtin_prefetch(&index_[p.b1], 1);
    __builtin_prefetch(&index_[p.b2], 1);
  };
  for (int64_t j = 0; j < std::min(kAhead, count); ++j) prefetch(j);
  for (int64_t j = 0; j < count; ++j) {
    if (j + kAhead < count) prefetch(j + kAhead);
    // The rows the next inserts will take, so their header writes do not
    // stall on cache misses.
    const uint64_t ahead = next_row_ + 4;
    if (free_rows_.empty() && (ahead >> kChunkShift) < chunks_.size()) {
      __builtin_prefetch(RowPtr(static_cast<uint32_t>(ahead)), 1);
    }
    bool inserted;
    row_of[j] = FindOrInsert(keys[positions[j]], &inserted);
    if (inserted) fresh.push_back(row_of[j]);
  }
  // 2. New rows' initial values, in parallel (a Normal row costs a log and a
  //    cosine per element); each row is written by one thread.
  const int64_t f = static_cast<int64_t>(fresh.size());
  const int parts = f < 512 ? 1 : ThreadPool::Global().Parallelism();
  ThreadPool::Global().ParallelFor(parts, [&](int part) {
    for (int64_t k = f * part / parts; k < f * (part + 1) / parts; ++k) {
      InitNewRow(fresh[k], RowKey(RowPtr(fresh[k])));
    }
  });
  for (int64_t j = 0; j < count; ++j) on_row(positions[j], row_of[j]);
}

void EmbeddingTable::Find(const uint64_t* keys, int64_t n, float* out, uint8_t* found) const {
  const size_t row_bytes = static_cast<size_t>(dim_) * sizeof(float);
  const int parts = Parts(n);
  std::shared_lock<std::shared_mutex> lock(mu_);
  ThreadPool::Global().ParallelFor(parts, [&](int part) {
    const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
    ScanBlock(
        keys, lo, hi,
        [&](int64_t i, uint32_t r) {
          CopyRow(out + i * dim_, RowPtr(r) + 4, dim_);
          found[i] = 1;
        },
        [&](int64_t i) {
          std::memset(out + i * dim_, 0, row_bytes);
          found[i] = 0;
        });
  });
}

namespace {

// Per-thread scratch for Apply, kept between calls to avoid reallocation.
struct ApplyScratch {
  std::vector<int64_t> positions;
  std::vector<uint64_t> map;  // (row << 32 | unique index), ~0 = empty
  std::vector<uint32_t> unique_rows;
  std::vector<float> grad_sum;
};

inline int RowPart(uint32_t r, int parts) {
  return static_cast<int>((static_cast<uint64_t>(r * 0x9E3779B1u) * parts) >> 32);
}

}  // namespace

std::pair<int64_t, int64_t> EmbeddingTable::Apply(const uint64_t* keys, const float* grads,
                                                  int64_t n, float lr, uint32_t time) {
  if (n == 0) return {0, 0};
  std::unique_lock<std::shared_mutex> lock(mu_);
  std::vector<uint32_t> rows(n);
  const int parts = Parts(n);
  ThreadPool& pool = ThreadPool::Global();
  // 1. Rows of present keys, in parallel (the exclusive lock is ours).
  pool.ParallelFor(parts, [&](int part) {
    const int64_t lo = n * part / parts, hi = n * (part + 1) / parts;
    ScanBlock(
        keys, lo, hi, [&](int64_t i, uint32_t r) { rows[i] = r; },
        [&](int64_t i) { rows[i] = kNoRow; });
  });
  // 2. Missing keys get rows, serially (inserts change the index).
  std::vector<int64_t> missing;
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i] == kNoRow) missing.push_back(i);
  }
  InsertMissing(keys, missing.data(), static_cast<int64_t>(missing.size()),
                [&](int64_t i, uint32_t r) { rows[i] = r; });
  // 3. Each part owns the rows that hash to it: sum duplicates, then step.
  std::atomic<int64_t> updated{0}, skipped{0};
  const OptimizerConfig& opt = options_.optimizer;
  const int dim = dim_;
  pool.ParallelFor(parts, [&](int part) {
    thread_local ApplyScratch s;
    s.positions.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (parts == 1 || RowPart(rows[i], parts) == part) s.positions.push_back(i);
    }
    size_t cap = 16;
    while (cap < 2 * s.positions.size()) cap <<= 1;
    s.map.assign(cap, ~0ULL);
    s.unique_rows.clear();
    s.grad_sum.resize(s.positions.size() * dim);
    const size_t mask = cap - 1;
    for (int64_t i : s.positions) {
      const uint32_t r = rows[i];
      const float* g = grads + i * dim;
      for (size_t h = (r * 0x9E3779B1u) & mask;; h = (h + 1) & mask) {
        const uint64_t e = s.map[h];
        if (e == ~0ULL) {
          const uint32_t u = static_cast<uint32_t>(s.unique_rows.size());
          s.map[h] = (static_cast<uint64_t>(r) << 32) | u;
          s.unique_rows.push_back(r);
          std::memcpy(&s.grad_sum[static_cast<size_t>(u) * dim], g, dim * sizeof(float));
          break;
        }
        if (static_cast<uint32_t>(e >> 32) == r) {
          float* acc = &s.grad_sum[static_cast<size_t>(static_cast<uint32_t>(e)) * dim];
          for (int k = 0; k < dim; ++k) acc[k] += g[k];
          break;
        }
      }
    }
    int64_t ok = 0, bad = 0;
    const size_t u_count = s.unique_rows.size();
    for (size_t u = 0; u < u_count; ++u) {
      if (u + 4 < u_count) __builtin_prefetch(RowPtr(s.unique_rows[u + 4]), 1);
      const float* g = &s.grad_sum[u * dim];
      if (!AllFinite(g, dim)) {
        ++bad;
        continue;
      }
      float* row = RowPtr(s.unique_rows[u]);
      uint32_t* meta = RowMeta(row);
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
  std::unique_lock<std::shared_mutex> lock(mu_);
  int64_t erased = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Probe p = ProbeFor(keys[i], index_.size());
    for (uint64_t bi : {p.b1, p.b2}) {
      Bucket& b = index_[bi];
      uint64_t m = ZeroBytes(LoadTags(b.tag) ^ (kOnes * p.tag));
      bool done = false;
      while (m) {
        const int s = __builtin_ctzll(m) >> 3;
        const uint32_t r = b.row[s];
        if (RowKey(RowPtr(r)) == keys[i]) {
          b.tag[s] = 0;
          SetLive(r, false);
          free_rows_.push_back(r);
          --size_;
          ++erased;
          done = true;
          break;
        }
        m &= m - 1;
      }
      if (done) break;
    }
  }
  return erased;
}

int64_t EmbeddingTable::Size() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  return size_;
}

TableStats EmbeddingTable::Stats() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  TableStats s;
  s.rows = size_;
  s.row_capacity = static_cast<int64_t>(chunks_.size() + (spare_chunk_.valid() ? 1 : 0)) * kRowsPerChunk;
  s.index_slots = static_cast<int64_t>(index_.size()) * kSlotsPerBucket;
  s.bytes_values = size_ * dim_ * 4;
  s.bytes_slots = size_ * slot_width_ * 4;
  const int64_t total = s.row_capacity * stride_ * 4 +
                        static_cast<int64_t>(index_.capacity() * sizeof(Bucket)) +
                        static_cast<int64_t>(live_.capacity() * 8) +
                        static_cast<int64_t>(free_rows_.capacity() * 4) +
                        static_cast<int64_t>(chunks_.capacity() * sizeof(float*));
  s.bytes_overhead = total - s.bytes_values - s.bytes_slots;
  s.lookups = lookups_.load();
  s.inserts = inserts_;
  s.updates = updates_.load();
  s.nonfinite_skipped = nonfinite_.load();
  s.index_rebuilds = rebuilds_.load();
  s.index_kicks = kicks_;
  return s;
}

TableDump EmbeddingTable::Dump() const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  TableDump d;
  d.keys.resize(size_);
  d.values.resize(static_cast<size_t>(size_) * dim_);
  d.slots.resize(static_cast<size_t>(size_) * slot_width_);
  d.last_update.resize(size_);
  d.update_count.resize(size_);
  size_t i = 0;
  for (uint32_t r = 0; r < next_row_; ++r) {
    if (!IsLive(r)) continue;
    const float* row = RowPtr(r);
    d.keys[i] = RowKey(row);
    d.last_update[i] = RowMeta(row)[0];
    d.update_count[i] = RowMeta(row)[1];
    std::memcpy(&d.values[i * dim_], row + 4, dim_ * sizeof(float));
    if (slot_width_) std::memcpy(&d.slots[i * slot_width_], row + 4 + dim_, slot_width_ * sizeof(float));
    ++i;
  }
  return d;
}

void EmbeddingTable::ResetLocked(int64_t capacity) {
  DropSpareChunk();
  for (float* c : chunks_) std::free(c);
  chunks_.clear();
  live_.clear();
  free_rows_.clear();
  next_row_ = 0;
  size_ = 0;
  const double want = static_cast<double>(capacity) / (kMaxLoad * kSlotsPerBucket);
  std::vector<Bucket> fresh(std::max<int64_t>(kMinBuckets, static_cast<int64_t>(std::ceil(want))),
                            Bucket{});
  index_.swap(fresh);
}

void EmbeddingTable::Load(const TableDump& d) {
  const int64_t n = static_cast<int64_t>(d.keys.size());
  std::unique_lock<std::shared_mutex> lock(mu_);
  ResetLocked(std::max<int64_t>(n, options_.capacity_hint));
  for (int64_t i = 0; i < n; ++i) {
    bool inserted;
    const uint32_t r = FindOrInsert(d.keys[i], &inserted);
    float* row = RowPtr(r);
    std::memcpy(row + 4, &d.values[i * dim_], dim_ * sizeof(float));
    if (slot_width_) std::memcpy(row + 4 + dim_, &d.slots[i * slot_width_], slot_width_ * sizeof(float));
    for (int k = 4 + dim_ + slot_width_; k < stride_; ++k) row[k] = 0.0f;
    RowMeta(row)[0] = d.last_update[i];
    RowMeta(row)[1] = d.update_count[i];
  }
}

void EmbeddingTable::Clear() {
  std::unique_lock<std::shared_mutex> lock(mu_);
  ResetLocked(options_.capacity_hint);
}

}  // namespace monolith
