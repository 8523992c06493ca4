#include "example_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string_view>

#include "hashing.h"
#include "wire.h"

namespace monolith {

using namespace wire;  // this file's reader (wire.h)

namespace {

int FindName(const std::vector<std::string>& names, std::string_view name) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return int(i);
  return -1;
}

std::vector<int> NextSame(const std::vector<std::string>& names) {
  std::vector<int> next(names.size(), -1);
  for (size_t i = 0; i < names.size(); ++i)
    for (size_t j = i + 1; j < names.size(); ++j)
      if (names[j] == names[i]) {
        next[i] = int(j);
        break;
      }
  return next;
}

float AsFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IdList: name (1), ids (2, fixed64, packed or not). Appends up to max_len
// to every feature of that name, and marks them present.
bool ReadIdList(Reader r, const ExampleLayout& layout, const ExampleRow& row, std::vector<uint8_t>* seen) {
  // The name may follow the ids, so find it first.
  Reader scan = r;
  std::string_view name;
  bool named = false;
  while (!scan.done()) {
    uint32_t field, wire;
    if (!scan.Tag(&field, &wire)) return false;
    if (field == 1 && wire == kLen) {
      Reader s(nullptr, 0);
      if (!scan.Bytes(&s)) return false;
      name = s.view();
      named = true;
    } else if (!scan.Skip(wire)) {
      return false;
    }
  }
  const int first = named ? FindName(layout.sparse_names, name) : -1;
  for (int f = first; f >= 0; f = layout.next_sparse[f]) (*seen)[f] = 1;
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return false;
    if (field == 2 && wire == kLen) {
      Reader packed(nullptr, 0);
      if (!r.Bytes(&packed) || packed.left() % 8) return false;
      size_t n = packed.left() / 8;
      for (int f = first; f >= 0; f = layout.next_sparse[f]) {
        int32_t* len = &row.lengths[f];
        size_t take = std::min<size_t>(n, size_t(layout.max_lens[f] - *len));
        std::memcpy(row.ids[f] + *len, packed.pos(), take * 8);
        *len += int32_t(take);
      }
    } else if (field == 2 && wire == kFixed64) {
      uint64_t v;
      if (!r.Fixed64(&v)) return false;
      for (int f = first; f >= 0; f = layout.next_sparse[f]) {
        int32_t* len = &row.lengths[f];
        if (*len < layout.max_lens[f]) row.ids[f][(*len)++] = v;
      }
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

// FloatList: name (1), values (2, float, packed or not). Exactly one value,
// written to every dense feature of that name; a non-finite one is NaN where
// the layout allows a fill, else kDecodeNonFinite.
DecodeStatus ReadFloatList(Reader r, const ExampleLayout& layout, const ExampleRow& row,
                           std::vector<uint8_t>* seen) {
  Reader scan = r;
  std::string_view name;
  bool named = false;
  while (!scan.done()) {
    uint32_t field, wire;
    if (!scan.Tag(&field, &wire)) return kDecodeMalformed;
    if (field == 1 && wire == kLen) {
      Reader s(nullptr, 0);
      if (!scan.Bytes(&s)) return kDecodeMalformed;
      name = s.view();
      named = true;
    } else if (!scan.Skip(wire)) {
      return kDecodeMalformed;
    }
  }
  const int first = named ? FindName(layout.dense_names, name) : -1;
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return kDecodeMalformed;
    if (field == 2 && (wire == kLen || wire == kFixed32)) {
      Reader vals(nullptr, 0);
      uint32_t one;
      if (wire == kLen) {
        if (!r.Bytes(&vals) || vals.left() % 4) return kDecodeMalformed;
      } else if (!r.Fixed32(&one)) {
        return kDecodeMalformed;
      }
      size_t n = wire == kLen ? vals.left() / 4 : 1;
      if (first < 0 || n == 0) continue;
      uint32_t bits = one;
      if (wire == kLen) std::memcpy(&bits, vals.pos(), 4);
      float v = AsFloat(bits);
      for (int f = first; f >= 0; f = layout.next_dense[f]) {
        if (n != 1 || (*seen)[f]) return kDecodeDense;
        if (!std::isfinite(v)) {
          if (!layout.dense_fill[f]) return kDecodeNonFinite;
          row.dense[f] = std::numeric_limits<float>::quiet_NaN();
        } else {
          row.dense[f] = v;
        }
        (*seen)[f] = 1;
      }
    } else if (!r.Skip(wire)) {
      return kDecodeMalformed;
    }
  }
  return kDecodeOk;
}

DecodeStatus ReadFeatures(Reader r, const ExampleLayout& layout, const ExampleRow& row) {
  std::vector<uint8_t> seen(layout.dense_names.size(), 0);
  std::vector<uint8_t> present(layout.sparse_names.size(), 0);
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return kDecodeMalformed;
    uint64_t v;
    Reader sub(nullptr, 0);
    if (field == 1 && wire == kVarint) {
      if (!r.Varint(&v)) return kDecodeMalformed;
      if (v > kSchemaVersion) return kDecodeVersion;
    } else if (field == 2 && wire == kLen) {
      if (!r.Bytes(&sub)) return kDecodeMalformed;
      if (row.request_hash != nullptr)
        *row.request_hash = sub.left() ? RequestHash(sub.pos(), sub.left()) : 0;
    } else if (field == 3 && wire == kVarint) {
      if (!r.Varint(&v)) return kDecodeMalformed;
      *row.event_time_ms = int64_t(v);
    } else if (field == 4 && wire == kLen) {
      if (!r.Bytes(&sub) || !ReadIdList(sub, layout, row, &present)) return kDecodeMalformed;
    } else if (field == 5 && wire == kLen) {
      if (!r.Bytes(&sub)) return kDecodeMalformed;
      DecodeStatus s = ReadFloatList(sub, layout, row, &seen);
      if (s != kDecodeOk) return s;
    } else if (!r.Skip(wire)) {
      return kDecodeMalformed;
    }
  }
  for (size_t f = 0; f < seen.size(); ++f) {
    if (seen[f]) continue;
    if (!layout.dense_fill[f]) return kDecodeDense;
    row.dense[f] = std::numeric_limits<float>::quiet_NaN();
  }
  for (uint8_t p : present)
    if (!p) return kDecodeSparseMissing;
  return kDecodeOk;
}

}  // namespace

uint64_t RequestHash(const uint8_t* data, size_t size) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (size_t i = 0; i < size; ++i) {
    h ^= data[i];
    h *= 0x100000001B3ULL;
  }
  h = Mix64(h);
  return h ? h : 1;
}

void LinkNames(ExampleLayout* layout) {
  layout->dense_fill.resize(layout->dense_names.size(), 0);
  layout->next_sparse = NextSame(layout->sparse_names);
  layout->next_dense = NextSame(layout->dense_names);
}

namespace {

// One Label message: its head's column (-1: no head of the layout), value,
// rate and whether it is undefined.
bool ReadLabel(Reader r, const ExampleLayout& layout, int* head, float* value, float* rate, bool* undefined) {
  *head = -1;
  *value = 0.f;
  *rate = 0.f;
  *undefined = false;
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return false;
    uint64_t v;
    uint32_t bits;
    Reader sub(nullptr, 0);
    if (field == 1 && wire == kLen) {
      if (!r.Bytes(&sub)) return false;
      const std::string_view name(reinterpret_cast<const char*>(sub.pos()), sub.left());
      for (size_t h = 0; h < layout.head_names.size(); ++h)
        if (layout.head_names[h] == name) *head = int(h);
    } else if (field == 2 && wire == kFixed32) {
      if (!r.Fixed32(&bits)) return false;
      *value = AsFloat(bits);
    } else if (field == 3 && wire == kFixed32) {
      if (!r.Fixed32(&bits)) return false;
      *rate = AsFloat(bits);
    } else if (field == 4 && wire == kVarint) {
      if (!r.Varint(&v)) return false;
      *undefined = v != 0;
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

// A label and its sample rate, checked; the rate's 0 (unset) reads as 1.
DecodeStatus CheckLabel(float label, float* rate, bool binary) {
  if (!std::isfinite(label) || !std::isfinite(*rate)) return kDecodeNonFinite;
  if (*rate == 0.f) *rate = 1.f;  // unset: kept with certainty
  if ((binary && (label < 0.f || label > 1.f)) || *rate < 0.f || *rate > 1.f) return kDecodeLabel;
  return kDecodeOk;
}

}  // namespace

DecodeStatus DecodeExample(const uint8_t* data, size_t size, const ExampleLayout& layout,
                           const ExampleRow& row) {
  if (data == nullptr || size == 0) return kDecodeEmpty;
  // Protobuf never starts with '{' (field 15, wire type 3 is a group).
  size_t i = 0;
  while (i < size && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r')) ++i;
  if (i < size && data[i] == '{') return kDecodeJson;

  const size_t nf = layout.sparse_names.size(), nh = layout.head_names.size();
  for (size_t f = 0; f < nf; ++f) row.lengths[f] = 0;
  float label = 0.f, rate = 0.f;  // version 1's fields
  for (size_t h = 0; h < nh; ++h) {
    row.label[h] = 0.f;
    row.sample_rate[h] = 0.f;
    row.mask[h] = -1.f;  // not seen yet
  }
  *row.event_time_ms = 0;
  *row.label_time_ms = 0;
  if (row.request_hash != nullptr) *row.request_hash = 0;
  bool has_features = false, named = false;
  Reader r(data, size);
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return kDecodeMalformed;
    uint64_t v;
    uint32_t bits;
    Reader sub(nullptr, 0);
    if (field == 1 && wire == kVarint) {
      if (!r.Varint(&v)) return kDecodeMalformed;
      if (v > kSchemaVersion) return kDecodeVersion;
    } else if (field == 2 && wire == kLen) {
      if (!r.Bytes(&sub)) return kDecodeMalformed;
      // A repeated embedded message merges; ours is sent once.
      DecodeStatus s = ReadFeatures(sub, layout, row);
      if (s != kDecodeOk) return s;
      has_features = true;
    } else if (field == 3 && wire == kFixed32) {
      if (!r.Fixed32(&bits)) return kDecodeMalformed;
      label = AsFloat(bits);
    } else if (field == 4 && wire == kFixed32) {
      if (!r.Fixed32(&bits)) return kDecodeMalformed;
      rate = AsFloat(bits);
    } else if (field == 5 && wire == kVarint) {
      if (!r.Varint(&v)) return kDecodeMalformed;
      *row.label_time_ms = int64_t(v);
    } else if (field == 6 && wire == kLen) {
      if (!r.Bytes(&sub)) return kDecodeMalformed;
      named = true;
      int h;
      float value, head_rate;
      bool undefined;
      if (!ReadLabel(sub, layout, &h, &value, &head_rate, &undefined)) return kDecodeMalformed;
      if (h < 0) continue;  // a label no head of this job learns
      row.label[h] = value;
      row.sample_rate[h] = head_rate;
      row.mask[h] = undefined ? 0.f : 1.f;
    } else if (!r.Skip(wire)) {
      return kDecodeMalformed;
    }
  }
  if (!has_features) return kDecodeNoFeatures;
  if (nh == 0) {
    if (named) return kDecodeNamedLabels;
    DecodeStatus s = CheckLabel(label, &rate, true);
    if (s != kDecodeOk) return s;
    *row.label = label;
    *row.sample_rate = rate;
  } else {
    if (!named && nh == 1) {  // a version-1 example: the label of the only head
      row.label[0] = label;
      row.sample_rate[0] = rate;
      row.mask[0] = 1.f;
    }
    for (size_t h = 0; h < nh; ++h) {
      if (row.mask[h] < 0.f && !layout.head_mask_ok[h]) return kDecodeHeadMissing;
      if (row.mask[h] <= 0.f) {  // absent (allowed) or undefined: masked
        row.label[h] = 0.f;
        row.sample_rate[h] = 1.f;
        row.mask[h] = 0.f;
        continue;
      }
      DecodeStatus s = CheckLabel(row.label[h], &row.sample_rate[h], layout.head_binary[h] != 0);
      if (s != kDecodeOk) return s;
    }
  }
  for (size_t f = 0; f < nf; ++f)
    for (int k = row.lengths[f]; k < layout.max_lens[f]; ++k) row.ids[f][k] = layout.pad_key;
  return kDecodeOk;
}

namespace {

ExampleRow RowAt(const ExampleLayout& layout, const BatchArrays& out, ExampleRow* r, int64_t row) {
  const size_t nf = layout.sparse_names.size(), nd = layout.dense_names.size();
  r->ids.resize(nf);
  for (size_t f = 0; f < nf; ++f) r->ids[f] = out.ids[f] + row * layout.max_lens[f];
  r->lengths = out.lengths + row * nf;
  r->dense = out.dense + row * nd;
  const int64_t nh = int64_t(std::max<size_t>(layout.head_names.size(), 1));
  r->label = out.labels + row * nh;
  r->sample_rate = out.rates + row * nh;
  r->mask = out.masks ? out.masks + row * nh : nullptr;
  r->event_time_ms = out.event_ms + row;
  r->label_time_ms = out.label_ms + row;
  r->request_hash = out.request_hash ? out.request_hash + row : nullptr;
  return *r;
}

constexpr uint32_t kBatchField = 16;

}  // namespace

DecodeStatus DecodeValue(const uint8_t* data, size_t size, const ExampleLayout& layout,
                         const BatchArrays& out, int64_t row, int64_t* written) {
  *written = 0;
  if (data == nullptr || size == 0) return kDecodeEmpty;
  // One pass over the top level: is this a batch, and of how many?
  Reader scan(data, size);
  int64_t count = 0;
  bool other = false;
  while (!scan.done()) {
    uint32_t field, wire;
    if (!scan.Tag(&field, &wire)) {
      count = -1;
      break;
    }
    if (field == kBatchField && wire == kLen) ++count;
    else if (!(field == 1 && wire == kVarint)) other = true;
    if (!scan.Skip(wire)) {
      count = -1;
      break;
    }
  }
  ExampleRow r;
  if (count <= 0) {  // a single Example (or not protobuf: DecodeExample says which)
    if (row >= out.rows) return kDecodeNoRoom;
    DecodeStatus s = DecodeExample(data, size, layout, RowAt(layout, out, &r, row));
    if (s == kDecodeOk) *written = 1;
    return s;
  }
  if (other) return kDecodeMalformed;  // Example fields beside batch entries
  if (count > out.rows) return kDecodeTooBig;
  if (count > out.rows - row) return kDecodeNoRoom;
  Reader rd(data, size);
  int64_t k = 0;
  while (!rd.done()) {
    uint32_t field, wire;
    rd.Tag(&field, &wire);  // checked by the scan above
    uint64_t v;
    Reader sub(nullptr, 0);
    if (field == 1) {
      rd.Varint(&v);
      if (v > kSchemaVersion) return kDecodeVersion;
    } else {
      rd.Bytes(&sub);
      DecodeStatus s = DecodeExample(sub.pos(), sub.left(), layout, RowAt(layout, out, &r, row + k));
      if (s != kDecodeOk) return s == kDecodeJson || s == kDecodeEmpty ? kDecodeMalformed : s;
      ++k;
    }
  }
  *written = k;
  return kDecodeOk;
}

}  // namespace monolith
