// The joiner's examples grouped per partition of the examples topic into
// ExampleBatch values, as monolith_jax/stream/joiner.py's ExampleGrouper
// groups them (its `add`, rule for rule): the partition is crc32(request
// id) mod the topic's partitions; a group is sent when it holds
// `group_size` examples or reaches `limit` bytes, and an example that would
// take it past `limit` starts the next one. Built here, a group costs one
// Python object when it leaves, instead of a callback per example.
//
// Delivery stays Python's (the grouper produces the values, resends a
// refused group in halves, dead-letters what cannot be delivered).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace monolith {

class ExampleGroups {
 public:
  struct Group {
    int32_t partition;
    std::string value;  // an ExampleBatch, or with group_size 1 the Example itself
    int32_t count;
  };

  ExampleGroups(int32_t partitions, int32_t group_size, int64_t limit);
  // A lower limit (the broker refused a group as too large) applies to groups started from now on.
  void SetLimit(int64_t limit) { limit_ = limit; }
  void Add(std::string_view rid, std::string_view example);
  // The groups that are full, then (in partition order) the open ones at
  // least `older_than_s` old (monotonic seconds); a negative age: every one.
  std::vector<Group> Take(double older_than_s);
  int64_t Waiting() const { return waiting_; }

 private:
  struct Open {
    std::string value;
    int32_t count = 0;
    double since = 0.0;
  };
  void Close(int32_t p);

  int32_t partitions_, group_size_;
  int64_t limit_;
  std::vector<Open> open_;
  std::vector<Group> ready_;
  int64_t waiting_ = 0;  // examples in groups not yet taken
};

}  // namespace monolith
