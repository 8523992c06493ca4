// nanobind binding of the joiner's stream codec (stream_codec.h): a whole
// consumed batch of Kafka messages read in one call, and Examples and
// ExampleBatches written around features records' bytes.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "stream_codec.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {
namespace {

// Maximum bytes an Example adds around its features record
// (monolith_jax.stream.messages.EXAMPLE_OVERHEAD).
constexpr size_t kExampleOverhead = 32;

const uint8_t* BytesOf(nb::handle b, size_t* n) {
  nb::bytes v = nb::borrow<nb::bytes>(b);
  *n = v.size();
  return reinterpret_cast<const uint8_t*>(v.c_str());
}

class PyStreamReader {
 public:
  PyStreamReader(std::string features_topic, std::vector<std::string> filled, std::vector<std::string> need_sparse,
                 std::vector<std::string> need_dense)
      : features_topic_(std::move(features_topic)),
        kind_features_("features"),
        kind_actions_("actions"),
        kind_slow_("slow"),
        kind_event_("event") {
    rules_.filled = std::move(filled);
    rules_.need_sparse = std::move(need_sparse);
    rules_.need_dense = std::move(need_dense);
  }

  // One item per consumed message, in order:
  //   ("features", request_id, event_ms, value, origin, msg)
  //   ("actions", request_id, event_ms, (type, value), origin, msg)
  //     where origin = (topic, partition, offset): a message read here;
  //   ("slow", msg): one for the reference parser (JSON, unusable, a
  //     features record over `limit` bytes as an Example in a batch, or
  //     beyond this reader);
  //   ("event", msg): msg.error() is not None (end of partition, an error).
  // `nexts[(topic, partition)]` becomes offset + 1 of each message.
  nb::list Read(nb::list msgs, int64_t limit, nb::dict nexts) {
    static const char* kNames[] = {"error", "topic", "partition", "offset", "value"};
    if (attr_.empty())
      for (const char* n : kNames) attr_.push_back(nb::str(n));
    const size_t n = nb::len(msgs);
    nb::list out;
    nb::object last_topic, last_key;
    int64_t last_part = -1;
    bool last_features = false;
    for (size_t i = 0; i < n; ++i) {
      nb::handle msg = msgs[i];
      if (!msg.attr(attr_[0])().is_none()) {
        out.append(nb::make_tuple(kind_event_, msg));
        continue;
      }
      nb::object topic = msg.attr(attr_[1])();
      const int64_t part = nb::cast<int64_t>(msg.attr(attr_[2])());
      nb::object offset = msg.attr(attr_[3])();
      if (!last_topic.is_valid() || !topic.equal(last_topic) || part != last_part) {
        // A new (topic, partition): the same objects serve its run of messages.
        last_features = nb::isinstance<nb::str>(topic) && nb::cast<std::string>(topic) == features_topic_;
        last_topic = topic;
        last_part = part;
        last_key = nb::make_tuple(topic, part);
      }
      nexts[last_key] = nb::int_(nb::cast<int64_t>(offset) + 1);
      nb::object value = msg.attr(attr_[4])();
      size_t size = 0;
      const uint8_t* data = nb::isinstance<nb::bytes>(value) ? BytesOf(value, &size) : nullptr;
      if (last_features) {
        FeaturesView f;
        if (data != nullptr && ReadFeatureRecord(data, size, rules_, &f) &&
            int64_t(kBatchHeaderSize + BatchEntrySize(size + kExampleOverhead)) <= limit) {
          out.append(nb::make_tuple(kind_features_, nb::str(f.request_id.data(), f.request_id.size()),
                                    f.event_time_ms, value, nb::make_tuple(last_topic, part, offset), msg));
          continue;
        }
      } else {
        ActionView a;
        if (data != nullptr && ReadAction(data, size, &a)) {
          out.append(nb::make_tuple(kind_actions_, nb::str(a.request_id.data(), a.request_id.size()),
                                    a.event_time_ms, nb::make_tuple(TypeName(a.type), double(a.value)),
                                    nb::make_tuple(last_topic, part, offset), msg));
          continue;
        }
      }
      out.append(nb::make_tuple(kind_slow_, msg));
    }
    return out;
  }

 private:
  // Action types are few: one string object each.
  nb::object TypeName(std::string_view type) {
    for (auto& [name, obj] : types_)
      if (name == type) return obj;
    nb::object obj = nb::str(type.data(), type.size());
    if (types_.size() < 64) types_.emplace_back(std::string(type), obj);
    return obj;
  }

  std::string features_topic_;
  FeatureRules rules_;
  nb::str kind_features_, kind_actions_, kind_slow_, kind_event_;
  std::vector<nb::str> attr_;
  std::vector<std::pair<std::string, nb::object>> types_;
};

// label_time_ms: any Python int, written as protobuf writes an int64 (mod 2^64).
nb::bytes EncodeExample(nb::bytes features, float label, float sample_rate, nb::int_ label_time) {
  const unsigned long long bits = PyLong_AsUnsignedLongLongMask(label_time.ptr());
  if (PyErr_Occurred()) throw nb::python_error();
  const int64_t label_time_ms = int64_t(bits);
  std::string out;
  out.reserve(ExampleSize(features.size(), label_time_ms));
  AppendExample(&out, reinterpret_cast<const uint8_t*>(features.c_str()), features.size(), label, sample_rate,
                label_time_ms);
  return nb::bytes(out.data(), out.size());
}

nb::bytes EncodeExampleBatch(nb::list examples) {
  const size_t n = nb::len(examples);
  size_t total = kBatchHeaderSize;
  for (size_t i = 0; i < n; ++i) {
    nb::handle e = examples[i];
    if (!nb::isinstance<nb::bytes>(e)) throw nb::type_error("examples must be bytes");
    total += BatchEntrySize(nb::len(e));
  }
  std::string out;
  out.reserve(total);
  AppendBatchHeader(&out);
  for (size_t i = 0; i < n; ++i) {
    size_t size;
    const uint8_t* data = BytesOf(examples[i], &size);
    AppendBatchEntryHeader(&out, size);
    out.append(reinterpret_cast<const char*>(data), size);
  }
  return nb::bytes(out.data(), out.size());
}

}  // namespace

void BindJoin(nb::module_& m);  // module_join.cc: the join itself

void BindStream(nb::module_& m) {
  BindJoin(m);
  nb::class_<PyStreamReader>(m, "StreamReader")
      .def(nb::init<std::string, std::vector<std::string>, std::vector<std::string>, std::vector<std::string>>(),
           "features_topic"_a, "filled"_a, "need_sparse"_a, "need_dense"_a)
      .def("read", &PyStreamReader::Read, "msgs"_a, "limit"_a, "nexts"_a);
  m.def("encode_example", &EncodeExample, "features"_a, "label"_a, "sample_rate"_a, "label_time_ms"_a);
  m.def("encode_example_batch", &EncodeExampleBatch, "examples"_a);
}

}  // namespace monolith
