"""Loads the C++ engine on first use and registers its XLA FFI targets once.

Importing monolith_jax never loads native code; the first table does.
"""

from __future__ import annotations

import threading

import jax

_lock = threading.Lock()
_engine = None

LOOKUP_TARGET = "monolith_lookup"
APPLY_TARGET = "monolith_apply"


def engine():
    """The `monolith_jax._engine` extension module, loaded and registered."""
    global _engine
    if _engine is not None:
        return _engine
    with _lock:
        if _engine is None:
            try:
                from monolith_jax import _engine as module
            except ImportError as err:
                raise ImportError(
                    "monolith_jax's C++ table engine is not built or does not load "
                    f"({err}); install the package with `pip install -e .` from the "
                    "project folder, which compiles ffi/"
                ) from err
            for name, capsule in module.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _engine = module
    return _engine
