// The XLA FFI handler symbols (defined in ffi_handlers.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

namespace monolith {

extern "C" XLA_FFI_Error* MonolithLookup(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* MonolithApply(XLA_FFI_CallFrame* call_frame);

}  // namespace monolith
