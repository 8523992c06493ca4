// The process-wide table registry (registry.h).
#include "registry.h"

#include <mutex>
#include <shared_mutex>
#include <unordered_map>

namespace monolith {
namespace {

struct Registry {
  std::shared_mutex mu;
  std::unordered_map<int64_t, std::shared_ptr<EmbeddingTable>> tables;
  int64_t next_id = 1;
};

Registry& Get() {
  static Registry* r = new Registry();  // leaked: FFI calls may run during exit
  return *r;
}

}  // namespace

int64_t RegisterTable(std::shared_ptr<EmbeddingTable> table) {
  Registry& r = Get();
  std::unique_lock<std::shared_mutex> lock(r.mu);
  const int64_t id = r.next_id++;
  r.tables.emplace(id, std::move(table));
  return id;
}

void UnregisterTable(int64_t id) {
  Registry& r = Get();
  std::unique_lock<std::shared_mutex> lock(r.mu);
  r.tables.erase(id);
}

std::shared_ptr<EmbeddingTable> GetTable(int64_t id) {
  Registry& r = Get();
  std::shared_lock<std::shared_mutex> lock(r.mu);
  auto it = r.tables.find(id);
  return it == r.tables.end() ? nullptr : it->second;
}

}  // namespace monolith
