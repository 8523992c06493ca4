// nanobind binding of a sharded table's client side of a batch: the unique
// keys of each shard, each batch position's row among them, and the
// gradients summed per unique key, each one pass over the batch without
// the GIL (the numpy version sorted the whole batch and summed through a
// sparse-matrix product: 0.8 us per unique id on the trainer's thread).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "hashing.h"
#include "numpy_owned.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {
namespace {

using Keys = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Index = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Floats2D = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

struct Grouped {
  std::vector<uint64_t> keys;    // unique keys: shard 0's ascending, then shard 1's, ...
  std::vector<int64_t> bounds;   // shard s's keys are keys[bounds[s]:bounds[s + 1]]
  std::vector<int64_t> index;    // each batch position's place in keys
};

Grouped Group(const uint64_t* keys, size_t n, int64_t shards) {
  Grouped g;
  g.bounds.assign(static_cast<size_t>(shards) + 1, 0);
  g.index.resize(n);
  // Open addressing, at most half full; a slot holds 1 + the unique key's
  // number in order of first sight (0: empty).
  size_t cap = 16;
  while (cap < 2 * n) cap <<= 1;
  const size_t mask = cap - 1;
  std::vector<uint32_t> slots(cap, 0);
  std::vector<uint64_t> first;     // unique keys, in order of first sight
  std::vector<uint64_t> mixed;
  first.reserve(n / 2 + 16);
  mixed.reserve(n / 2 + 16);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = keys[i], h = Mix64(k);  // the shard is this modulo the shard count (ps_data.shard_of)
    size_t s = h & mask;
    while (true) {
      const uint32_t v = slots[s];
      if (v == 0) {
        first.push_back(k);
        mixed.push_back(h);
        slots[s] = static_cast<uint32_t>(first.size());
        g.index[i] = static_cast<int64_t>(first.size() - 1);
        break;
      }
      if (first[v - 1] == k) {
        g.index[i] = v - 1;
        break;
      }
      s = (s + 1) & mask;
    }
  }
  const size_t u = first.size();
  // Sorted by (shard, key): the requests carry each shard's keys ascending.
  std::vector<std::pair<uint64_t, uint32_t>> order(u);  // (shard, first-sight number); keys compared below
  for (size_t j = 0; j < u; ++j) order[j] = {mixed[j] % static_cast<uint64_t>(shards), static_cast<uint32_t>(j)};
  std::sort(order.begin(), order.end(), [&first](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : first[a.second] < first[b.second];
  });
  std::vector<int64_t> place(u);
  g.keys.resize(u);
  for (size_t r = 0; r < u; ++r) {
    g.keys[r] = first[order[r].second];
    place[order[r].second] = static_cast<int64_t>(r);
    ++g.bounds[order[r].first + 1];
  }
  for (int64_t s = 0; s < shards; ++s) g.bounds[s + 1] += g.bounds[s];
  for (size_t i = 0; i < n; ++i) g.index[i] = place[g.index[i]];
  return g;
}

}  // namespace

void BindBatch(nb::module_& m) {
  m.def("group_keys",
        [](Keys keys, int64_t shards) {
          if (shards < 1) throw std::invalid_argument("shards must be >= 1");
          const size_t n = keys.shape(0);
          if (n >= (size_t{1} << 32) - 1) throw std::invalid_argument("group_keys: at most 2^32 - 2 keys a batch");
          Grouped g;
          {
            nb::gil_scoped_release release;
            g = Group(keys.data(), n, shards);
          }
          const size_t u = g.keys.size(), b = g.bounds.size();
          return nb::make_tuple(ToNumpy(std::move(g.keys), {u}), ToNumpy(std::move(g.bounds), {b}),
                                ToNumpy(std::move(g.index), {n}));
        },
        "keys"_a, "shards"_a,
        "(unique keys grouped by shard, each shard's ascending; shard bounds; each key's place among them).");
  m.def("sum_rows",
        [](Floats2D grads, Index index, int64_t rows, nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu> out) {
          const size_t n = grads.shape(0), dim = grads.shape(1);
          if (index.shape(0) != n) throw std::invalid_argument("sum_rows: one index per gradient row");
          if (rows < 0 || out.shape(0) != static_cast<size_t>(rows) || out.shape(1) != dim)
            throw std::invalid_argument("sum_rows: out must have shape (rows, dim)");
          const float* g = grads.data();
          const int64_t* ix = index.data();
          float* o = out.data();
          nb::gil_scoped_release release;
          for (size_t i = 0; i < n; ++i)
            if (ix[i] < 0 || ix[i] >= rows) throw std::invalid_argument("sum_rows: an index outside [0, rows)");
          std::memset(o, 0, sizeof(float) * rows * dim);
          // In batch order: each row's sum adds its gradients as they come,
          // the order a sorted segment sum adds them in.
          for (size_t i = 0; i < n; ++i) {
            float* dst = o + ix[i] * dim;
            const float* src = g + i * dim;
            for (size_t d = 0; d < dim; ++d) dst[d] += src[d];
          }
          bool finite = true;
          const size_t total = static_cast<size_t>(rows) * dim;
          for (size_t j = 0; j < total && finite; j += 1024) {
            const size_t end = std::min(total, j + 1024);
            float acc = 0.f;   // x * 0 is 0 for a finite x, nan for inf or nan: one check per block
            for (size_t k = j; k < end; ++k) acc += o[k] * 0.f;
            finite = acc == 0.f;
          }
          return finite;
        },
        "grads"_a, "index"_a, "rows"_a, "out"_a,
        "Sums gradient row i into out[index[i]] (out zeroed first); whether every sum is finite.");
  m.def("take_rows",
        [](Floats2D values, Index index, nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu> out) {
          const size_t n = index.shape(0), dim = values.shape(1), rows = values.shape(0);
          if (out.shape(0) != n || out.shape(1) != dim) throw std::invalid_argument("take_rows: out must be (len(index), dim)");
          const float* v = values.data();
          const int64_t* ix = index.data();
          float* o = out.data();
          nb::gil_scoped_release release;
          for (size_t i = 0; i < n; ++i)
            if (ix[i] < 0 || static_cast<size_t>(ix[i]) >= rows) throw std::invalid_argument("take_rows: an index outside the rows");
          for (size_t i = 0; i < n; ++i) std::memcpy(o + i * dim, v + ix[i] * dim, sizeof(float) * dim);
        },
        "values"_a, "index"_a, "out"_a, "out[i] = values[index[i]].");
}

}  // namespace monolith
