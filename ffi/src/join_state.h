// The join of features and actions on request id, in event time: the C++
// twin of monolith_jax/stream/join_state.py, whose module docstring states
// the rules (window, lateness, per-partition watermark, held far-future
// records, early and orphan actions, repeats, negative sampling, spill).
// Every decision, count, reason and emitted byte is the Python reference's;
// tests run both on the same streams. With named labels (JoinRules::labels)
// it is the twin of join_labels.py instead (join_labels.cc).
//
// The Python side keeps what is Python's: the spill store (SQLite,
// monolith_jax/stream/spill.py, called through `store`), the emit and
// reject callbacks, and the Kafka plumbing. Consumed messages are read and
// joined in one call (`Process`), with no Python object per message beyond
// the message itself.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "example_groups.h"
#include "stream_codec.h"

namespace monolith {

namespace nb = nanobind;

using Time = __int128;  // event time arithmetic, as Python's ints: deadlines may pass int64

// One named label of a multi-label join (monolith_jax/stream/labels.py's
// LabelRule, as its Labeller reads it).
struct LabelRuleC {
  std::string name;
  std::vector<std::string> types;  // positive types, or {value_of}
  bool binary = true;
  double min_value = 0.0;
  int64_t window = 0;              // ms
  uint64_t threshold = uint64_t(1) << 32;
  float negative_rate = 1.0f;
  bool has_default = false;
  double default_value = 0.0;
  int32_t given = -1;              // index of the label it is given, or -1
};

struct JoinRules {
  int64_t window = 0, lateness = 0;      // ms
  std::vector<std::string> positive_types;
  double min_value = 0.0;
  uint64_t threshold = uint64_t(1) << 32; // keep a negative when crc32(seed, rid) < threshold
  uint32_t seed_crc = 0;                  // crc32 of the seed's bytes
  float negative_rate = 1.0f;
  bool defer = false;                     // emit positives at window end
  int64_t max_in_memory = 1;
  double max_future = 0.0;                // ms; may be inf
  double max_future_s = 0.0;              // for reasons
  double idle_partition_s = 2.0;
  // A multi-label join (empty: one label, the fields above). `window` is
  // then the longest of the labels' windows; `order` puts givens first.
  std::vector<LabelRuleC> labels;
  std::vector<int32_t> order;
};

struct Origin {
  int32_t tp = -1;  // index into JoinCore's partitions; -1: none
  int64_t off = -1;
};

class JoinCore {
 public:
  // store: a SpillStore; emit(rid, example) and reject(ref, reason): callables.
  JoinCore(JoinRules rules, nb::object store, nb::object emit, nb::object reject, FeatureRules features,
           std::string features_topic);

  // A record from Python (the reference's parse); origin: None or (topic, partition, offset).
  void AddFeatures(const std::string& rid, int64_t t, nb::object payload, nb::handle origin, nb::object ref,
                   double now_ms);
  void AddAction(const std::string& rid, int64_t t, const std::string& type, double value, nb::handle origin,
                 nb::object ref, double now_ms);
  // A consumed batch: each message read and joined here, or handed to
  // slow(msg) in order (JSON, unusable, too large at `limit`, Kafka events).
  // nexts[(topic, partition)] = offset + 1 of each message.
  nb::list Process(nb::list msgs, int64_t limit, nb::dict nexts, nb::dict expect, double now_ms, nb::object slow);

  // From now on examples are grouped here (ExampleGroups) instead of
  // passed to emit one by one; TakeGroups hands the groups over as
  // [(partition, value, examples)], full ones first, then open ones at least
  // `older_than_s` old (negative: all).
  void GroupExamples(int32_t partitions, int32_t group_size, int64_t limit);
  nb::list TakeGroups(double older_than_s);
  void SetGroupLimit(int64_t limit);

  int64_t Advance();
  int64_t Flush();
  nb::dict LowOffsets();
  int64_t DropPartitions(nb::iterable tps);
  // Bytes the labels add to an Example at most (messages.labels_overhead).
  int64_t LabelsOverhead() const;
  void SetPartitions(nb::iterable tps);
  void PartitionIdle(nb::handle tp);
  void PartitionBusy(nb::handle tp);  // more of it is on its way: it holds the watermark again

  std::vector<int64_t> Counts() const {
    std::vector<int64_t> v(counts_, counts_ + kCounters);
    v.insert(v.end(), label_counts_.begin(), label_counts_.end());
    return v;
  }
  int64_t InMemory() const { return int64_t(pending_.size()); }
  int64_t Held() const { return int64_t(held_.size()); }
  nb::object Watermark() const;

  static constexpr int kCounters = 13;  // join_state.COUNTERS, in order

 private:
  enum Counter { kFeatures, kActions, kPositives, kNegatives, kSampledOut, kLate, kOrphans, kRepeats, kOther,
                 kDuplicates, kSpilled, kUnspilled, kBadTimes };
  struct Record {
    bool features;
    std::string rid;
    int64_t t;
    nb::object payload;  // features
    std::string type;    // actions
    double value;
    Origin origin;
    nb::object ref;
  };
  // A label's state: nothing yet, or its (earliest) action's time and value.
  struct LState {
    bool set = false;
    int64_t t = 0;
    double value = 0.0;
  };
  using LabelState = std::vector<LState>;
  struct Pending {
    int64_t t;
    nb::object payload;
    Origin origin;
    LabelState state;  // a multi-label join's
  };
  struct Early {
    int64_t t;
    std::string type;
    double value;
    Origin origin;
  };
  using Entry = std::pair<Time, std::string>;
  using Heap = std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>>;

  int32_t PartOf(const Origin& o) const { return o.tp; }  // -1: the None partition
  int32_t Tp(nb::handle topic, int64_t partition);
  Origin OriginOf(nb::handle origin);
  bool Admit(Record& r, double now_ms);
  void Apply(Record& r, bool see);
  void AddFeaturesRecord(const std::string& rid, int64_t t, nb::object payload, Origin o, bool see);
  void AddActionRecord(const std::string& rid, int64_t t, const std::string& type, double value, Origin o,
                       bool see);
  void Refuse(nb::handle ref, const std::string& reason);
  void See(int64_t t, const Origin& o);
  Time LowTime();
  bool Positive(std::string_view type, double value) const;
  void EmitPositive(const std::string& rid, int64_t tf, nb::handle payload, int64_t ta);
  void Finalize(const std::string& rid, int64_t tf, nb::handle payload);
  void Close(const std::string& rid, Time deadline, uint64_t positive);
  void Spill();
  void Emit(const std::string& rid, nb::handle payload, float label, float rate, Time label_time);
  void Deliver(const std::string& rid);  // the Example in scratch_: into its group, or to emit
  size_t StoreSize();
  bool HeldPop(int32_t part, Record* out);
  // The multi-label join (rules_.labels non-empty): join_labels.py's rules.
  bool Multi() const { return !rules_.labels.empty(); }
  int TakeLabels(LabelState& s, int64_t tf, int64_t ta, std::string_view type, double value) const;
  void CountOutcome(int outcome);
  bool Complete(const LabelState& s) const;
  uint64_t PositiveMask(const LabelState& s) const;
  void EmitLabels(const std::string& rid, int64_t tf, nb::handle payload, const LabelState& s, Time label_time);
  nb::bytes DumpState(const LabelState& s) const;
  LabelState LoadState(nb::handle text) const;

  JoinRules rules_;
  FeatureRules feature_rules_;
  std::string features_topic_;
  nb::object store_, emit_, reject_;
  int64_t counts_[kCounters] = {};
  // Partitions: (topic, partition) keys as Python tuples, by index.
  std::vector<nb::object> tp_keys_;
  std::unordered_map<std::string, int32_t> tp_index_;  // topic + '\0' + partition -> index
  bool has_front_ = false;
  int64_t front_ = 0;
  std::vector<std::pair<int32_t, Record>> held_;       // in insertion order, as a Python dict
  std::unordered_map<int32_t, int64_t> part_max_;
  std::unordered_set<int32_t> inputs_;
  std::unordered_map<int32_t, double> idle_;           // partition -> monotonic seconds
  Time watermark_;
  std::unordered_map<std::string, Pending> pending_;
  Heap pending_heap_, early_heap_, closed_heap_;
  std::unordered_map<std::string, std::vector<Early>> early_;
  std::unordered_map<std::string, std::pair<Time, uint64_t>> closed_;  // positive (one label), or a mask of labels
  std::unordered_map<std::string, int64_t> marked_;
  std::string scratch_;
  std::unique_ptr<ExampleGroups> groups_;
  std::vector<int64_t> label_counts_;  // labels.Labeller.counters, in order
  std::vector<size_t> label_base_;     // each label's first counter
  bool all_binary_ = false;            // every label binary: an example may leave on its actions
  int64_t labels_overhead_ = 0;        // LabelsOverhead(), for Process's size check
};

// zlib's crc32(data, crc): what the Python reference's sampling uses.
uint32_t Crc32(const uint8_t* data, size_t size, uint32_t crc);

}  // namespace monolith
