// The nanobind module `monolith_jax._engine`: the table for host-side calls
// (numpy in, numpy out) and the FFI handler capsules for jitted programs.
// Shapes and dtypes are checked in Python first; the checks here are the
// last line, so a bad array never reaches the engine.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <utility>
#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/mman.h>

#include "ffi_handlers.h"
#include "numpy_owned.h"
#include "registry.h"
#include "table.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {

void BindCodec(nb::module_& m);  // module_codec.cc
void BindBatch(nb::module_& m);  // module_batch.cc
void BindRequestSet(nb::module_& m);  // module_request_set.cc

namespace {

using Keys = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Floats2D = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Floats1D = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U32 = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8 = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// An uninitialized float buffer handed to numpy (no 0-fill of MBs per batch).
nb::ndarray<nb::numpy, float> NewFloats(size_t rows, size_t cols, float** data) {
  float* buf = new float[rows * cols];
  *data = buf;
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  return nb::ndarray<nb::numpy, float>(buf, {rows, cols}, owner);
}

// Dump buffers, uninitialized (a dump writes every byte). A table that
// snapshots every few seconds takes its last dump's buffers again once
// numpy has freed them: faulting in a GB of fresh pages cost more than the
// copy itself. prepare_dump_buffers faults them in ahead of a process's
// first dump, from a thread of the caller's (a restored trainer's
// snapshots), so that dump does not block training on fresh pages either.
// (2 MiB pages were tried: under defrag=madvise a first dump stalled for
// seconds in compaction.)
class BufferPool {
 public:
  struct Block {
    void* p = nullptr;
    size_t bytes = 0;
    bool fresh = false;  // never written: each page faults in on first touch
  };
  static constexpr int kFields = 8;

  static Block New(size_t bytes) {
    Block b;
    b.bytes = std::max<size_t>(bytes, 1);
    if (posix_memalign(&b.p, 64, b.bytes) != 0) throw std::bad_alloc();
    b.fresh = true;
    return b;
  }
  // Faults a fresh block's pages in, in parts over the engine's threads.
  static void Populate(Block& b) {
    if (!b.fresh) return;
    b.fresh = false;
    constexpr uintptr_t kPage = 4096, kPart = 32 << 20;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(b.p) + kPage - 1) & ~(kPage - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(b.p) + b.bytes) & ~(kPage - 1);
    if (hi <= lo) return;
    const int parts = static_cast<int>((hi - lo + kPart - 1) / kPart);
    ThreadPool::Global().ParallelFor(parts, [&](int i) {
      const uintptr_t a = lo + static_cast<uintptr_t>(i) * kPart, e = std::min(a + kPart, hi);
#ifdef MADV_POPULATE_WRITE
      if (madvise(reinterpret_cast<void*>(a), e - a, MADV_POPULATE_WRITE) == 0) return;
#endif
      for (uintptr_t q = a; q < e; q += kPage) *reinterpret_cast<volatile char*>(q) = 0;
    });
  }
  // A kept block of at least `bytes`, or a new one with 1/16 to spare.
  Block Take(int field, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      Block& kept = free_[field];
      if (kept.p != nullptr && kept.bytes >= bytes) return std::exchange(kept, Block{});
    }
    return New(bytes + bytes / 16);
  }
  // Keeps the larger of `b` and the block kept for `field`; frees the other.
  void Give(int field, Block b) {
    b.fresh = false;  // a dump wrote it, or Populate faulted it in
    std::lock_guard<std::mutex> lock(mu_);
    Block& kept = free_[field];
    if (kept.bytes < b.bytes) std::swap(kept, b);
    std::free(b.p);
  }
  void Clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (Block& b : free_) std::free(std::exchange(b, Block{}).p);
  }
  // Bytes kept for the next dump (not those lent to arrays still alive).
  size_t KeptBytes() {
    std::lock_guard<std::mutex> lock(mu_);
    size_t n = 0;
    for (const Block& b : free_) n += b.p != nullptr ? b.bytes : 0;
    return n;
  }
  ~BufferPool() { Clear(); }

 private:
  std::mutex mu_;
  std::array<Block, kFields> free_{};
};

// What a dumped numpy array holds on to: its block, back to the pool (or
// freed, when not pooled) once numpy lets go.
struct Lease {
  std::shared_ptr<BufferPool> pool;
  int field;
  BufferPool::Block block;
  ~Lease() {
    if (pool) pool->Give(field, block);
    else std::free(block.p);
  }
};

template <typename T>
nb::ndarray<nb::numpy, T> Owned(std::unique_ptr<Lease>& lease, std::initializer_list<size_t> shape) {
  T* data = static_cast<T*>(lease->block.p);
  nb::capsule owner(lease.release(), [](void* p) noexcept { delete static_cast<Lease*>(p); });
  return nb::ndarray<nb::numpy, T>(data, shape, owner);
}

// Bytes of each dump field (keys, values, slots, last_update, update_count,
// touched, filter, removed) for `rows` rows.
std::array<size_t, BufferPool::kFields> DumpFieldBytes(EmbeddingTable& t, size_t rows, size_t filter,
                                                       size_t removed) {
  const size_t dim = static_cast<size_t>(t.dim()), width = static_cast<size_t>(t.slot_width());
  return {rows * 8, rows * dim * 4, rows * width * 4, rows * 4, rows * 4, rows, filter, removed * 8};
}

// The Python-owned handle: registered while open.
class PyTable {
 public:
  PyTable(const TableOptions& options)
      : table_(std::make_shared<EmbeddingTable>(options)), id_(RegisterTable(table_)) {}
  ~PyTable() { Close(); }

  int64_t id() const { return id_; }
  const std::shared_ptr<BufferPool>& pool() { return pool_; }
  void Close() {
    if (open_) UnregisterTable(id_);
    open_ = false;
  }
  EmbeddingTable& t() {
    if (!open_) throw std::runtime_error("embedding table is closed");
    return *table_;
  }

 private:
  std::shared_ptr<EmbeddingTable> table_;
  std::shared_ptr<BufferPool> pool_ = std::make_shared<BufferPool>();
  int64_t id_;
  bool open_ = true;
};

// Runs a table call that returns rows (without the GIL) and hands back
// (keys, values) numpy arrays.
template <typename Method>
nb::tuple RowsCall(PyTable& s, Method method) {
  EmbeddingTable& t = s.t();
  TableRows r;
  {
    nb::gil_scoped_release release;
    r = (t.*method)();
  }
  const size_t n = r.keys.size();
  return nb::make_tuple(ToNumpy(std::move(r.keys), {n}),
                        ToNumpy(std::move(r.values), {n, static_cast<size_t>(t.dim())}));
}

TableOptions MakeOptions(int dim, uint64_t seed, int64_t capacity_hint, int init_kind,
                         float init_a, float init_b, int opt_kind, const nb::dict& h,
                         const nb::dict& memory) {
  TableOptions o;
  for (auto [k, v] : memory) {
    const std::string key = nb::cast<std::string>(k);
    if (key == "occurrence_threshold") o.occurrence_threshold = nb::cast<uint32_t>(v);
    else if (key == "admit_probability") o.admit_probability = nb::cast<float>(v);
    else if (key == "filter_counters") o.filter_counters = nb::cast<int64_t>(v);
    else if (key == "unadmitted_initializer") o.unadmitted_initializer = nb::cast<bool>(v);
    else if (key == "expire_after") o.expire_after = nb::cast<uint32_t>(v);
    else if (key == "max_rows") o.max_rows = nb::cast<int64_t>(v);
    else if (key == "eviction") o.eviction = static_cast<Eviction>(nb::cast<int>(v));
    else throw std::invalid_argument("unknown memory option: " + key);
  }
  o.dim = dim;
  o.seed = seed;
  o.capacity_hint = capacity_hint;
  if (init_kind < 0 || init_kind > 4) throw std::invalid_argument("unknown initializer kind");
  if (opt_kind < 0 || opt_kind > 7) throw std::invalid_argument("unknown optimizer kind");
  o.initializer = {static_cast<InitKind>(init_kind), init_a, init_b};
  OptimizerConfig& c = o.optimizer;
  c.kind = static_cast<OptimizerKind>(opt_kind);
  for (auto [k, v] : h) {
    const std::string key = nb::cast<std::string>(k);
    if (key == "nesterov") { c.nesterov = nb::cast<bool>(v); continue; }
    const float f = nb::cast<float>(v);
    if (key == "momentum") c.momentum = f;
    else if (key == "b1") c.b1 = f;
    else if (key == "b2") c.b2 = f;
    else if (key == "one_minus_b1") c.one_minus_b1 = f;
    else if (key == "one_minus_b2") c.one_minus_b2 = f;
    else if (key == "one_minus_decay") c.one_minus_decay = f;
    else if (key == "eps") c.eps = f;
    else if (key == "eps_root") c.eps_root = f;
    else if (key == "initial_accumulator") c.initial_accumulator = f;
    else if (key == "decay") c.decay = f;
    else if (key == "l1") c.l1 = f;
    else if (key == "l2") c.l2 = f;
    else if (key == "beta") c.beta = f;
    else if (key == "lr_power") c.lr_power = f;
    else throw std::invalid_argument("unknown optimizer hyperparameter: " + key);
  }
  return o;
}

}  // namespace
}  // namespace monolith

using namespace monolith;

NB_MODULE(_engine, m) {
  m.doc() = "monolith_jax's C++ table engine (loaded on first use of a table).";
  // Tables reached from compiled programs (by registry id) or from daemon
  // threads may outlive the interpreter's teardown; that is not a leak.
  nb::set_leak_warnings(false);

  m.def("registrations", [] {
    nb::dict d;
    d["monolith_lookup"] = nb::capsule(reinterpret_cast<void*>(&MonolithLookup));
    d["monolith_apply"] = nb::capsule(reinterpret_cast<void*>(&MonolithApply));
    return d;
  });
  m.def("parallelism", [] { return ThreadPool::Global().Parallelism(); },
        "Threads a batched table call uses (MONOLITH_NUM_THREADS caps it).");
  BindCodec(m);
  BindBatch(m);
  BindRequestSet(m);

  nb::class_<PyTable>(m, "Table")
      .def("__init__",
           [](PyTable* self, int dim, uint64_t seed, int64_t capacity_hint, int init_kind,
              float init_a, float init_b, int opt_kind, nb::dict hparams, nb::dict memory) {
             new (self) PyTable(MakeOptions(dim, seed, capacity_hint, init_kind, init_a, init_b,
                                            opt_kind, hparams, memory));
           },
           "dim"_a, "seed"_a, "capacity_hint"_a, "init_kind"_a, "init_a"_a, "init_b"_a,
           "opt_kind"_a, "hparams"_a, "memory"_a)
      .def_prop_ro("id", &PyTable::id)
      .def_prop_ro("dim", [](PyTable& s) { return s.t().dim(); })
      .def_prop_ro("slot_width", [](PyTable& s) { return s.t().slot_width(); })
      .def("close", &PyTable::Close)
      .def("lookup",
           [](PyTable& s, Keys keys) {
             EmbeddingTable& t = s.t();
             float* out;
             auto array = NewFloats(keys.shape(0), t.dim(), &out);
             {
               nb::gil_scoped_release release;
               t.Lookup(keys.data(), keys.shape(0), out);
             }
             return array;
           })
      .def("lookup_into",
           [](PyTable& s, Keys keys, nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu> out) {
             EmbeddingTable& t = s.t();
             if (out.shape(0) != keys.shape(0) || out.shape(1) != static_cast<size_t>(t.dim()))
               throw std::invalid_argument("out must have shape (len(ids), dim)");
             nb::gil_scoped_release release;
             t.Lookup(keys.data(), keys.shape(0), out.data());
           })
      .def("find",
           [](PyTable& s, Keys keys) {
             EmbeddingTable& t = s.t();
             const size_t n = keys.shape(0);
             float* out;
             auto rows = NewFloats(n, t.dim(), &out);
             std::vector<uint8_t> found(n);
             {
               nb::gil_scoped_release release;
               t.Find(keys.data(), n, out, found.data());
             }
             return nb::make_tuple(rows, ToNumpy(std::move(found), {n}));
           })
      .def("apply",
           [](PyTable& s, Keys keys, Floats2D grads, float lr, uint32_t time) {
             EmbeddingTable& t = s.t();
             if (grads.shape(0) != keys.shape(0) || grads.shape(1) != static_cast<size_t>(t.dim()))
               throw std::invalid_argument("grads must have shape (len(ids), dim)");
             nb::gil_scoped_release release;
             return t.Apply(keys.data(), grads.data(), keys.shape(0), lr, time);
           })
      .def("erase",
           [](PyTable& s, Keys keys) {
             EmbeddingTable& t = s.t();
             nb::gil_scoped_release release;
             return t.Erase(keys.data(), keys.shape(0));
           })
      .def("assign",
           [](PyTable& s, Keys keys, Floats2D values, uint32_t now) {
             EmbeddingTable& t = s.t();
             if (values.shape(0) != keys.shape(0) || values.shape(1) != size_t(t.dim()))
               throw std::invalid_argument("assign: values must be (len(keys), dim) float32");
             nb::gil_scoped_release release;
             return t.Assign(keys.data(), values.data(), keys.shape(0), now);
           })
      .def("size", [](PyTable& s) { return s.t().Size(); })
      .def("clear", [](PyTable& s) { s.t().Clear(); })
      .def("stats",
           [](PyTable& s) {
             const TableStats st = s.t().Stats();
             nb::dict d;
             d["rows"] = st.rows;
             d["row_capacity"] = st.row_capacity;
             d["index_slots"] = st.index_slots;
             d["bytes_values"] = st.bytes_values;
             d["bytes_slots"] = st.bytes_slots;
             d["bytes_overhead"] = st.bytes_overhead;
             d["lookups"] = st.lookups;
             d["inserts"] = st.inserts;
             d["updates"] = st.updates;
             d["nonfinite_skipped"] = st.nonfinite_skipped;
             d["index_rebuilds"] = st.index_rebuilds;
             d["index_kicks"] = st.index_kicks;
             d["bytes_filter"] = st.bytes_filter;
             d["filtered"] = st.filtered;
             d["dropped"] = st.dropped;
             d["expired"] = st.expired;
             d["evicted"] = st.evicted;
             d["touched"] = st.touched;
             d["bytes_dump_kept"] = s.pool()->KeptBytes();
             return d;
           })
      .def("dump",
           [](PyTable& s, int mode, bool reuse) -> nb::object {
             EmbeddingTable& t = s.t();
             if (mode < 0 || mode > 2) throw std::invalid_argument("dump mode must be 0, 1 or 2");
             const size_t dim = static_cast<size_t>(t.dim()), width = static_cast<size_t>(t.slot_width());
             // Written by the engine's threads straight into the buffers
             // that numpy then owns (uninitialized: each byte is written).
             // keys, values, slots, last_update, update_count, touched, filter, removed
             std::array<std::unique_ptr<Lease>, BufferPool::kFields> lease;
             std::shared_ptr<BufferPool> pool = reuse ? s.pool() : nullptr;
             DumpSizes z;
             bool taken;
             {
               nb::gil_scoped_release release;
               taken = t.Dump(static_cast<DumpMode>(mode), [&](const DumpSizes& n) {
                 const auto bytes = DumpFieldBytes(t, static_cast<size_t>(n.rows), static_cast<size_t>(n.filter),
                                                   static_cast<size_t>(n.removed));
                 for (int f = 0; f < BufferPool::kFields; ++f) {
                   lease[f].reset(new Lease{pool, f, {}});
                   lease[f]->block = pool ? pool->Take(f, bytes[f]) : BufferPool::New(bytes[f]);
                 }
                 auto at = [&](int f) { return lease[f]->block.p; };
                 return DumpArrays{static_cast<uint64_t*>(at(0)), static_cast<float*>(at(1)),
                                   static_cast<float*>(at(2)), static_cast<uint32_t*>(at(3)),
                                   static_cast<uint32_t*>(at(4)), static_cast<uint8_t*>(at(5)),
                                   static_cast<uint8_t*>(at(6)), static_cast<uint64_t*>(at(7))};
               }, &z);
             }
             if (!taken) return nb::none();
             const size_t n = static_cast<size_t>(z.rows);
             nb::dict out;
             out["keys"] = Owned<uint64_t>(lease[0], {n});
             out["values"] = Owned<float>(lease[1], {n, dim});
             out["slots"] = Owned<float>(lease[2], {n, width});
             out["last_update"] = Owned<uint32_t>(lease[3], {n});
             out["update_count"] = Owned<uint32_t>(lease[4], {n});
             out["touched"] = Owned<uint8_t>(lease[5], {n});
             out["filter"] = Owned<uint8_t>(lease[6], {static_cast<size_t>(z.filter)});
             if (mode == 2) out["removed"] = Owned<uint64_t>(lease[7], {static_cast<size_t>(z.removed)});
             out["clock"] = z.clock;
             return out;
           }, "mode"_a = 0, "reuse"_a = false)
      .def("release_dump_buffers", [](PyTable& s) { s.pool()->Clear(); })
      .def("prepare_dump_buffers",
           [](PyTable& s, int64_t rows) {
             if (rows < 0) throw std::invalid_argument("rows must be >= 0");
             const auto bytes = DumpFieldBytes(s.t(), static_cast<size_t>(rows), 0, 0);
             nb::gil_scoped_release release;
             // The per-row fields (keys .. touched), as the next dump takes them.
             for (int f = 0; f < 6; ++f) {
               BufferPool::Block b = s.pool()->Take(f, bytes[f]);
               BufferPool::Populate(b);
               s.pool()->Give(f, b);
             }
           }, "rows"_a)
      .def("changes_tracked", [](PyTable& s) { return s.t().ChangesTracked(); })
      .def("expire",
           [](PyTable& s, uint32_t now) {
             EmbeddingTable& t = s.t();
             nb::gil_scoped_release release;
             return t.Expire(now);
           })
      .def("drain_touched", [](PyTable& s) { return RowsCall(s, &EmbeddingTable::DrainTouched); })
      .def("export", [](PyTable& s) { return RowsCall(s, &EmbeddingTable::Export); })
      .def("load", [](PyTable& s, Keys keys, Floats2D values, nb::ndarray<const float, nb::c_contig, nb::device::cpu> slots,
                      U32 last_update, U32 update_count, U8 touched, U8 filter, uint32_t clock) {
        EmbeddingTable& t = s.t();
        const size_t n = keys.shape(0);
        const size_t w = static_cast<size_t>(t.slot_width());
        if (values.shape(0) != n || values.shape(1) != static_cast<size_t>(t.dim()) ||
            slots.size() != n * w || last_update.shape(0) != n || update_count.shape(0) != n)
          throw std::invalid_argument("dump arrays do not match the table's dim and slots");
        if (touched.shape(0) != n) throw std::invalid_argument("dump touched must have one flag per row");
        // Read in place: the arrays stay alive (held by the call) while the
        // engine reads them without the GIL.
        const LoadArrays d{keys.data(), values.data(), slots.data(), last_update.data(), update_count.data(),
                           touched.data(), filter.data(), nullptr};
        DumpSizes z;
        z.rows = static_cast<int64_t>(n);
        z.filter = static_cast<int64_t>(filter.shape(0));
        z.clock = clock;
        nb::gil_scoped_release release;
        t.Load(d, z);
      });
}
