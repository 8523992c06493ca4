// The joiner's side of the stream formats (monolith_jax/stream/messages.py):
// reading features and actions messages, and writing Examples and
// ExampleBatches around a features record's bytes, without Python objects.
//
// The Python protobuf parser (`parse_features`, `parse_action`) stays the
// reference and the judge: these readers accept a value only when it is a
// binary message that the reference accepts with the same fields, and
// refuse (return false for) everything else: JSON, unusable values, and
// what is legal but beyond this reader (an unknown field of the group wire
// type, a known field sent with another wire type). The caller hands a
// refused value to the reference, which either reads it or names why not.
// They never read past the buffer they were given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace monolith {

// What `parse_features` asks of a record given the job's features.
struct FeatureRules {
  std::vector<std::string> filled;       // dense names whose value may be non-finite (a fill is declared)
  std::vector<std::string> need_sparse;  // every record must hold an IdList of each (possibly empty)
  std::vector<std::string> need_dense;   // every record must hold a FloatList of each (no fill declared)
};

struct FeaturesView {
  std::string_view request_id;  // points into the value
  int64_t event_time_ms = 0;
};

struct ActionView {
  std::string_view request_id;  // points into the value
  int64_t event_time_ms = 0;
  std::string_view type;        // points into the value
  float value = 0.0f;
};

// Whether `data` is a binary FeatureRecord that `parse_features` accepts
// under `rules`; if so, its request id and event time.
bool ReadFeatureRecord(const uint8_t* data, size_t size, const FeatureRules& rules, FeaturesView* out);

// Whether `data` is a binary Action that `parse_action` accepts; if so, its fields.
bool ReadAction(const uint8_t* data, size_t size, ActionView* out);

// Whether `data` is valid UTF-8 as protobuf requires of a string field
// (no overlong forms, no surrogates, nothing above U+10FFFF).
bool ValidUtf8(std::string_view s);

// The size of the Example `AppendExample` writes around a record of
// `features_size` bytes with this label time.
size_t ExampleSize(size_t features_size, int64_t label_time_ms);

// Appends an Example (version 1, the record byte for byte, label, sample
// rate, label time): equal to protobuf's serialization of the same fields.
void AppendExample(std::string* out, const uint8_t* features, size_t size, float label, float sample_rate,
                   int64_t label_time_ms);

// An ExampleBatch's header (its version), and one entry (field 16, the
// Example's length, then its bytes) of an Example of `example_size` bytes.
constexpr size_t kBatchHeaderSize = 2;
void AppendBatchHeader(std::string* out);
void AppendBatchEntryHeader(std::string* out, size_t example_size);
size_t BatchEntrySize(size_t example_size);

}  // namespace monolith
