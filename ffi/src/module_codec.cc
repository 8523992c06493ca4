// nanobind binding of the example decoder: a list of Kafka message values
// (bytes) in, a batch's numpy arrays filled in place.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "example_codec.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {
namespace {

template <typename T, int D>
using Out = nb::ndarray<T, nb::ndim<D>, nb::c_contig, nb::device::cpu>;

class PyExampleDecoder {
 public:
  PyExampleDecoder(std::vector<std::string> sparse_names, std::vector<int> max_lens,
                   std::vector<std::string> dense_names, uint64_t pad_key) {
    if (sparse_names.size() != max_lens.size())
      throw std::invalid_argument("one max_len per sparse feature");
    for (int m : max_lens)
      if (m < 1) throw std::invalid_argument("max_len must be >= 1");
    layout_.sparse_names = std::move(sparse_names);
    layout_.max_lens = std::move(max_lens);
    layout_.dense_names = std::move(dense_names);
    layout_.pad_key = pad_key;
  }

  // Decodes values[i] for every i into batch rows row0, row0+1, ... (only
  // good examples take a row); status[i] gets each value's DecodeStatus.
  // Returns the number of rows written.
  int64_t Decode(nb::list values, int64_t row0, std::vector<Out<uint64_t, 2>> ids,
                 Out<int32_t, 2> lengths, Out<float, 2> dense, Out<float, 1> labels,
                 Out<float, 1> rates, Out<int64_t, 1> event_ms, Out<int64_t, 1> label_ms,
                 Out<int32_t, 1> status, std::optional<Out<int32_t, 1>> partitions,
                 std::optional<Out<int64_t, 1>> offsets) {
    const size_t nf = layout_.sparse_names.size(), nd = layout_.dense_names.size();
    const int64_t rows = int64_t(labels.shape(0));
    if (ids.size() != nf) throw std::invalid_argument("one ids array per sparse feature");
    for (size_t f = 0; f < nf; ++f)
      if (int64_t(ids[f].shape(0)) != rows || ids[f].shape(1) != size_t(layout_.max_lens[f]))
        throw std::invalid_argument("ids[" + std::to_string(f) + "] must be (rows, max_len)");
    if (int64_t(lengths.shape(0)) != rows || lengths.shape(1) != nf || int64_t(dense.shape(0)) != rows ||
        dense.shape(1) != nd || int64_t(rates.shape(0)) != rows || int64_t(event_ms.shape(0)) != rows ||
        int64_t(label_ms.shape(0)) != rows)
      throw std::invalid_argument("batch arrays disagree on rows or feature counts");
    const size_t n = nb::len(values);
    if (status.shape(0) != n) throw std::invalid_argument("status needs one entry per value");
    if (row0 < 0 || row0 > rows) throw std::invalid_argument("row0 outside the batch");

    const bool meta = partitions.has_value() && offsets.has_value();
    if (meta && (partitions->shape(0) != n || offsets->shape(0) != n))
      throw std::invalid_argument("partitions and offsets need one entry per value");
    // Borrow each value's buffer; the list (or `held`) keeps them alive.
    // Items that are not bytes are Kafka messages: value(), partition() and
    // offset() are called here, which saves the interpreter's per-message cost.
    std::vector<const uint8_t*> ptr(n);
    std::vector<size_t> len(n);
    std::vector<nb::object> held;
    held.reserve(n);
    std::vector<char> event(n, 0);
    static const nb::str kValue("value"), kPartition("partition"), kOffset("offset"), kError("error");
    for (size_t i = 0; i < n; ++i) {
      nb::handle v = values[i];
      if (!v.is_none() && !nb::isinstance<nb::bytes>(v)) {
        nb::handle msg = v;
        if (meta) {
          partitions->data()[i] = nb::cast<int32_t>(msg.attr(kPartition)());
          offsets->data()[i] = nb::cast<int64_t>(msg.attr(kOffset)());
        }
        if (!msg.attr(kError)().is_none()) {  // an event (end of partition, error), not a message
          event[i] = 1;
          continue;
        }
        held.push_back(msg.attr(kValue)());
        v = held.back();
      }
      if (v.is_none()) {
        ptr[i] = nullptr;
        len[i] = 0;
      } else if (nb::isinstance<nb::bytes>(v)) {
        nb::bytes b = nb::borrow<nb::bytes>(v);
        ptr[i] = reinterpret_cast<const uint8_t*>(b.c_str());
        len[i] = b.size();
      } else {
        throw std::invalid_argument("values must be bytes, None or Kafka messages");
      }
    }
    nb::gil_scoped_release release;
    int64_t row = row0;
    ExampleRow r;
    r.ids.resize(nf);
    for (size_t i = 0; i < n; ++i) {
      if (event[i]) {
        status.data()[i] = -3;
        continue;
      }
      if (row >= rows) {
        // The batch is full: the rest are not decoded (status -1).
        for (size_t j = i; j < n; ++j) status.data()[j] = event[j] ? -3 : -1;
        break;
      }
      for (size_t f = 0; f < nf; ++f) r.ids[f] = ids[f].data() + row * layout_.max_lens[f];
      r.lengths = lengths.data() + row * nf;
      r.dense = dense.data() + row * nd;
      r.label = labels.data() + row;
      r.sample_rate = rates.data() + row;
      r.event_time_ms = event_ms.data() + row;
      r.label_time_ms = label_ms.data() + row;
      DecodeStatus s = DecodeExample(ptr[i], len[i], layout_, r);
      status.data()[i] = s;
      if (s == kDecodeOk) ++row;
    }
    return row - row0;
  }

 private:
  ExampleLayout layout_;
};

}  // namespace

void BindCodec(nb::module_& m) {
  nb::class_<PyExampleDecoder>(m, "ExampleDecoder")
      .def(nb::init<std::vector<std::string>, std::vector<int>, std::vector<std::string>, uint64_t>(),
           "sparse_names"_a, "max_lens"_a, "dense_names"_a, "pad_key"_a)
      .def("decode", &PyExampleDecoder::Decode, "values"_a, "row0"_a, "ids"_a, "lengths"_a, "dense"_a,
           "labels"_a, "rates"_a, "event_ms"_a, "label_ms"_a, "status"_a, "partitions"_a = nb::none(),
           "offsets"_a = nb::none());
}

}  // namespace monolith
