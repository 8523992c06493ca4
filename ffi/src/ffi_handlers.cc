// XLA FFI handlers (CPU): table lookup and fused apply inside jitted programs.
//
// Keys travel as uint32 words (..., 2) = (low, high) of each 64-bit key, so
// programs need no jax_enable_x64. The table is named by its registry id, an
// int64 attribute baked into the program. Both calls are side-effecting; an
// order-only operand (`after`) and the apply's result let a program chain
// lookup -> apply -> lookup explicitly, since XLA does not order side
// effects by itself.
#include <string>

#include "ffi_handlers.h"
#include "registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace monolith {
namespace {

ffi::Error KeysOf(ffi::Buffer<ffi::U32>& ids, int64_t* n) {
  auto dims = ids.dimensions();
  if (dims.size() == 0 || dims.back() != 2) {
    return ffi::Error::InvalidArgument("ids must be uint32 words of shape (..., 2)");
  }
  *n = static_cast<int64_t>(ids.element_count() / 2);
  return ffi::Error::Success();
}

ffi::Error TableFor(int64_t table_id, std::shared_ptr<EmbeddingTable>* table) {
  *table = GetTable(table_id);
  if (!*table) {
    return ffi::Error::InvalidArgument("embedding table " + std::to_string(table_id) +
                                       " is closed; keep the table alive while programs use it");
  }
  return ffi::Error::Success();
}

ffi::Error LookupImpl(ffi::Buffer<ffi::U32> ids, ffi::AnyBuffer /*after*/,
                      ffi::ResultBuffer<ffi::F32> out, int64_t table_id) {
  std::shared_ptr<EmbeddingTable> table;
  if (auto e = TableFor(table_id, &table); e.failure()) return e;
  int64_t n;
  if (auto e = KeysOf(ids, &n); e.failure()) return e;
  if (static_cast<int64_t>(out->element_count()) != n * table->dim()) {
    return ffi::Error::InvalidArgument("lookup output must hold (n, dim) floats");
  }
  try {
    table->Lookup(reinterpret_cast<const uint64_t*>(ids.typed_data()), n, out->typed_data());
  } catch (const std::exception& ex) {
    return ffi::Error::Internal(std::string("embedding lookup failed: ") + ex.what());
  }
  return ffi::Error::Success();
}

ffi::Error ApplyImpl(ffi::Buffer<ffi::U32> ids, ffi::Buffer<ffi::F32> grads,
                     ffi::Buffer<ffi::F32> lr, ffi::Buffer<ffi::S32> time,
                     ffi::AnyBuffer /*after*/, ffi::ResultBuffer<ffi::S32> counts, int64_t table_id) {
  std::shared_ptr<EmbeddingTable> table;
  if (auto e = TableFor(table_id, &table); e.failure()) return e;
  int64_t n;
  if (auto e = KeysOf(ids, &n); e.failure()) return e;
  if (static_cast<int64_t>(grads.element_count()) != n * table->dim()) {
    return ffi::Error::InvalidArgument("gradients must be (n, dim) floats");
  }
  if (lr.element_count() != 1 || time.element_count() != 1 || counts->element_count() != 2) {
    return ffi::Error::InvalidArgument("lr and time must be scalars");
  }
  try {
    auto [updated, skipped] =
        table->Apply(reinterpret_cast<const uint64_t*>(ids.typed_data()), grads.typed_data(), n,
                     lr.typed_data()[0], static_cast<uint32_t>(time.typed_data()[0]));
    counts->typed_data()[0] = static_cast<int32_t>(updated);
    counts->typed_data()[1] = static_cast<int32_t>(skipped);
  } catch (const std::exception& ex) {
    return ffi::Error::Internal(std::string("embedding apply failed: ") + ex.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonolithLookup, LookupImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // ids    // (..., 2)
                                  .Arg<ffi::AnyBuffer>()         // after  // order only
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rows   // (..., dim)
                                  .Attr<int64_t>("table_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonolithApply, ApplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // ids    // (..., 2)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // grads  // (..., dim)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr     // ()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // time   // ()
                                  .Arg<ffi::AnyBuffer>()         // after  // order only
                                  .Ret<ffi::Buffer<ffi::S32>>()  // counts // (2): updated, skipped
                                  .Attr<int64_t>("table_id"));

}  // namespace monolith
