// A numpy array that takes over a std::vector's buffer without copying it.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <utility>
#include <vector>

namespace monolith {

// `Elem`: how numpy sees each element, of T's size (bool for uint8_t).
template <typename T, typename Elem = T>
nanobind::ndarray<nanobind::numpy, Elem> ToNumpy(std::vector<T>&& v, std::initializer_list<size_t> shape) {
  static_assert(sizeof(T) == sizeof(Elem), "numpy's element must be the vector's size");
  auto* heap = new std::vector<T>(std::move(v));
  nanobind::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nanobind::ndarray<nanobind::numpy, Elem>(reinterpret_cast<Elem*>(heap->data()), shape, owner);
}

}  // namespace monolith
