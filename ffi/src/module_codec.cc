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
template <typename T>
using OutAny = nb::ndarray<T, nb::c_contig, nb::device::cpu>;  // (rows,) or (rows, heads)

class PyExampleDecoder {
 public:
  PyExampleDecoder(std::vector<std::string> sparse_names, std::vector<int> max_lens,
                   std::vector<std::string> dense_names, uint64_t pad_key, std::vector<int> dense_fill,
                   std::vector<std::string> head_names, std::vector<int> head_binary,
                   std::vector<int> head_mask_ok) {
    if (sparse_names.size() != max_lens.size())
      throw std::invalid_argument("one max_len per sparse feature");
    for (int m : max_lens)
      if (m < 1) throw std::invalid_argument("max_len must be >= 1");
    if (!dense_fill.empty() && dense_fill.size() != dense_names.size())
      throw std::invalid_argument("dense_fill needs one flag per dense feature (or none)");
    layout_.sparse_names = std::move(sparse_names);
    layout_.max_lens = std::move(max_lens);
    layout_.dense_names = std::move(dense_names);
    layout_.pad_key = pad_key;
    for (int flag : dense_fill) layout_.dense_fill.push_back(flag ? 1 : 0);
    if (head_binary.size() != head_names.size() || head_mask_ok.size() != head_names.size())
      throw std::invalid_argument("head_binary and head_mask_ok need one flag per head");
    for (size_t h = 0; h < head_names.size(); ++h)
      for (size_t g = 0; g < h; ++g)
        if (head_names[g] == head_names[h]) throw std::invalid_argument("head " + head_names[h] + " named twice");
    layout_.head_names = std::move(head_names);
    for (int flag : head_binary) layout_.head_binary.push_back(flag ? 1 : 0);
    for (int flag : head_mask_ok) layout_.head_mask_ok.push_back(flag ? 1 : 0);
    LinkNames(&layout_);
  }

  // Decodes values[i] for every i into batch rows row0, row0+1, ... (only
  // good examples take a row); status[i] gets each value's DecodeStatus.
  // Returns the number of rows written.
  int64_t Decode(nb::list values, int64_t row0, std::vector<Out<uint64_t, 2>> ids,
                 Out<int32_t, 2> lengths, Out<float, 2> dense, OutAny<float> labels,
                 OutAny<float> rates, Out<int64_t, 1> event_ms, Out<int64_t, 1> label_ms,
                 Out<int32_t, 1> status, std::optional<Out<int32_t, 1>> partitions,
                 std::optional<Out<int64_t, 1>> offsets, std::optional<Out<uint64_t, 1>> request_hash,
                 std::optional<Out<float, 2>> masks) {
    const size_t nf = layout_.sparse_names.size(), nd = layout_.dense_names.size(),
                 nh = layout_.head_names.size();
    if (labels.ndim() < 1) throw std::invalid_argument("labels must be (rows,) or (rows, heads)");
    const int64_t rows = int64_t(labels.shape(0));
    for (const OutAny<float>* a : {&labels, &rates}) {
      const bool ok = nh == 0 ? a->ndim() == 1 : a->ndim() == 2 && a->shape(1) == nh;
      if (!ok || int64_t(a->shape(0)) != rows)
        throw std::invalid_argument(nh == 0 ? "labels and rates must be (rows,) for a decoder without heads"
                                            : "labels and rates must be (rows, heads)");
    }
    if (nh > 0 && (!masks.has_value() || int64_t(masks->shape(0)) != rows || masks->shape(1) != nh))
      throw std::invalid_argument("a decoder with heads needs masks of (rows, heads)");
    if (ids.size() != nf) throw std::invalid_argument("one ids array per sparse feature");
    for (size_t f = 0; f < nf; ++f)
      if (int64_t(ids[f].shape(0)) != rows || ids[f].shape(1) != size_t(layout_.max_lens[f]))
        throw std::invalid_argument("ids[" + std::to_string(f) + "] must be (rows, max_len)");
    if (int64_t(lengths.shape(0)) != rows || lengths.shape(1) != nf || int64_t(dense.shape(0)) != rows ||
        dense.shape(1) != nd || int64_t(rates.shape(0)) != rows || int64_t(event_ms.shape(0)) != rows ||
        int64_t(label_ms.shape(0)) != rows)
      throw std::invalid_argument("batch arrays disagree on rows or feature counts");
    if (request_hash.has_value() && int64_t(request_hash->shape(0)) != rows)
      throw std::invalid_argument("request_hash needs one entry per row");
    const size_t n = nb::len(values);
    if (status.shape(0) != n) throw std::invalid_argument("status needs one entry per value");
    if (row0 < 0 || row0 > rows) throw std::invalid_argument("row0 outside the batch");

    const bool meta = partitions.has_value() && offsets.has_value();
    if (meta && (partitions->shape(0) != n || offsets->shape(0) != n))
      throw std::invalid_argument("partitions and offsets need one entry per value");
    BatchArrays out;
    out.ids.resize(nf);
    for (size_t f = 0; f < nf; ++f) out.ids[f] = ids[f].data();
    out.lengths = lengths.data();
    out.dense = dense.data();
    out.labels = labels.data();
    out.rates = rates.data();
    out.masks = nh > 0 ? masks->data() : nullptr;
    out.event_ms = event_ms.data();
    out.label_ms = label_ms.data();
    out.request_hash = request_hash.has_value() ? request_hash->data() : nullptr;
    out.rows = rows;
    // Items that are not bytes are Kafka messages: error(), value(),
    // partition() and offset() are called here, which saves the
    // interpreter's per-message cost. Decoding stops at the first value
    // that does not fit; the rest keep status -1 (not taken).
    static const nb::str kValue("value"), kPartition("partition"), kOffset("offset"), kError("error");
    int64_t row = row0;
    size_t i = 0;
    for (; i < n; ++i) {
      nb::handle v = values[i];
      nb::object value;
      if (!v.is_none() && !nb::isinstance<nb::bytes>(v)) {
        if (meta) {
          partitions->data()[i] = nb::cast<int32_t>(v.attr(kPartition)());
          offsets->data()[i] = nb::cast<int64_t>(v.attr(kOffset)());
        }
        if (!v.attr(kError)().is_none()) {  // an event (end of partition, error), not a message
          status.data()[i] = -3;
          continue;
        }
        value = v.attr(kValue)();
        v = value;
      }
      const uint8_t* ptr = nullptr;
      size_t len = 0;
      if (nb::isinstance<nb::bytes>(v)) {
        nb::bytes b = nb::borrow<nb::bytes>(v);
        ptr = reinterpret_cast<const uint8_t*>(b.c_str());
        len = b.size();
      } else if (!v.is_none()) {
        throw std::invalid_argument("values must be bytes, None or Kafka messages");
      }
      int64_t written = 0;
      DecodeStatus s = DecodeValue(ptr, len, layout_, out, row, &written);
      if (s == kDecodeNoRoom) break;
      status.data()[i] = s;
      row += written;
      if (s == kDecodeJson) {  // the caller converts it, then decodes again from here
        ++i;
        break;
      }
    }
    for (; i < n; ++i) status.data()[i] = -1;
    return row - row0;
  }

 private:
  ExampleLayout layout_;
};

}  // namespace

void BindStream(nb::module_& m);  // module_stream.cc: the joiner's codec

void BindCodec(nb::module_& m) {
  BindStream(m);
  nb::class_<PyExampleDecoder>(m, "ExampleDecoder")
      .def(nb::init<std::vector<std::string>, std::vector<int>, std::vector<std::string>, uint64_t,
                    std::vector<int>, std::vector<std::string>, std::vector<int>, std::vector<int>>(),
           "sparse_names"_a, "max_lens"_a, "dense_names"_a, "pad_key"_a, "dense_fill"_a = std::vector<int>(),
           "head_names"_a = std::vector<std::string>(), "head_binary"_a = std::vector<int>(),
           "head_mask_ok"_a = std::vector<int>())
      .def("decode", &PyExampleDecoder::Decode, "values"_a, "row0"_a, "ids"_a, "lengths"_a, "dense"_a,
           "labels"_a, "rates"_a, "event_ms"_a, "label_ms"_a, "status"_a, "partitions"_a = nb::none(),
           "offsets"_a = nb::none(), "request_hash"_a = nb::none(), "masks"_a = nb::none());
}

}  // namespace monolith
