#include "example_groups.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "join_state.h"
#include "stream_codec.h"

namespace monolith {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

ExampleGroups::ExampleGroups(int32_t partitions, int32_t group_size, int64_t limit)
    : partitions_(partitions), group_size_(group_size), limit_(limit), open_(size_t(partitions > 0 ? partitions : 0)) {
  if (partitions < 1) throw std::invalid_argument("example groups need at least one partition");
  if (group_size < 1) throw std::invalid_argument("example groups hold at least one example");
}

void ExampleGroups::Close(int32_t p) {
  Open& g = open_[size_t(p)];
  ready_.push_back(Group{p, std::move(g.value), g.count});
  g.value = std::string();
  g.count = 0;
}

void ExampleGroups::Add(std::string_view rid, std::string_view example) {
  const int32_t p =
      int32_t(Crc32(reinterpret_cast<const uint8_t*>(rid.data()), rid.size(), 0) % uint32_t(partitions_));
  ++waiting_;
  if (group_size_ == 1) {  // plain Examples
    ready_.push_back(Group{p, std::string(example), 1});
    return;
  }
  const int64_t size = int64_t(BatchEntrySize(example.size()));
  Open& g = open_[size_t(p)];
  if (g.count && int64_t(g.value.size()) + size > limit_) Close(p);
  if (!g.count) {
    g.value.reserve(size_t(std::min<int64_t>(limit_, int64_t(kBatchHeaderSize) + size * group_size_)));
    AppendBatchHeader(&g.value);
    g.since = Now();
  }
  AppendBatchEntryHeader(&g.value, example.size());
  g.value.append(example.data(), example.size());
  ++g.count;
  if (g.count >= group_size_ || int64_t(g.value.size()) >= limit_) Close(p);
}

std::vector<ExampleGroups::Group> ExampleGroups::Take(double older_than_s) {
  const double now = Now();
  for (int32_t p = 0; p < partitions_; ++p) {
    const Open& g = open_[size_t(p)];
    if (g.count && (older_than_s < 0 || now - g.since >= older_than_s)) Close(p);
  }
  std::vector<Group> out = std::move(ready_);
  ready_.clear();
  for (const Group& g : out) waiting_ -= g.count;
  return out;
}

}  // namespace monolith
