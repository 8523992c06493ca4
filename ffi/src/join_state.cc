#include "join_state.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include <nanobind/stl/string.h>

namespace monolith {
namespace {

constexpr Time kNoTime = -(Time(1) << 62);  // join_state's -(2**62)
constexpr Time kFlush = Time(1) << 64;      // join_state._FLUSH
const char* kBadTime = "event time out of bounds";

double Monotonic() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A Python int of any Time.
nb::object PyInt(Time v) {
  if (v >= INT64_MIN && v <= INT64_MAX) return nb::int_(int64_t(v));
  const bool neg = v < 0;
  unsigned __int128 u = neg ? (unsigned __int128)(-v) : (unsigned __int128)v;
  nb::object hi = nb::int_(uint64_t(u >> 64)), lo = nb::int_(uint64_t(u));
  nb::object r = hi * nb::int_(uint64_t(1) << 32) * nb::int_(uint64_t(1) << 32) + lo;
  return neg ? -r : r;
}

std::string Num(Time v) {  // a decimal, as Python prints an int
  if (v == 0) return "0";
  bool neg = v < 0;
  unsigned __int128 u = neg ? (unsigned __int128)(-v) : (unsigned __int128)v;
  std::string s;
  while (u) {
    s.push_back(char('0' + int(u % 10)));
    u /= 10;
  }
  if (neg) s.push_back('-');
  return std::string(s.rbegin(), s.rend());
}

std::string G(double v) {  // Python's format(v, "g")
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Python's `int > float` and `int <= float`, exactly.
bool Above(Time t, double f) { return (long double)t > (long double)f; }

uint32_t kCrcTable[256];
bool crc_ready = [] {
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
    kCrcTable[i] = c;
  }
  return true;
}();

}  // namespace

uint32_t Crc32(const uint8_t* data, size_t size, uint32_t crc) {
  crc = ~crc;
  for (size_t i = 0; i < size; ++i) crc = kCrcTable[(crc ^ data[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

JoinCore::JoinCore(JoinRules rules, nb::object store, nb::object emit, nb::object reject, FeatureRules features,
                   std::string features_topic)
    : rules_(std::move(rules)),
      feature_rules_(std::move(features)),
      features_topic_(std::move(features_topic)),
      store_(std::move(store)),
      emit_(std::move(emit)),
      reject_(std::move(reject)),
      watermark_(kNoTime) {
  all_binary_ = Multi();
  for (const LabelRuleC& r : rules_.labels) {
    label_base_.push_back(label_counts_.size());
    label_counts_.resize(label_counts_.size() + (r.binary ? 4 : 3), 0);
    all_binary_ = all_binary_ && r.binary;
  }
  labels_overhead_ = LabelsOverhead();
}

int32_t JoinCore::Tp(nb::handle topic, int64_t partition) {
  // Keyed by the topic's text; a topic that is not a plain string (None,
  // or text UTF-8 cannot hold) by its ascii() form, marked apart.
  std::string key;
  Py_ssize_t n = 0;
  const char* text = PyUnicode_Check(topic.ptr()) ? PyUnicode_AsUTF8AndSize(topic.ptr(), &n) : nullptr;
  if (text != nullptr) {
    key.assign(text, size_t(n));
  } else {
    PyErr_Clear();
    nb::object shown = nb::steal(PyObject_ASCII(topic.ptr()));
    if (!shown.is_valid()) throw nb::python_error();
    key = "\x01" + nb::cast<std::string>(shown);
  }
  key.push_back('\0');
  key += std::to_string(partition);
  auto it = tp_index_.find(key);
  if (it != tp_index_.end()) return it->second;
  int32_t idx = int32_t(tp_keys_.size());
  tp_keys_.push_back(nb::make_tuple(topic, partition));
  tp_index_.emplace(std::move(key), idx);
  return idx;
}

Origin JoinCore::OriginOf(nb::handle origin) {
  Origin o;
  if (origin.is_none()) return o;
  nb::tuple t = nb::borrow<nb::tuple>(origin);
  o.tp = Tp(t[0], nb::cast<int64_t>(t[1]));
  o.off = nb::cast<int64_t>(t[2]);
  return o;
}

void JoinCore::AddFeatures(const std::string& rid, int64_t t, nb::object payload, nb::handle origin, nb::object ref,
                           double now_ms) {
  Record r{true, rid, t, std::move(payload), std::string(), 0.0, OriginOf(origin), std::move(ref)};
  if (Admit(r, now_ms)) Apply(r, true);
}

void JoinCore::AddAction(const std::string& rid, int64_t t, const std::string& type, double value, nb::handle origin,
                         nb::object ref, double now_ms) {
  Record r{false, rid, t, nb::object(), type, value, OriginOf(origin), std::move(ref)};
  if (Admit(r, now_ms)) Apply(r, true);
}

bool JoinCore::HeldPop(int32_t part, Record* out) {
  for (auto it = held_.begin(); it != held_.end(); ++it)
    if (it->first == part) {
      *out = std::move(it->second);
      held_.erase(it);
      return true;
    }
  return false;
}

bool JoinCore::Admit(Record& r, double now_ms) {
  const char* kind = r.features ? "features" : "actions";
  if (r.t < 0) {
    Refuse(r.ref, std::string(kBadTime) + ": " + kind + " event time " + Num(r.t) + " ms is negative");
    return false;
  }
  if (Above(r.t, now_ms + rules_.max_future)) {
    Refuse(r.ref, std::string(kBadTime) + ": " + kind + " event time " + Num(r.t) + " ms is more than " +
                      G(rules_.max_future_s) + " s ahead of the joiner's clock (" + Num(Time(now_ms)) + " ms)");
    return false;
  }
  const int32_t part = PartOf(r.origin);
  bool beyond = has_front_ && Above(r.t, double(front_) + rules_.max_future);
  Record held;
  if (HeldPop(part, &held)) {
    if (beyond || !Above(held.t, double(front_) + rules_.max_future)) {
      // Two in a row that far ahead: the stream jumped (a gap); or it caught up with the held one.
      Apply(held, true);
      beyond = Above(r.t, double(front_) + rules_.max_future);
      if (!beyond) return true;
    } else {
      Refuse(held.ref, std::string(kBadTime) + ": " + (held.features ? "features" : "actions") + " event time " +
                           Num(held.t) + " ms is more than " + G(rules_.max_future_s) +
                           " s ahead of the stream (latest event time " + Num(front_) +
                           " ms), and the next message of its partition is not");
    }
  }
  if (beyond) {
    held_.emplace_back(part, std::move(r));
    return false;
  }
  return true;
}

void JoinCore::Apply(Record& r, bool see) {
  if (r.features)
    AddFeaturesRecord(r.rid, r.t, r.payload, r.origin, see);
  else
    AddActionRecord(r.rid, r.t, r.type, r.value, r.origin, see);
}

void JoinCore::Refuse(nb::handle ref, const std::string& reason) {
  counts_[kBadTimes] += 1;
  if (!reject_.is_none()) reject_(ref, nb::str(reason.data(), reason.size()));
}

bool JoinCore::Positive(std::string_view type, double value) const {
  if (!(value >= rules_.min_value)) return false;
  for (const auto& p : rules_.positive_types)
    if (p == type) return true;
  return false;
}

void JoinCore::See(int64_t t, const Origin& o) {
  const int32_t part = PartOf(o);
  auto it = part_max_.find(part);
  if (it == part_max_.end()) {
    if (Time(t) > kNoTime) part_max_.emplace(part, t);
  } else if (t > it->second) {
    it->second = t;
  }
  if (!has_front_ || t > front_) {
    front_ = t;
    has_front_ = true;
  }
  if (!idle_.empty()) idle_.erase(part);
}

void JoinCore::AddFeaturesRecord(const std::string& rid, int64_t t, nb::object payload, Origin o, bool see) {
  counts_[kFeatures] += 1;
  if (see) See(t, o);
  if (pending_.count(rid) || closed_.count(rid)) {
    counts_[kDuplicates] += 1;
    return;
  }
  if (Multi()) {
    LabelState state(rules_.labels.size());
    auto e = early_.find(rid);
    bool had = false;
    if (e != early_.end()) {
      std::vector<Early> early = std::move(e->second);
      early_.erase(e);
      had = !early.empty();
      std::stable_sort(early.begin(), early.end(), [](const Early& a, const Early& b) { return a.t < b.t; });
      for (const Early& a : early) CountOutcome(TakeLabels(state, t, a.t, a.type, a.value));
    }
    if (had && !rules_.defer && Complete(state)) {
      int64_t last = state[0].t;
      for (const LState& x : state) last = std::max(last, x.t);
      EmitLabels(rid, t, payload, state, Time(last));
      return;
    }
    pending_[rid] = Pending{t, std::move(payload), o, std::move(state)};
    pending_heap_.emplace(Time(t) + rules_.window, rid);
    if (int64_t(pending_.size()) > rules_.max_in_memory) Spill();
    return;
  }
  auto e = early_.find(rid);
  if (e != early_.end()) {
    std::vector<Early> early = std::move(e->second);
    early_.erase(e);
    std::stable_sort(early.begin(), early.end(), [](const Early& a, const Early& b) { return a.t < b.t; });
    bool labelled = false, emitted = false;
    for (const Early& a : early) {
      if (!Positive(a.type, a.value)) {
        counts_[kOther] += 1;
      } else if (labelled) {
        counts_[kRepeats] += 1;
      } else if (Time(a.t) - t <= rules_.window) {
        labelled = true;
        if (!rules_.defer) {
          EmitPositive(rid, t, payload, a.t);
          emitted = true;
        } else {
          marked_.emplace(rid, a.t);  // setdefault
        }
      } else {
        counts_[kLate] += 1;
      }
    }
    if (emitted) return;
  }
  pending_[rid] = Pending{t, std::move(payload), o, {}};
  pending_heap_.emplace(Time(t) + rules_.window, rid);
  if (int64_t(pending_.size()) > rules_.max_in_memory) Spill();
}

size_t JoinCore::StoreSize() { return nb::len(store_); }

void JoinCore::AddActionRecord(const std::string& rid, int64_t t, const std::string& type, double value, Origin o,
                               bool see) {
  counts_[kActions] += 1;
  if (see) See(t, o);
  auto c = closed_.find(rid);
  if (c != closed_.end()) {
    if (Multi()) {  // repeat if a label it makes was 1, late if one it makes was not
      int outcome = 3;
      for (size_t i = 0; i < rules_.labels.size(); ++i) {
        const LabelRuleC& r = rules_.labels[i];
        if (std::find(r.types.begin(), r.types.end(), type) == r.types.end()) continue;
        if (r.binary && !(value >= r.min_value)) continue;
        if ((c->second.second >> i) & 1) {
          outcome = 1;
          break;
        }
        outcome = 2;
      }
      CountOutcome(outcome);
      return;
    }
    if (Positive(type, value))
      counts_[c->second.second ? kRepeats : kLate] += 1;
    else
      counts_[kOther] += 1;
    return;
  }
  auto w = pending_.find(rid);
  if (w == pending_.end() && StoreSize()) {
    nb::object row = store_.attr("take")(rid);
    if (!row.is_none()) {
      counts_[kUnspilled] += 1;
      nb::tuple r = nb::borrow<nb::tuple>(row);
      Origin back;
      back.tp = Tp(r[4], nb::cast<int64_t>(r[5]));
      back.off = nb::cast<int64_t>(r[6]);
      const int64_t tf = nb::cast<int64_t>(r[2]);
      LabelState state;
      if (Multi()) state = r.size() > 7 ? LoadState(r[7]) : LabelState(rules_.labels.size());
      w = pending_.emplace(rid, Pending{tf, nb::borrow(r[3]), back, std::move(state)}).first;  // back until decided
      pending_heap_.emplace(Time(tf) + rules_.window, rid);
    }
  }
  if (w == pending_.end()) {
    early_[rid].push_back(Early{t, type, value, o});
    early_heap_.emplace(Time(t), rid);
    return;
  }
  if (Multi()) {
    CountOutcome(TakeLabels(w->second.state, w->second.t, t, type, value));
    if (!rules_.defer && Complete(w->second.state)) {
      const int64_t tf = w->second.t;
      nb::object payload = std::move(w->second.payload);
      LabelState state = std::move(w->second.state);
      pending_.erase(w);
      int64_t last = state[0].t;
      for (const LState& x : state) last = std::max(last, x.t);
      EmitLabels(rid, tf, payload, state, Time(last));
    }
    return;
  }
  if (!Positive(type, value)) {
    counts_[kOther] += 1;
    return;
  }
  const int64_t tf = w->second.t;
  if (Time(t) - tf > rules_.window) {
    counts_[kLate] += 1;
    return;
  }
  if (rules_.defer) {
    if (marked_.count(rid))
      counts_[kRepeats] += 1;
    else
      marked_[rid] = t;
    return;
  }
  nb::object payload = std::move(w->second.payload);
  pending_.erase(w);
  EmitPositive(rid, tf, payload, t);
}

Time JoinCore::LowTime() {
  const double now = Monotonic();
  bool any_active = false;
  Time low = 0;
  for (int32_t tp : inputs_) {
    auto i = idle_.find(tp);
    if (i != idle_.end() && now - i->second >= rules_.idle_partition_s) continue;
    auto m = part_max_.find(tp);
    Time v = m == part_max_.end() ? kNoTime : Time(m->second);
    if (!any_active || v < low) low = v;
    any_active = true;
  }
  if (any_active) return low;
  Time least = 0;
  bool first = true;
  for (auto& [_, v] : part_max_)
    if (first || v < least) {
      least = v;
      first = false;
    }
  return least;
}

int64_t JoinCore::Advance() {
  if (!part_max_.empty() && watermark_ < kFlush) watermark_ = std::max(watermark_, LowTime() - rules_.lateness);
  const Time wm = watermark_;
  struct Due {
    Time deadline;
    std::string rid;
    int64_t tf;
    nb::object payload;
    LabelState state;
  };
  std::vector<Due> due;
  while (!pending_heap_.empty() && pending_heap_.top().first < wm) {
    Entry top = pending_heap_.top();
    pending_heap_.pop();
    auto it = pending_.find(top.second);
    if (it == pending_.end() || Time(it->second.t) + rules_.window != top.first) continue;  // emitted, or spilled
    due.push_back(Due{top.first, top.second, it->second.t, std::move(it->second.payload),
                      std::move(it->second.state)});
    pending_.erase(it);
  }
  if (StoreSize()) {
    nb::object rows = store_.attr("pop_due")(PyInt(wm));
    for (nb::handle row : rows) {
      nb::tuple r = nb::borrow<nb::tuple>(row);
      LabelState state;
      if (Multi()) state = r.size() > 7 ? LoadState(r[7]) : LabelState(rules_.labels.size());
      due.push_back(Due{Time(nb::cast<int64_t>(r[1])), nb::cast<std::string>(r[0]), nb::cast<int64_t>(r[2]),
                        nb::borrow(r[3]), std::move(state)});
    }
  }
  std::stable_sort(due.begin(), due.end(), [](const Due& a, const Due& b) { return a.deadline < b.deadline; });
  for (Due& d : due) {
    if (Multi())
      EmitLabels(d.rid, d.tf, d.payload, d.state, Time(d.tf) + rules_.window);
    else
      Finalize(d.rid, d.tf, d.payload);
  }
  const int64_t done = int64_t(due.size());
  while (!early_heap_.empty() && early_heap_.top().first + rules_.window < wm) {
    std::string rid = early_heap_.top().second;
    early_heap_.pop();
    auto it = early_.find(rid);
    if (it != early_.end()) {
      counts_[kOrphans] += int64_t(it->second.size());
      early_.erase(it);
    }
  }
  while (!closed_heap_.empty() && closed_heap_.top().first + rules_.window + rules_.lateness < wm) {
    std::string rid = closed_heap_.top().second;
    closed_heap_.pop();
    closed_.erase(rid);
  }
  return done;
}

int64_t JoinCore::Flush() {
  std::vector<std::pair<int32_t, Record>> held = std::move(held_);
  held_.clear();
  for (auto& [_, r] : held) Apply(r, false);
  watermark_ = kFlush;
  const int64_t done = Advance();
  if (part_max_.empty()) {
    watermark_ = kNoTime;
  } else {
    int64_t most = part_max_.begin()->second;
    for (auto& [_, v] : part_max_) most = std::max(most, v);
    watermark_ = Time(most) - rules_.lateness;
  }
  return done;
}

nb::dict JoinCore::LowOffsets() {
  std::unordered_map<int32_t, int64_t> low;
  auto see = [&](const Origin& o) {
    if (o.tp < 0) return;
    auto it = low.find(o.tp);
    if (it == low.end() || o.off < it->second) low[o.tp] = o.off;
  };
  for (auto& [_, p] : pending_) see(p.origin);
  for (auto& [_, r] : held_) see(r.origin);
  for (auto& [_, acts] : early_)
    for (const Early& a : acts) see(a.origin);
  nb::dict out;
  for (auto& [tp, off] : low) out[tp_keys_[size_t(tp)]] = off;
  if (StoreSize()) {
    nb::dict stored = nb::borrow<nb::dict>(store_.attr("min_offsets")());
    for (auto [key, off] : stored) {
      if (!out.contains(key) || nb::cast<int64_t>(off) < nb::cast<int64_t>(out[key])) out[key] = off;
    }
  }
  return out;
}

int64_t JoinCore::DropPartitions(nb::iterable tps) {
  std::unordered_set<int32_t> drop;
  nb::list keys;
  for (nb::handle tp : tps) {
    nb::tuple t = nb::borrow<nb::tuple>(tp);
    drop.insert(Tp(t[0], nb::cast<int64_t>(t[1])));
    keys.append(tp);
  }
  int64_t held = 0;
  for (int32_t tp : drop) {
    inputs_.erase(tp);
    idle_.erase(tp);
    part_max_.erase(tp);
    Record r;
    held += HeldPop(tp, &r);
  }
  int64_t gone = 0;
  for (auto it = pending_.begin(); it != pending_.end();) {
    if (it->second.origin.tp >= 0 && drop.count(it->second.origin.tp)) {
      marked_.erase(it->first);
      it = pending_.erase(it);
      ++gone;
    } else {
      ++it;
    }
  }
  for (auto it = early_.begin(); it != early_.end();) {
    auto& acts = it->second;
    acts.erase(std::remove_if(acts.begin(), acts.end(),
                              [&](const Early& a) { return a.origin.tp >= 0 && drop.count(a.origin.tp); }),
               acts.end());
    it = acts.empty() ? early_.erase(it) : std::next(it);
  }
  return gone + held + nb::cast<int64_t>(store_.attr("drop_partitions")(keys));
}

void JoinCore::SetPartitions(nb::iterable tps) {
  inputs_.clear();
  for (nb::handle tp : tps) {
    nb::tuple t = nb::borrow<nb::tuple>(tp);
    inputs_.insert(Tp(t[0], nb::cast<int64_t>(t[1])));
  }
  for (auto it = idle_.begin(); it != idle_.end();) it = inputs_.count(it->first) ? std::next(it) : idle_.erase(it);
}

void JoinCore::PartitionIdle(nb::handle tp) {
  nb::tuple t = nb::borrow<nb::tuple>(tp);
  idle_.emplace(Tp(t[0], nb::cast<int64_t>(t[1])), Monotonic());  // setdefault
}

void JoinCore::PartitionBusy(nb::handle tp) {
  if (idle_.empty()) return;
  nb::tuple t = nb::borrow<nb::tuple>(tp);
  idle_.erase(Tp(t[0], nb::cast<int64_t>(t[1])));
}

nb::object JoinCore::Watermark() const { return PyInt(watermark_); }

void JoinCore::Emit(const std::string& rid, nb::handle payload, float label, float rate, Time label_time) {
  nb::bytes p = nb::borrow<nb::bytes>(payload);
  scratch_.clear();
  AppendExample(&scratch_, reinterpret_cast<const uint8_t*>(p.c_str()), p.size(), label, rate,
                int64_t(uint64_t((unsigned __int128)label_time)));  // mod 2^64, as protobuf writes an int64
  Deliver(rid);
}

void JoinCore::Deliver(const std::string& rid) {
  if (groups_)
    groups_->Add(rid, scratch_);
  else
    emit_(nb::str(rid.data(), rid.size()), nb::bytes(scratch_.data(), scratch_.size()));
}

void JoinCore::GroupExamples(int32_t partitions, int32_t group_size, int64_t limit) {
  if (groups_ && groups_->Waiting()) throw std::logic_error("examples still grouped; take them first");
  groups_ = std::make_unique<ExampleGroups>(partitions, group_size, limit);
}

nb::list JoinCore::TakeGroups(double older_than_s) {
  nb::list out;
  if (!groups_) return out;
  for (ExampleGroups::Group& g : groups_->Take(older_than_s))
    out.append(nb::make_tuple(g.partition, nb::bytes(g.value.data(), g.value.size()), g.count));
  return out;
}

void JoinCore::SetGroupLimit(int64_t limit) {
  if (!groups_) throw std::logic_error("examples are not grouped here (GroupExamples)");
  groups_->SetLimit(limit);
}

void JoinCore::EmitPositive(const std::string& rid, int64_t tf, nb::handle payload, int64_t ta) {
  counts_[kPositives] += 1;
  Close(rid, Time(tf) + rules_.window, 1);
  Emit(rid, payload, 1.0f, 1.0f, Time(ta));
}

void JoinCore::Finalize(const std::string& rid, int64_t tf, nb::handle payload) {
  if (!marked_.empty()) {
    auto m = marked_.find(rid);
    if (m != marked_.end()) {
      const int64_t ta = m->second;
      marked_.erase(m);
      EmitPositive(rid, tf, payload, ta);
      return;
    }
  }
  Close(rid, Time(tf) + rules_.window, 0);
  if (rules_.threshold >= (uint64_t(1) << 32) ||
      Crc32(reinterpret_cast<const uint8_t*>(rid.data()), rid.size(), rules_.seed_crc) < rules_.threshold) {
    counts_[kNegatives] += 1;
    Emit(rid, payload, 0.0f, rules_.negative_rate, Time(tf) + rules_.window);
  } else {
    counts_[kSampledOut] += 1;
  }
}

void JoinCore::Close(const std::string& rid, Time deadline, uint64_t positive) {
  closed_[rid] = {deadline, positive};
  closed_heap_.emplace(deadline, rid);
}

void JoinCore::Spill() {
  const int64_t target = int64_t(double(rules_.max_in_memory) * 0.9);
  nb::list rows;
  int64_t n = 0;
  while (int64_t(pending_.size()) > target && !pending_heap_.empty()) {
    Entry top = pending_heap_.top();
    pending_heap_.pop();
    auto it = pending_.find(top.second);
    if (it == pending_.end() || Time(it->second.t) + rules_.window != top.first) continue;
    const Origin& o = it->second.origin;
    nb::object topic = o.tp < 0 ? nb::object(nb::str("")) : nb::object(tp_keys_[size_t(o.tp)][0]);
    nb::object part = o.tp < 0 ? nb::object(nb::int_(-1)) : nb::object(tp_keys_[size_t(o.tp)][1]);
    nb::str rid(top.second.data(), top.second.size());
    const int64_t off = o.tp < 0 ? int64_t(-1) : o.off;
    if (Multi())
      rows.append(nb::make_tuple(rid, PyInt(top.first), it->second.t, it->second.payload, topic, part, off,
                                 DumpState(it->second.state)));
    else
      rows.append(nb::make_tuple(rid, PyInt(top.first), it->second.t, it->second.payload, topic, part, off));
    pending_.erase(it);
    ++n;
  }
  store_.attr("put_many")(rows);
  counts_[kSpilled] += n;
}

}  // namespace monolith
