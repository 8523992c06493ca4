#include "stream_codec.h"

#include <cmath>
#include <cstring>

#include "example_codec.h"
#include "wire.h"

namespace monolith {

using namespace wire;

namespace {

constexpr uint32_t kMask32 = 0xffffffffu;

float AsFloat32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int IndexOf(const std::vector<std::string>& names, std::string_view name) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return int(i);
  return -1;
}

// A string field: length-delimited, valid UTF-8.
bool ReadString(Reader* r, uint32_t wire, std::string_view* out) {
  Reader s(nullptr, 0);
  if (wire != kLen || !r->Bytes(&s)) return false;
  *out = s.view();
  return ValidUtf8(*out);
}

// A JSON value (first non-blank byte '{', as messages._is_json reads it).
bool LooksJson(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r' || p[i] == '\v' || p[i] == '\f'))
    ++i;
  return i < n && p[i] == '{';
}

// IdList: name (1), ids (2, fixed64, packed or not).
bool ReadIdList(Reader r, std::string_view* name) {
  *name = std::string_view();
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return false;
    if (field == 1) {
      if (!ReadString(&r, wire, name)) return false;
    } else if (field == 2) {
      if (wire == kLen) {
        Reader packed(nullptr, 0);
        if (!r.Bytes(&packed) || packed.left() % 8) return false;
      } else if (wire == kFixed64) {
        uint64_t v;
        if (!r.Fixed64(&v)) return false;
      } else {
        return false;
      }
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

// FloatList: name (1), values (2, float, packed or not): its name, how
// many values, and the first.
bool ReadFloatList(Reader r, std::string_view* name, size_t* count, float* first) {
  *name = std::string_view();
  *count = 0;
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return false;
    if (field == 1) {
      if (!ReadString(&r, wire, name)) return false;
    } else if (field == 2) {
      if (wire == kLen) {
        Reader packed(nullptr, 0);
        if (!r.Bytes(&packed) || packed.left() % 4) return false;
        if (*count == 0 && packed.left() >= 4) {
          uint32_t bits;
          std::memcpy(&bits, packed.pos(), 4);
          *first = AsFloat32(bits);
        }
        *count += packed.left() / 4;
      } else if (wire == kFixed32) {
        uint32_t bits;
        if (!r.Fixed32(&bits)) return false;
        if (*count == 0) *first = AsFloat32(bits);
        *count += 1;
      } else {
        return false;
      }
    } else if (!r.Skip(wire)) {
      return false;
    }
  }
  return true;
}

void AppendVarint(std::string* out, uint64_t v) {
  char buf[10];
  int n = 0;
  do {
    uint8_t b = v & 0x7f;
    v >>= 7;
    buf[n++] = char(v ? (b | 0x80) : b);
  } while (v);
  out->append(buf, size_t(n));
}

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >>= 7) ++n;
  return n;
}

void AppendFloat(std::string* out, float f) {
  char buf[4];
  std::memcpy(buf, &f, 4);
  out->append(buf, 4);
}

}  // namespace

bool ValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    uint8_t c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    size_t n;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) {
      n = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 4;
      cp = c & 0x07;
    } else {
      return false;  // a continuation byte first, an overlong 2-byte lead, or beyond U+10FFFF
    }
    if (size_t(end - p) < n) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((p[k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[k] & 0x3f);
    }
    if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    p += n;
  }
  return true;
}

bool ReadFeatureRecord(const uint8_t* data, size_t size, const FeatureRules& rules, FeaturesView* out) {
  if (data == nullptr || size == 0 || LooksJson(data, size)) return false;
  // Which required features were seen; a record rarely needs more than 64.
  std::vector<uint8_t> have_sparse(rules.need_sparse.size(), 0), have_dense(rules.need_dense.size(), 0);
  uint32_t version = 0;
  *out = FeaturesView();
  Reader r(data, size);
  while (!r.done()) {
    uint32_t field, wire;
    if (!r.Tag(&field, &wire)) return false;
    uint64_t v;
    Reader sub(nullptr, 0);
    switch (field) {
      case 1:
        if (wire != kVarint || !r.Varint(&v)) return false;
        version = uint32_t(v & kMask32);
        break;
      case 2:
        if (!ReadString(&r, wire, &out->request_id)) return false;
        break;
      case 3:
        if (wire != kVarint || !r.Varint(&v)) return false;
        out->event_time_ms = int64_t(v);
        break;
      case 4: {
        std::string_view name;
        if (wire != kLen || !r.Bytes(&sub) || !ReadIdList(sub, &name)) return false;
        int k = IndexOf(rules.need_sparse, name);
        if (k >= 0) have_sparse[size_t(k)] = 1;
        break;
      }
      case 5: {
        std::string_view name;
        size_t count;
        float first = 0.0f;
        if (wire != kLen || !r.Bytes(&sub) || !ReadFloatList(sub, &name, &count, &first)) return false;
        if (count != 1 || (!std::isfinite(first) && IndexOf(rules.filled, name) < 0)) return false;
        int k = IndexOf(rules.need_dense, name);
        if (k >= 0) have_dense[size_t(k)] = 1;
        break;
      }
      default:
        if (!r.Skip(wire)) return false;
    }
  }
  if (version > kSchemaVersion || out->request_id.empty()) return false;
  for (uint8_t h : have_sparse)
    if (!h) return false;
  for (uint8_t h : have_dense)
    if (!h) return false;
  return true;
}

bool ReadAction(const uint8_t* data, size_t size, ActionView* out) {
  if (data == nullptr || size == 0 || LooksJson(data, size)) return false;
  uint32_t version = 0;
  *out = ActionView();
  Reader r(data, size);
  while (!r.done()) {
    uint32_t field, wire, bits;
    uint64_t v;
    if (!r.Tag(&field, &wire)) return false;
    switch (field) {
      case 1:
        if (wire != kVarint || !r.Varint(&v)) return false;
        version = uint32_t(v & kMask32);
        break;
      case 2:
        if (!ReadString(&r, wire, &out->request_id)) return false;
        break;
      case 3:
        if (wire != kVarint || !r.Varint(&v)) return false;
        out->event_time_ms = int64_t(v);
        break;
      case 4:
        if (!ReadString(&r, wire, &out->type)) return false;
        break;
      case 5:
        if (wire != kFixed32 || !r.Fixed32(&bits)) return false;
        out->value = AsFloat32(bits);
        break;
      default:
        if (!r.Skip(wire)) return false;
    }
  }
  return version <= kSchemaVersion && !out->request_id.empty() && !out->type.empty() &&
         std::isfinite(out->value);
}

size_t ExampleSize(size_t features_size, int64_t label_time_ms) {
  // version (2) + tag, length, record + label (5) + sample rate (5) + tag, label time
  return 2 + 1 + VarintSize(features_size) + features_size + 5 + 5 + 1 + VarintSize(uint64_t(label_time_ms));
}

void AppendExample(std::string* out, const uint8_t* features, size_t size, float label, float sample_rate,
                   int64_t label_time_ms) {
  out->append("\x08\x01\x12", 3);
  AppendVarint(out, size);
  out->append(reinterpret_cast<const char*>(features), size);
  out->push_back('\x1d');
  AppendFloat(out, label);
  out->push_back('\x25');
  AppendFloat(out, sample_rate);
  out->push_back('\x28');
  AppendVarint(out, uint64_t(label_time_ms));
}

void AppendBatchHeader(std::string* out) { out->append("\x08\x01", 2); }

void AppendBatchEntryHeader(std::string* out, size_t example_size) {
  out->append("\x82\x01", 2);
  AppendVarint(out, example_size);
}

size_t BatchEntrySize(size_t example_size) { return 2 + VarintSize(example_size) + example_size; }

}  // namespace monolith
