// Tables by id, so compiled XLA programs name a table by a number, not a
// pointer: a program run after its table was closed gets an error, not a crash.
#pragma once

#include <cstdint>
#include <memory>

#include "table.h"

namespace monolith {

// Registers `table` and returns its id (never reused in a process).
int64_t RegisterTable(std::shared_ptr<EmbeddingTable> table);
// Drops the registry's reference; the table lives on while callers hold it.
void UnregisterTable(int64_t id);
// The table, or nullptr when `id` is unknown or closed.
std::shared_ptr<EmbeddingTable> GetTable(int64_t id);

}  // namespace monolith
