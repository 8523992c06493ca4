// Decoding joined training examples (monolith_jax.v1.Example, protobuf wire
// format) straight into a batch's arrays, without building Python objects.
//
// The Python protobuf classes remain the reference for the schema
// (monolith_jax/online/proto/messages.proto); this decoder reads the same
// bytes ~50x faster, which is what lets a trainer fed from Kafka keep pace
// with one fed from files. It accepts what any conforming writer may send:
// fields in any order, unknown fields (skipped), packed or unpacked repeated
// fields, a feature's ids split over several IdLists of the same name
// (appended). It never reads past the buffer it was given: a truncated or
// garbled message gets a status, not a crash.
//
// Every sparse feature of the layout must be present in the record (an
// IdList of its name, possibly with no ids); an absent one is
// kDecodeSparseMissing, not zero ids. A dense feature whose layout allows a
// fill may be absent or non-finite: it is written as NaN for the caller to
// fill (and count); any other dense feature must hold one finite value.
// Several features may read one name: each gets the ids (or value).
// Ids are written as they came (raw); the caller maps them to keys.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace monolith {

enum DecodeStatus : int32_t {
  kDecodeOk = 0,
  kDecodeMalformed = 1,      // not protobuf wire format, or truncated
  kDecodeVersion = 2,        // a schema version this build does not know
  kDecodeNoFeatures = 3,     // no FeatureRecord inside the Example
  kDecodeDense = 4,          // a dense feature missing or of the wrong length
  kDecodeNonFinite = 5,      // label, sample rate or a dense value not finite
  kDecodeLabel = 6,          // label outside [0, 1] or sample rate outside (0, 1]
  kDecodeJson = 7,           // a JSON message: the caller converts it
  kDecodeEmpty = 8,          // an empty or null message
  kDecodeNoRoom = 9,         // (not an error) the value's examples do not fit the rows left
  kDecodeTooBig = 10,        // an ExampleBatch with more examples than a whole batch holds
  kDecodeSparseMissing = 11, // a sparse feature of the layout has no IdList in the record
  kDecodeNamedLabels = 12,   // named labels (version 2) for a layout of one unnamed head
  kDecodeHeadMissing = 13,   // no label for a head whose layout does not allow a mask
};

struct ExampleLayout {
  std::vector<std::string> sparse_names;  // feature names, in batch order
  std::vector<int> max_lens;              // ids kept per example, per feature
  std::vector<std::string> dense_names;   // one float each
  std::vector<uint8_t> dense_fill;        // per dense feature: 1 = missing/non-finite read as NaN
  uint64_t pad_key = 0;
  // Heads (version 2): empty for a job of one unnamed head, which reads the
  // Example's label and sample_rate. Otherwise each head reads the Label of
  // its name into its column: absent, the example is kDecodeHeadMissing
  // unless head_mask_ok (then masked); `undefined` masks it; a binary head's
  // value must lie in [0, 1]. A layout of one head also reads a version-1
  // example's label as that head's.
  std::vector<std::string> head_names;
  std::vector<uint8_t> head_binary, head_mask_ok;
  // Filled by LinkNames: the next feature of the same name, or -1.
  std::vector<int> next_sparse, next_dense;
};

// Completes a layout (dense_fill sized, next_sparse/next_dense linked);
// call once after setting the names.
void LinkNames(ExampleLayout* layout);

// Where one example's fields go. ids[f] points at max_lens[f] keys.
struct ExampleRow {
  std::vector<uint64_t*> ids;
  int32_t* lengths;      // one per sparse feature
  float* dense;          // one per dense feature
  float* label;          // one per head (one for a layout without heads)
  float* sample_rate;    // likewise
  float* mask;           // one per head; null for a layout without heads
  int64_t* event_time_ms;
  int64_t* label_time_ms;
  uint64_t* request_hash;  // RequestHash of the features' request_id (0: none); may be null
};

// A request id's 64-bit hash: FNV-1a over its bytes, then Mix64; never 0
// (0 stands for "no request id"). monolith_jax.stream.messages.request_hash
// computes the same.
uint64_t RequestHash(const uint8_t* data, size_t size);

constexpr uint32_t kSchemaVersion = 2;

// A batch's arrays: row r of feature f starts at ids[f] + r * max_lens[f].
struct BatchArrays {
  std::vector<uint64_t*> ids;
  int32_t* lengths;
  float* dense;
  float* labels;  // rows x heads (rows for a layout without heads)
  float* rates;   // likewise
  float* masks;   // rows x heads; null for a layout without heads
  int64_t* event_ms;
  int64_t* label_ms;
  uint64_t* request_hash;  // may be null
  int64_t rows;
};

// Decodes one Kafka value of the examples topic, an Example or an
// ExampleBatch (told apart by field 16), into rows [row, row + *written).
// All or nothing: if any example of a batch is unusable the value's status
// is that example's and *written is 0; kDecodeNoRoom if it does not fit in
// the rows left (nothing written).
DecodeStatus DecodeValue(const uint8_t* data, size_t size, const ExampleLayout& layout,
                         const BatchArrays& out, int64_t row, int64_t* written);

// Decodes one Example. On kDecodeOk the row is written in full (ids past a
// feature's length are pad_key); on any other status its contents are
// unspecified and the caller must not use it.
DecodeStatus DecodeExample(const uint8_t* data, size_t size, const ExampleLayout& layout,
                           const ExampleRow& row);

}  // namespace monolith
