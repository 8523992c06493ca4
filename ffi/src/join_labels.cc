// The multi-label join's rules in C++ (JoinCore with JoinRules::labels):
// monolith_jax/stream/join_labels.py's, which its docstring states. Each
// label's state, its decision at the window's end (sampling per label by
// crc32 of (seed, request id, label name)), the counts, and the version-2
// Example with one Label per rule, byte for byte as messages.encode_example.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "join_state.h"

namespace monolith {

int JoinCore::TakeLabels(LabelState& s, int64_t tf, int64_t ta, std::string_view type, double value) const {
  bool used = false, repeat = false, late = false;
  for (size_t i = 0; i < rules_.labels.size(); ++i) {
    const LabelRuleC& r = rules_.labels[i];
    if (std::find(r.types.begin(), r.types.end(), type) == r.types.end()) continue;
    if (r.binary && !(value >= r.min_value)) continue;
    if (Time(ta) - tf > r.window) {
      late = true;
      continue;
    }
    LState& x = s[i];
    (x.set ? repeat : used) = true;
    if (!x.set || ta < x.t) {
      x.set = true;
      x.t = ta;
      x.value = value;
    }
  }
  return used ? 0 : repeat ? 1 : late ? 2 : 3;
}

void JoinCore::CountOutcome(int outcome) {
  if (outcome == 1) counts_[kRepeats] += 1;
  if (outcome == 2) counts_[kLate] += 1;
  if (outcome == 3) counts_[kOther] += 1;
}

bool JoinCore::Complete(const LabelState& s) const {
  if (!all_binary_) return false;
  for (const LState& x : s)
    if (!x.set) return false;
  return true;
}

uint64_t JoinCore::PositiveMask(const LabelState& s) const {
  uint64_t mask = 0;
  for (size_t i = 0; i < s.size(); ++i)
    if (rules_.labels[i].binary && s[i].set) mask |= uint64_t(1) << i;
  return mask;
}

namespace {
void PutVarint(std::string* out, uint64_t v) {
  do {
    uint8_t b = v & 0x7f;
    v >>= 7;
    out->push_back(char(v ? (b | 0x80) : b));
  } while (v);
}
size_t VarintLen(uint64_t v) {
  size_t n = 1;
  while (v >>= 7) ++n;
  return n;
}
void PutFloat(std::string* out, float f) {
  char buf[4];
  std::memcpy(buf, &f, 4);
  out->append(buf, 4);
}
size_t LabelBody(size_t name, bool undefined) { return 1 + VarintLen(name) + name + 5 + 5 + (undefined ? 2 : 0); }
}  // namespace

int64_t JoinCore::LabelsOverhead() const {
  int64_t n = 0;
  for (const LabelRuleC& r : rules_.labels) {
    const size_t body = LabelBody(r.name.size(), true);
    n += int64_t(1 + VarintLen(body) + body);
  }
  return n;
}

void JoinCore::EmitLabels(const std::string& rid, int64_t tf, nb::handle payload, const LabelState& s,
                          Time label_time) {
  Close(rid, Time(tf) + rules_.window, PositiveMask(s));
  const size_t n = rules_.labels.size();
  std::vector<float> value(n, 0.0f), rate(n, 1.0f);
  std::vector<char> undefined(n, 0), one(n, 0);
  bool any_one = false, all_undefined = true;
  for (int32_t i : rules_.order) {
    const LabelRuleC& r = rules_.labels[size_t(i)];
    const LState& x = s[size_t(i)];
    const size_t b = label_base_[size_t(i)];
    if (r.given >= 0 && !one[size_t(r.given)]) {
      undefined[i] = 1;
      label_counts_[b + (r.binary ? 3 : 2)] += 1;
    } else if (r.binary) {
      if (x.set) {
        value[i] = 1.0f;
        one[i] = 1;
        any_one = true;
        label_counts_[b] += 1;
      } else {
        uint32_t h = Crc32(reinterpret_cast<const uint8_t*>(rid.data()), rid.size(), rules_.seed_crc);
        h = Crc32(reinterpret_cast<const uint8_t*>("\0"), 1, h);
        h = Crc32(reinterpret_cast<const uint8_t*>(r.name.data()), r.name.size(), h);
        if (r.threshold >= (uint64_t(1) << 32) || h < r.threshold) {
          rate[i] = r.negative_rate;
          label_counts_[b + 1] += 1;
        } else {
          undefined[i] = 1;
          label_counts_[b + 2] += 1;
          label_counts_[b + 3] += 1;
        }
      }
    } else if (x.set) {
      value[i] = float(x.value);
      label_counts_[b] += 1;
    } else if (r.has_default) {
      value[i] = float(r.default_value);
      label_counts_[b + 1] += 1;
    } else {
      undefined[i] = 1;
      label_counts_[b + 2] += 1;
    }
    all_undefined = all_undefined && undefined[i];
  }
  if (all_undefined) {
    counts_[kSampledOut] += 1;
    return;
  }
  counts_[any_one ? kPositives : kNegatives] += 1;
  nb::bytes p = nb::borrow<nb::bytes>(payload);
  scratch_.clear();
  scratch_.append("\x08\x02\x12", 3);
  PutVarint(&scratch_, p.size());
  scratch_.append(p.c_str(), p.size());
  scratch_.push_back('\x28');
  PutVarint(&scratch_, uint64_t((unsigned __int128)label_time));  // mod 2^64, as protobuf writes an int64
  for (size_t i = 0; i < n; ++i) {
    const std::string& name = rules_.labels[i].name;
    scratch_.push_back('\x32');
    PutVarint(&scratch_, LabelBody(name.size(), undefined[i]));
    scratch_.push_back('\x0a');
    PutVarint(&scratch_, name.size());
    scratch_.append(name);
    scratch_.push_back('\x15');
    PutFloat(&scratch_, value[i]);
    scratch_.push_back('\x1d');
    PutFloat(&scratch_, rate[i]);
    if (undefined[i]) scratch_.append("\x20\x01", 2);
  }
  Deliver(rid);
}

nb::bytes JoinCore::DumpState(const LabelState& s) const {
  std::string out;
  for (const LState& x : s) {
    out.push_back(char(x.set));
    out.append(reinterpret_cast<const char*>(&x.t), 8);
    out.append(reinterpret_cast<const char*>(&x.value), 8);
  }
  return nb::bytes(out.data(), out.size());
}

JoinCore::LabelState JoinCore::LoadState(nb::handle text) const {
  LabelState s(rules_.labels.size());
  if (!nb::isinstance<nb::bytes>(text)) throw std::runtime_error("spilled label state is not bytes");
  nb::bytes b = nb::borrow<nb::bytes>(text);
  const char* d = b.c_str();
  if (b.size() != s.size() * 17) throw std::runtime_error("spilled label state of another size");
  for (size_t i = 0; i < s.size(); ++i, d += 17) {
    s[i].set = d[0] != 0;
    std::memcpy(&s[i].t, d + 1, 8);
    std::memcpy(&s[i].value, d + 9, 8);
  }
  return s;
}

}  // namespace monolith
