// A bounded reader of protobuf wire format, shared by the example decoder
// and the stream (features/actions) decoder: every read checks the bound,
// so a truncated or garbled message is a failed read, never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace monolith {
namespace wire {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLen = 2, kFixed32 = 5 };

// A bounded reader over one message's bytes; every read checks the bound.
class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), end_(p + n) {}
  bool done() const { return p_ >= end_; }

  bool Varint(uint64_t* v) {
    uint64_t out = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return false;
      uint8_t b = *p_++;
      out |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) {
        *v = out;
        return true;
      }
    }
    return false;  // more than 10 bytes
  }
  bool Fixed64(uint64_t* v) {
    if (end_ - p_ < 8) return false;
    std::memcpy(v, p_, 8);
    p_ += 8;
    return true;
  }
  bool Fixed32(uint32_t* v) {
    if (end_ - p_ < 4) return false;
    std::memcpy(v, p_, 4);
    p_ += 4;
    return true;
  }
  bool Bytes(Reader* sub) {
    uint64_t n;
    if (!Varint(&n) || n > uint64_t(end_ - p_)) return false;
    *sub = Reader(p_, size_t(n));
    p_ += n;
    return true;
  }
  // Reads a tag; field 0 and group wire types (3, 4) are malformed.
  bool Tag(uint32_t* field, uint32_t* wire) {
    uint64_t t;
    if (!Varint(&t) || (t >> 3) == 0 || (t >> 3) > 0x1fffffff) return false;
    *field = uint32_t(t >> 3);
    *wire = uint32_t(t & 7);
    return *wire == kVarint || *wire == kFixed64 || *wire == kLen || *wire == kFixed32;
  }
  bool Skip(uint32_t wire) {
    uint64_t v;
    uint32_t w;
    Reader sub(nullptr, 0);
    switch (wire) {
      case kVarint: return Varint(&v);
      case kFixed64: return Fixed64(&v);
      case kFixed32: return Fixed32(&w);
      case kLen: return Bytes(&sub);
      default: return false;
    }
  }
  std::string_view view() const {
    return std::string_view(reinterpret_cast<const char*>(p_), size_t(end_ - p_));
  }
  const uint8_t* pos() const { return p_; }
  size_t left() const { return size_t(end_ - p_); }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

}  // namespace wire
}  // namespace monolith
