"""64-bit keys with JAX in its default 32-bit mode.

Keys are 64-bit ids, every value allowed. JAX (without x64) has no 64-bit
integers, so inside programs a key travels as two uint32 words:

    ids (numpy uint64)      [k0, k1, k2]                shape (n,)
    Keys.words (uint32)     [[lo0, hi0],                shape (n, 2)
                             [lo1, hi1],
                             [lo2, hi2]]

`Keys` is a pytree, so it passes through `jax.jit` like any array; its
leading dims are the ids' shape. numpy int64 ids map to the same key as
their uint64 bit pattern (-1 is 2^64-1).

Strings become keys through `hash_strings`: the first 8 bytes of BLAKE2b
(digest_size=8) of the UTF-8 text, read little-endian. It is stable across
processes, machines and versions (unlike Python's `hash`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np


def as_key_array(ids, what: str = "ids") -> np.ndarray:
    """Host ids (any integer numpy/list data) as a uint64 numpy array, same shape."""
    if isinstance(ids, Keys):
        return ids.to_numpy()
    if isinstance(ids, jax.Array):
        ids = np.asarray(ids)
    arr = np.asarray(ids)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype.kind == "i":
        return arr.astype(np.int64, copy=False).view(np.uint64)
    if arr.dtype.kind == "u":
        return arr.astype(np.uint64)
    if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64
        return arr.astype(np.uint64)
    raise TypeError(
        f"{what} must be integers (uint64/int64 or narrower), got dtype {arr.dtype}; "
        "hash string ids with monolith_jax.sparse.hash_strings"
    )


@jax.tree_util.register_pytree_node_class
class Keys:
    """A batch of 64-bit keys as uint32 words, shape (..., 2)."""

    __slots__ = ("words",)

    def __init__(self, words):
        self.words = words

    @classmethod
    def from_ids(cls, ids) -> "Keys":
        """From host integer ids of any shape (numpy, list)."""
        if isinstance(ids, Keys):
            return ids
        keys = np.ascontiguousarray(as_key_array(ids))
        return cls(keys.view(np.uint32).reshape(keys.shape + (2,)))

    @property
    def shape(self) -> tuple:
        return tuple(self.words.shape[:-1])

    def to_numpy(self) -> np.ndarray:
        words = np.ascontiguousarray(np.asarray(self.words, dtype=np.uint32))
        return words.view(np.uint64).reshape(words.shape[:-1])

    def reshape(self, *shape) -> "Keys":
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        return Keys(self.words.reshape(tuple(shape) + (2,)))

    def __getitem__(self, index) -> "Keys":
        return Keys(self.words[index])

    def __repr__(self) -> str:
        return f"Keys(shape={self.shape})"

    def tree_flatten(self):
        return (self.words,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def key_words(ids) -> jax.Array | np.ndarray:
    """uint32 words (..., 2) of ids: host integers, `Keys`, or 32-bit JAX ids.

    32-bit JAX arrays are widened in the program: int32 sign-extends (so -1 is
    the key 2^64-1, as numpy's int64 -1), uint32 zero-extends.
    """
    if isinstance(ids, Keys):
        words = ids.words
        if words.dtype != jnp.uint32 or words.ndim < 1 or words.shape[-1] != 2:
            raise TypeError(f"Keys.words must be uint32 of shape (..., 2), got {words.dtype}{tuple(words.shape)}")
        return words
    if isinstance(ids, jax.Array) or isinstance(ids, jax.core.Tracer):
        if ids.dtype == jnp.int32:
            lo = jax.lax.bitcast_convert_type(ids, jnp.uint32)
            hi = jnp.where(ids < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))
            return jnp.stack([lo, hi], axis=-1)
        if ids.dtype == jnp.uint32:
            return jnp.stack([ids, jnp.zeros_like(ids)], axis=-1)
        raise TypeError(
            f"JAX ids must be int32 or uint32 (64-bit ids: pass numpy arrays or "
            f"monolith_jax.sparse.Keys), got {ids.dtype}"
        )
    return Keys.from_ids(ids).words


def hash_strings(strings: Iterable[str | bytes]) -> np.ndarray:
    """Stable 64-bit keys of strings: BLAKE2b-64 of the UTF-8 bytes, little-endian."""
    out = []
    for s in strings:
        data = s.encode("utf-8") if isinstance(s, str) else bytes(s)
        out.append(hashlib.blake2b(data, digest_size=8).digest())
    return np.frombuffer(b"".join(out), dtype="<u8").astype(np.uint64)
