// One shard's cuckoo index and row storage (shard.h).
#include "shard.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <stdexcept>

#include <sys/mman.h>

namespace monolith {
namespace {

// Growth is per shard (1/16 of the table). A rebuild rehashes every live
// row, so the step sets how often each row is rehashed over a table's
// growth (1 / (1 - 1/growth): 7.7 times at 1.15x, 4.3 at 1.3x). An 8-slot
// two-choice index still places keys with few kicks at 0.93 full, so 1.3x
// steps under kMaxLoad 0.93 keep it 0.72-0.93 full: denser on average than
// 1.15x steps under 0.80 (0.70-0.80), hence fewer bytes per row too.
constexpr double kGrowth = 1.3;
constexpr int64_t kMinBuckets = 4;

int64_t BucketsFor(int64_t capacity) {
  const double want = static_cast<double>(std::max<int64_t>(capacity, 0)) /
                      (Shard::kMaxLoad * Shard::kSlotsPerBucket);
  return std::max<int64_t>(kMinBuckets, static_cast<int64_t>(std::ceil(want)));
}

}  // namespace

namespace {
int ChunkShift(int stride_floats) {
  int shift = 4;
  while ((static_cast<size_t>(2) << shift) * stride_floats * sizeof(float) <= Shard::kChunkBytes) ++shift;
  return shift;
}
}  // namespace

Shard::Shard(const RowLayout& layout, int64_t capacity, int64_t sketch_counters)
    : layout_(layout), chunk_shift_(ChunkShift(layout.stride)), chunk_mask_((1u << chunk_shift_) - 1) {
  index_.assign(BucketsFor(capacity), Bucket{});
  sketch_.assign(static_cast<size_t>(std::max<int64_t>(sketch_counters, 0)), 0);
}

uint32_t Shard::Sighting(uint64_t h) {
  // Four counters per key; conservative update raises only those at the
  // minimum, which keeps overestimates (false admissions) low.
  constexpr int kHashes = 4;
  size_t pos[kHashes];
  uint32_t least = 255;
  const uint64_t width = sketch_.size();
  for (int i = 0; i < kHashes; ++i) {
    pos[i] = FastRange(Mix64(h + (i + 1) * 0x9E3779B97F4A7C15ULL), width);
    least = std::min<uint32_t>(least, sketch_[pos[i]]);
  }
  if (least < 255) {
    ++least;
    for (size_t p : pos) {
      if (sketch_[p] < least) sketch_[p] = static_cast<uint8_t>(least);
    }
  }
  return least;
}

void Shard::SetSketch(const uint8_t* counters, int64_t n) {
  if (n != static_cast<int64_t>(sketch_.size())) throw std::invalid_argument("filter size mismatch");
  std::memcpy(sketch_.data(), counters, static_cast<size_t>(n));
}

int64_t Shard::touched() const {
  int64_t n = 0;
  for (size_t w = 0; w < touched_.size(); ++w) n += __builtin_popcountll(touched_[w] & live_[w]);
  return n;
}

int64_t Shard::dirty() const {
  int64_t n = 0;
  for (size_t w = 0; w < dirty_.size(); ++w) n += __builtin_popcountll(dirty_[w] & live_[w]);
  return n;
}

void Shard::SwapContent(Shard& o) {
  arena_.Swap(o.arena_);
  index_.swap(o.index_);
  chunks_.swap(o.chunks_);
  live_.swap(o.live_);
  touched_.swap(o.touched_);
  dirty_.swap(o.dirty_);
  removed_.swap(o.removed_);
  std::swap(track_removed_, o.track_removed_);
  sketch_.swap(o.sketch_);
  free_rows_.swap(o.free_rows_);
  std::swap(next_row_, o.next_row_);
  std::swap(size_, o.size_);
  // The counters stay this shard's own (statistics over its life); the
  // rows `other` inserted count as inserts here.
  inserts_ += o.inserts_;
  o.inserts_ = 0;
}

uint64_t Shard::EraseRow(uint32_t r) {
  const uint64_t key = RowKey(Row(r));
  Erase(key, KeyHash(key, layout_.hash_seed));
  return key;
}

Shard::~Shard() { FreeChunks(); }

float* RowArena::Take(size_t bytes) {
  bytes = (bytes + 63) & ~static_cast<size_t>(63);
  std::lock_guard<std::mutex> lock(mu_);
  if (regions_.empty() || regions_.back().used + bytes > regions_.back().size) {
    // Regions double from 1 MiB to 1 GiB of address space; pages are only
    // backed by memory once rows are written to them.
    size_t size = regions_.empty() ? (1u << 20) : std::min<size_t>(regions_.back().size * 2, 1u << 30);
    size = std::max(size, bytes);
    void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::bad_alloc();
    regions_.push_back({static_cast<char*>(mem), size, 0});
  }
  Region& r = regions_.back();
  char* out = r.base + r.used;
  r.used += bytes;
  // A chunk is filled row by row right after it is taken: faulting its
  // pages in with one call costs one kernel entry instead of one trap per
  // 4 KiB page. Best effort: a kernel without it faults them on first touch.
#ifdef MADV_POPULATE_WRITE
  const uintptr_t page = 4096;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(out) + page - 1) & ~(page - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(out) + bytes) & ~(page - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#endif
  return reinterpret_cast<float*>(out);
}

void RowArena::Swap(RowArena& other) {
  std::scoped_lock lock(mu_, other.mu_);
  regions_.swap(other.regions_);
}

void RowArena::Release() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Region& r : regions_) munmap(r.base, r.size);
  regions_.clear();
}

void Shard::FreeChunks() {
  chunks_.clear();
  arena_.Release();
}

int64_t Shard::BytesHeld() const {
  return static_cast<int64_t>(chunks_.size()) * static_cast<int64_t>(ChunkBytes()) +
         static_cast<int64_t>(index_.capacity() * sizeof(Bucket)) +
         static_cast<int64_t>(live_.capacity() * 8) + static_cast<int64_t>(touched_.capacity() * 8) +
         static_cast<int64_t>(dirty_.capacity() * 8) + static_cast<int64_t>(removed_.capacity() * 8) +
         static_cast<int64_t>(sketch_.capacity()) +
         static_cast<int64_t>(free_rows_.capacity() * 4) +
         static_cast<int64_t>(chunks_.capacity() * sizeof(float*)) + static_cast<int64_t>(sizeof(Shard));
}

namespace {

bool PutInEmpty(uint8_t* tags, uint32_t* rows, uint8_t tag, uint32_t row) {
  const uint64_t m = tags::ZeroBytes(tags::Load(tags));
  if (!m) return false;
  const int s = __builtin_ctzll(m) >> 3;
  tags[s] = tag;
  rows[s] = row;
  return true;
}

}  // namespace

bool Shard::PlaceInIndex(std::vector<Bucket>& index, uint32_t row, uint64_t h) {
  const uint64_t n = index.size();
  const Probe p = ProbeIn(h, n);
  // The emptier of the two buckets keeps both near the same load.
  const int free1 = tags::CountZeroBytes(tags::Load(index[p.b1].tag));
  const int free2 = tags::CountZeroBytes(tags::Load(index[p.b2].tag));
  if (free1 || free2) {
    Bucket& b = index[free1 >= free2 ? p.b1 : p.b2];
    return PutInEmpty(b.tag, b.row, p.tag, row);
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
    const Probe v = ProbeIn(KeyHash(RowKey(Row(row)), layout_.hash_seed), n);
    bucket = (v.b1 == bucket) ? v.b2 : v.b1;
    if (PutInEmpty(index[bucket].tag, index[bucket].row, tag, row)) return true;
  }
  // `row` is now homeless; it is still live, so a rebuild places it.
  return false;
}

void Shard::RebuildIndex(uint64_t min_buckets) {
  uint64_t n = std::max<uint64_t>(min_buckets, kMinBuckets);
  for (;;) {
    std::vector<Bucket> fresh(n, Bucket{});
    // Rows are read in order, a few dozen ahead of their hashing, and each
    // key is placed a ring's length after its buckets were prefetched: the
    // fresh index is larger than the caches, so a placement that waited for
    // its two buckets would stall on both.
    constexpr uint32_t kRowAhead = 32;
    constexpr int kRing = 16;
    uint32_t ring_row[kRing];
    uint64_t ring_hash[kRing];
    int64_t queued = 0;
    bool ok = true;
    for (uint32_t r = 0; r < next_row_ && ok; ++r) {
      const uint64_t ahead = static_cast<uint64_t>(r) + kRowAhead;
      if (ahead < next_row_) __builtin_prefetch(Row(static_cast<uint32_t>(ahead)));
      if (!((live_[r >> 6] >> (r & 63)) & 1)) continue;
      const uint64_t h = KeyHash(RowKey(Row(r)), layout_.hash_seed);
      const Probe p = ProbeIn(h, n);
      __builtin_prefetch(&fresh[p.b1], 1);
      __builtin_prefetch(&fresh[p.b2], 1);
      const int slot = queued % kRing;
      if (queued >= kRing) ok = PlaceInIndex(fresh, ring_row[slot], ring_hash[slot]);
      ring_row[slot] = r;
      ring_hash[slot] = h;
      ++queued;
    }
    for (int64_t i = std::max<int64_t>(0, queued - kRing); i < queued && ok; ++i) {
      ok = PlaceInIndex(fresh, ring_row[i % kRing], ring_hash[i % kRing]);
    }
    if (ok) {
      index_.swap(fresh);
      ++rebuilds_;
      return;
    }
    n = static_cast<uint64_t>(static_cast<double>(n) * kGrowth) + 1;
  }
}

uint32_t Shard::AllocateRow(uint64_t key, uint32_t now) {
  uint32_t r;
  if (!free_rows_.empty()) {
    r = free_rows_.back();
    free_rows_.pop_back();
  } else {
    if (next_row_ == kNoRow) throw std::length_error("table shard is full: 2^32-1 rows");
    r = next_row_++;
    if ((r >> chunk_shift_) >= chunks_.size()) {
      chunks_.push_back(arena_.Take(ChunkBytes()));
      live_.resize(((chunks_.size() << chunk_shift_) + 63) / 64, 0);
      touched_.resize(live_.size(), 0);
      dirty_.resize(live_.size(), 0);
    }
  }
  float* row = Row(r);
  std::memcpy(row, &key, 8);
  Meta(row)[0] = now;
  Meta(row)[1] = 0;
  live_[r >> 6] |= 1ULL << (r & 63);
  touched_[r >> 6] |= 1ULL << (r & 63);
  dirty_[r >> 6] |= 1ULL << (r & 63);
  ++size_;
  return r;
}

uint32_t Shard::NextFreeRow(int ahead) const {
  if (!free_rows_.empty()) {
    return static_cast<int>(free_rows_.size()) > ahead ? free_rows_[free_rows_.size() - 1 - ahead] : kNoRow;
  }
  const uint64_t r = static_cast<uint64_t>(next_row_) + ahead;
  return (r >> chunk_shift_) < chunks_.size() ? static_cast<uint32_t>(r) : kNoRow;
}

void Shard::InitRow(uint32_t r) const {
  float* row = Row(r);
  const int dim = layout_.dim;
  InitRowValues(layout_.initializer, layout_.seed, RowKey(row), dim, row + 4);
  InitSlots(layout_.optimizer, dim, row + 4 + dim);
  for (int i = 4 + dim + layout_.slot_width; i < layout_.stride; ++i) row[i] = 0.0f;
}

uint32_t Shard::FindOrInsert(uint64_t key, uint64_t h, uint32_t now, bool* inserted) {
  const uint32_t found = FindRow(key, ProbeFor(h));
  *inserted = found == kNoRow;
  if (found != kNoRow) return found;
  if (static_cast<double>(size_ + 1) > kMaxLoad * static_cast<double>(index_slots())) {
    RebuildIndex(static_cast<uint64_t>(static_cast<double>(index_.size()) * kGrowth) + 1);
  }
  const uint32_t r = AllocateRow(key, now);
  if (!PlaceInIndex(index_, r, h)) {
    RebuildIndex(static_cast<uint64_t>(static_cast<double>(index_.size()) * kGrowth) + 1);
  }
  ++inserts_;
  return r;
}

bool Shard::Erase(uint64_t key, uint64_t h) {
  const Probe p = ProbeFor(h);
  for (uint64_t bi : {p.b1, p.b2}) {
    Bucket& b = index_[bi];
    uint64_t m = tags::ZeroBytes(tags::Load(b.tag) ^ (tags::kOnes * p.tag));
    while (m) {
      const int s = __builtin_ctzll(m) >> 3;
      const uint32_t r = b.row[s];
      if (RowKey(Row(r)) == key) {
        b.tag[s] = 0;
        live_[r >> 6] &= ~(1ULL << (r & 63));
        touched_[r >> 6] &= ~(1ULL << (r & 63));
        dirty_[r >> 6] &= ~(1ULL << (r & 63));
        if (track_removed_) removed_.push_back(key);
        free_rows_.push_back(r);
        --size_;
        return true;
      }
      m &= m - 1;
    }
  }
  return false;
}

void Shard::Reset(int64_t capacity) {
  FreeChunks();
  live_.clear();
  touched_.clear();
  dirty_.clear();
  removed_.clear();
  track_removed_ = false;
  std::fill(sketch_.begin(), sketch_.end(), 0);
  free_rows_.clear();
  next_row_ = 0;
  size_ = 0;
  std::vector<Bucket> fresh(BucketsFor(capacity), Bucket{});
  index_.swap(fresh);
}

}  // namespace monolith
