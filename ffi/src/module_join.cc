// nanobind binding of the C++ join (join_state.h), and its hot path: a
// consumed batch of Kafka messages read and joined in one call.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "join_state.h"
#include "stream_codec.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace monolith {

namespace {
constexpr size_t kExampleOverhead = 32;  // messages.EXAMPLE_OVERHEAD
}  // namespace

nb::list JoinCore::Process(nb::list msgs, int64_t limit, nb::dict nexts, nb::dict expect, double now_ms,
                           nb::object slow) {
  static const char* kNames[] = {"error", "topic", "partition", "offset", "value"};
  static std::vector<nb::object>* attrs = [] {
    auto* v = new std::vector<nb::object>();  // for the process's life: never torn down after the interpreter
    for (const char* n : kNames) v->push_back(nb::str(n));
    return v;
  }();
  const auto& a = *attrs;
  // msg.NAME() without building a bound method object per call: five calls per message.
  auto call = [&a](nb::handle msg, int i) {
    PyObject* self = msg.ptr();
    PyObject* r = PyObject_VectorcallMethod(a[size_t(i)].ptr(), &self, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
    if (r == nullptr) throw nb::python_error();
    return nb::steal(r);
  };
  const size_t n = nb::len(msgs);
  // The batch's partitions: a few, looked up by the topic's text (no
  // Python object built per message); their next offsets go to `nexts` and
  // `expect` at the end. A message further on than `expect` says (the offset
  // after the last one read, or where reading started) is a gap:
  // (key, expected, offset) in the list returned (offset_gaps.py says what it was).
  struct Part {
    std::string topic;
    int64_t partition;
    int32_t tp;
    bool features;
    int64_t next;
    nb::object key;
  };
  std::vector<Part> parts;
  nb::list gaps;
  struct Flush {  // writes nexts even when a callback raises
    std::vector<Part>& parts;
    nb::dict& nexts;
    nb::dict& expect;
    ~Flush() {
      try {
        for (Part& p : parts) {
          nexts[p.key] = p.next;
          expect[p.key] = p.next;
        }
      } catch (...) {  // only while another error unwinds; that one is reported
      }
    }
  } flush{parts, nexts, expect};
  for (size_t i = 0; i < n; ++i) {
    nb::object msg = msgs[i];
    if (!call(msg, 0).is_none()) {
      slow(msg);
      continue;
    }
    nb::object topic = call(msg, 1);
    const int64_t partition = nb::cast<int64_t>(call(msg, 2));
    const int64_t offset = nb::cast<int64_t>(call(msg, 3));
    Py_ssize_t tlen = 0;
    const char* tname = PyUnicode_Check(topic.ptr()) ? PyUnicode_AsUTF8AndSize(topic.ptr(), &tlen) : nullptr;
    if (tname == nullptr) {  // no topic name: the reference's path
      PyErr_Clear();
      slow(msg);
      continue;
    }
    std::string_view tview(tname, size_t(tlen));
    Part* part = nullptr;
    for (Part& p : parts)
      if (p.partition == partition && p.topic == tview) {
        part = &p;
        break;
      }
    if (part == nullptr) {
      nb::object key = nb::make_tuple(topic, partition);
      int64_t start = -1;
      if (PyObject* e = PyDict_GetItemWithError(expect.ptr(), key.ptr())) {
        start = nb::cast<int64_t>(nb::handle(e));
      } else if (PyErr_Occurred()) {
        throw nb::python_error();
      }
      parts.push_back(Part{std::string(tview), partition, Tp(topic, partition), tview == features_topic_, start,
                           std::move(key)});
      part = &parts.back();
    }
    if (part->next >= 0 && offset > part->next) gaps.append(nb::make_tuple(part->key, part->next, offset));
    part->next = offset + 1;
    const int32_t last_tp = part->tp;
    const bool last_features = part->features;
    nb::object value = call(msg, 4);
    const bool is_bytes = nb::isinstance<nb::bytes>(value);
    size_t size = 0;
    const uint8_t* data = nullptr;
    if (is_bytes) {
      nb::bytes b = nb::borrow<nb::bytes>(value);
      size = b.size();
      data = reinterpret_cast<const uint8_t*>(b.c_str());
    }
    Origin o{last_tp, offset};
    if (last_features) {
      FeaturesView f;
      if (is_bytes && ReadFeatureRecord(data, size, feature_rules_, &f) &&
          int64_t(kBatchHeaderSize + BatchEntrySize(size + kExampleOverhead + size_t(labels_overhead_))) <= limit) {
        Record r{true, std::string(f.request_id), f.event_time_ms, std::move(value), std::string(), 0.0, o, msg};
        if (Admit(r, now_ms)) Apply(r, true);
        continue;
      }
    } else {
      ActionView v;
      if (is_bytes && ReadAction(data, size, &v)) {
        Record r{false, std::string(v.request_id), v.event_time_ms, nb::object(), std::string(v.type),
                 double(v.value), o, msg};
        if (Admit(r, now_ms)) Apply(r, true);
        continue;
      }
    }
    slow(msg);  // the reference reads it (and calls AddFeatures / AddAction) or dead-letters it
  }
  return gaps;
}

void BindJoin(nb::module_& m) {
  nb::class_<JoinCore>(m, "JoinCore")
      .def("__init__",
           [](JoinCore* self, int64_t window, int64_t lateness, std::vector<std::string> positive_types,
              double min_value, uint64_t threshold, uint32_t seed_crc, float negative_rate, bool defer,
              int64_t max_in_memory, double max_future, double max_future_s, double idle_partition_s,
              nb::object store, nb::object emit, nb::object reject, std::string features_topic,
              std::vector<std::string> filled, std::vector<std::string> need_sparse,
              std::vector<std::string> need_dense, nb::list labels, std::vector<int32_t> order) {
             JoinRules r;
             r.window = window;
             r.lateness = lateness;
             r.positive_types = std::move(positive_types);
             r.min_value = min_value;
             r.threshold = threshold;
             r.seed_crc = seed_crc;
             r.negative_rate = negative_rate;
             r.defer = defer;
             r.max_in_memory = max_in_memory;
             r.max_future = max_future;
             r.max_future_s = max_future_s;
             r.idle_partition_s = idle_partition_s;
             // (name, types, binary, min_value, window_ms, threshold, negative_rate, has_default, default, given)
             for (nb::handle item : labels) {
               nb::tuple t = nb::borrow<nb::tuple>(item);
               LabelRuleC l;
               l.name = nb::cast<std::string>(t[0]);
               l.types = nb::cast<std::vector<std::string>>(t[1]);
               l.binary = nb::cast<bool>(t[2]);
               l.min_value = nb::cast<double>(t[3]);
               l.window = nb::cast<int64_t>(t[4]);
               l.threshold = nb::cast<uint64_t>(t[5]);
               l.negative_rate = nb::cast<float>(t[6]);
               l.has_default = nb::cast<bool>(t[7]);
               l.default_value = nb::cast<double>(t[8]);
               l.given = nb::cast<int32_t>(t[9]);
               r.labels.push_back(std::move(l));
             }
             r.order = std::move(order);
             if (r.labels.size() > 64) throw std::invalid_argument("a join takes at most 64 labels");
             if (r.order.size() != r.labels.size()) throw std::invalid_argument("label order of another size");
             FeatureRules f;
             f.filled = std::move(filled);
             f.need_sparse = std::move(need_sparse);
             f.need_dense = std::move(need_dense);
             new (self) JoinCore(std::move(r), std::move(store), std::move(emit), std::move(reject), std::move(f),
                                 std::move(features_topic));
           })
      .def("add_features", &JoinCore::AddFeatures, "rid"_a, "event_ms"_a, "payload"_a, "origin"_a.none(),
           "ref"_a.none(), "now_ms"_a)
      .def("add_action", &JoinCore::AddAction, "rid"_a, "event_ms"_a, "kind"_a, "value"_a, "origin"_a.none(),
           "ref"_a.none(), "now_ms"_a)
      .def("process", &JoinCore::Process, "msgs"_a, "limit"_a, "nexts"_a, "expect"_a, "now_ms"_a, "slow"_a)
      .def("group_examples", &JoinCore::GroupExamples, "partitions"_a, "group_size"_a, "limit"_a)
      .def("take_groups", &JoinCore::TakeGroups, "older_than_s"_a)
      .def("set_group_limit", &JoinCore::SetGroupLimit, "limit"_a)
      .def("advance", &JoinCore::Advance)
      .def("flush", &JoinCore::Flush)
      .def("low_offsets", &JoinCore::LowOffsets)
      .def("drop_partitions", &JoinCore::DropPartitions)
      .def("set_partitions", &JoinCore::SetPartitions)
      .def("partition_idle", &JoinCore::PartitionIdle)
      .def("partition_busy", &JoinCore::PartitionBusy)
      .def("counts", &JoinCore::Counts)
      .def_prop_ro("labels_overhead", &JoinCore::LabelsOverhead)
      .def_prop_ro("in_memory", &JoinCore::InMemory)
      .def_prop_ro("held", &JoinCore::Held)
      .def_prop_ro("watermark", &JoinCore::Watermark);
  m.def("crc32", [](nb::bytes data, uint32_t crc) {
    return Crc32(reinterpret_cast<const uint8_t*>(data.c_str()), data.size(), crc);
  }, "data"_a, "crc"_a = 0);
}

}  // namespace monolith
