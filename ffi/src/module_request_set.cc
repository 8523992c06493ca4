// nanobind binding of RequestSet: the set of request hashes a trainer has
// trained (monolith_jax/online/dedup.py), each tagged with the epoch (the
// dedup's chunk) it was last added in; epochs older than a bound are
// forgotten at once. One open-addressing table with linear probing: a
// lookup is one probe run wherever the hash was added, where the sorted
// chunks it replaces took a binary search per chunk (one per 64k hashes
// in the window). Forgotten entries stay in place as dead until the table
// is rebuilt, which happens when live and dead slots together fill it.
// Calls hold the GIL: they take microseconds, and a trainer's decoding and
// training threads then see one another's adds whole.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <utility>
#include <vector>

#include "hashing.h"
#include "numpy_owned.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {
namespace {

using Hashes = nb::ndarray<const uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

class RequestSet {
 public:
  RequestSet() { Reset(16); }

  // Whether each hash is held and alive (0, no request id, never is).
  nb::ndarray<nb::numpy, bool> Seen(Hashes hashes) const {
    const uint64_t* h = hashes.data();
    std::vector<uint8_t> out(hashes.shape(0));
    for (size_t i = 0; i < out.size(); ++i) {
      if (h[i] == 0) continue;
      const size_t s = Find(h[i]);
      out[i] = keys_[s] == h[i] && epochs_[s] >= min_epoch_;
    }
    const size_t n = out.size();
    return ToNumpy<uint8_t, bool>(std::move(out), {n});
  }

  // Adds each hash (0s skipped) in `epoch`, or moves it there from the
  // epoch it was added in before; returns how many were not already held
  // in `epoch` (new to the set, forgotten before, or from an older epoch).
  int64_t Add(Hashes hashes, uint32_t epoch) {
    if (epoch < min_epoch_) throw std::invalid_argument("RequestSet.add: epoch older than the oldest kept");
    const uint64_t* h = hashes.data();
    int64_t moved = 0;
    for (size_t i = 0, n = hashes.shape(0); i < n; ++i) {
      if (h[i] == 0) continue;
      size_t s = Find(h[i]);
      if (keys_[s] == h[i]) {
        if (epochs_[s] == epoch) continue;
        if (epochs_[s] >= min_epoch_) {
          --pop_[epochs_[s]];
        } else {
          ++live_;
        }
      } else {
        if ((used_ + 1) * 100 > keys_.size() * 85) {  // 85% of the slots hold live or dead entries
          Rebuild();
          s = Find(h[i]);
        }
        keys_[s] = h[i];
        ++used_;
        ++live_;
      }
      epochs_[s] = epoch;
      ++pop_[epoch];
      ++moved;
    }
    return moved;
  }

  // Forgets every hash last added in an epoch before `min_epoch`.
  void Expire(uint32_t min_epoch) {
    if (min_epoch <= min_epoch_) return;
    for (auto it = pop_.begin(); it != pop_.end() && it->first < min_epoch;) {
      live_ -= it->second;
      it = pop_.erase(it);
    }
    min_epoch_ = min_epoch;
  }

  // The live hashes and the epoch each was last added in (table order).
  nb::tuple Dump() const {
    std::vector<uint64_t> keys;
    std::vector<uint32_t> epochs;
    keys.reserve(live_);
    epochs.reserve(live_);
    for (size_t s = 0; s < keys_.size(); ++s)
      if (keys_[s] != 0 && epochs_[s] >= min_epoch_) {
        keys.push_back(keys_[s]);
        epochs.push_back(epochs_[s]);
      }
    const size_t n = keys.size();
    return nb::make_tuple(ToNumpy(std::move(keys), {n}), ToNumpy(std::move(epochs), {n}));
  }

  void Clear() {
    Reset(16);
    pop_.clear();
    live_ = 0;
    min_epoch_ = 0;
  }

  int64_t Size() const { return live_; }
  uint32_t MinEpoch() const { return min_epoch_; }
  int64_t Slots() const { return static_cast<int64_t>(keys_.size()); }

 private:
  // The slot holding `h`, or the empty slot where its probe run ends.
  size_t Find(uint64_t h) const {
    size_t s = FastRange(Mix64(h), keys_.size());
    while (keys_[s] != 0 && keys_[s] != h) {
      if (++s == keys_.size()) s = 0;
    }
    return s;
  }

  void Reset(size_t slots) {
    keys_.assign(slots, 0);
    epochs_.assign(slots, 0);
    used_ = 0;
  }

  // Keeps the live entries only, in a table they fill to 60% (any size:
  // a power of two would leave up to half of it empty).
  void Rebuild() {
    const size_t slots = std::max<size_t>(16, static_cast<size_t>(live_ + 1) * 100 / 60 + 1);
    std::vector<uint64_t> keys = std::move(keys_);
    std::vector<uint32_t> epochs = std::move(epochs_);
    Reset(slots);
    for (size_t s = 0; s < keys.size(); ++s)
      if (keys[s] != 0 && epochs[s] >= min_epoch_) {
        const size_t t = Find(keys[s]);
        keys_[t] = keys[s];
        epochs_[t] = epochs[s];
        ++used_;
      }
  }

  std::vector<uint64_t> keys_;    // 0: empty slot
  std::vector<uint32_t> epochs_;  // the epoch each slot's hash was last added in
  size_t used_ = 0;               // slots holding a hash, live or dead
  int64_t live_ = 0;              // hashes in epochs >= min_epoch_
  uint32_t min_epoch_ = 0;
  std::map<uint32_t, int64_t> pop_;  // live hashes per epoch
};

}  // namespace

void BindRequestSet(nb::module_& m) {
  nb::class_<RequestSet>(m, "RequestSet")
      .def(nb::init<>())
      .def("seen", &RequestSet::Seen, "hashes"_a)
      .def("add", &RequestSet::Add, "hashes"_a, "epoch"_a)
      .def("expire", &RequestSet::Expire, "min_epoch"_a)
      .def("dump", &RequestSet::Dump)
      .def("clear", &RequestSet::Clear)
      .def("__len__", &RequestSet::Size)
      .def_prop_ro("min_epoch", &RequestSet::MinEpoch)
      .def_prop_ro("slots", &RequestSet::Slots);
}

}  // namespace monolith
