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

Per-feature key spaces
----------------------
Several features may read one table; their ids must not meet there by
accident (`user_id=5` and `item_id=5` are different things). Every sparse
feature therefore has an id space (`SparseFeature.id_space`, by default the
feature's own name), and a record's id becomes a table key through a keyed
bijection of (space, id):

    key = fmix64(id XOR salt(space))
    salt(space) = hash_strings(["<monolith_jax:id_space>" + space])
    fmix64(x):  x ^= x >> 33; x *= 0xff51afd7ed558ccd;
                x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53; x ^= x >> 33

(all arithmetic mod 2^64; fmix64 is MurmurHash3's 64-bit finalizer, and
each of its steps is invertible, so it is a bijection on 64 bits: see
`fmix64_inverse`). `space_keys(ids, space)` applies it to an array; it is
the one mapping every path uses (files, the stream decoder's output,
predictor requests; `SparseFeature.keys` calls it with the feature's
space), and only for real ids: padding stays `PAD_KEY`.

What it guarantees, and what it costs:

- Within a space it is a bijection: two different ids never share a row,
  and all 64 bits of an id are kept (Monolith's FIDs give the high bits to a
  slot number and keep 48 bits of the id; nothing is given up here).
- Across spaces, ids a (space s) and b (space t) meet only when
  a XOR b == salt(s) XOR salt(t): for hashed string ids (uniform on 64
  bits) a probability of 2^-64 per pair. Small integer ids (below 2^k in
  both spaces) can meet only if that XOR of two salts is below 2^k, which
  for a given pair of space names holds with probability 2^(k-64) (for
  k = 40: 6e-8) and is fixed by the names, not by the data. This is a
  probabilistic guarantee across spaces, not the structural one a slot
  number gives; it buys the full 64-bit id space within each.
- Features that should share rows (a `recent_items` history and the target
  `item`) declare the same `id_space`.
- The key of a row is no longer the id a record held; `space_ids` (the
  inverse) gives the id back for inspection. A table, snapshot or export
  written with raw ids as keys does not match this scheme: snapshots and
  exports record `KEY_SCHEME` and older ones are refused.
- Cost: a few vectorized numpy operations per id at the record boundary
  (about 3 ns per id on one core); nothing inside jitted programs.
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


# ---------------------------------------------------------------- key spaces
KEY_SCHEME = "id-space-fmix64/1"   # recorded by snapshots and exports
_SALT_PREFIX = "<monolith_jax:id_space>"
_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
# Their inverses mod 2^64 (pow(m, -1, 2**64)), for fmix64_inverse.
_M1_INV, _M2_INV = np.uint64(pow(0xFF51AFD7ED558CCD, -1, 2**64)), np.uint64(pow(0xC4CEB9FE1A85EC53, -1, 2**64))
_S33 = np.uint64(33)
_salts: dict = {}


def space_salt(space: str) -> np.uint64:
    """salt(space): `hash_strings(["<monolith_jax:id_space>" + space])`."""
    if not isinstance(space, str) or not space:
        raise ValueError(f"an id space must be a non-empty string, got {space!r}")
    salt = _salts.get(space)
    if salt is None:
        salt = _salts[space] = hash_strings([_SALT_PREFIX + space])[0]
    return salt


def fmix64(x) -> np.ndarray:
    """MurmurHash3's fmix64 of every element of a uint64 array (a bijection)."""
    z = np.array(as_key_array(x, "fmix64 input"), dtype=np.uint64, ndmin=1, copy=True)
    z ^= z >> _S33
    z *= _M1
    z ^= z >> _S33
    z *= _M2
    z ^= z >> _S33
    return z.reshape(np.shape(x))


def fmix64_inverse(z) -> np.ndarray:
    """The inverse of `fmix64` (x ^= x >> 33 undoes itself, for 33 >= 64 / 2)."""
    x = np.array(as_key_array(z, "fmix64_inverse input"), dtype=np.uint64, ndmin=1, copy=True)
    x ^= x >> _S33
    x *= _M2_INV
    x ^= x >> _S33
    x *= _M1_INV
    x ^= x >> _S33
    return x.reshape(np.shape(z))


def space_keys(ids, space: str) -> np.ndarray:
    """Table keys of raw ids (any integer array; strings: `hash_strings`
    first) in id space `space`: fmix64(id XOR salt(space)), same shape.
    The one record -> key mapping; see the module docstring."""
    raw = as_key_array(ids)
    return fmix64(raw.reshape(-1) ^ space_salt(space)).reshape(raw.shape)


def space_ids(keys, space: str) -> np.ndarray:
    """The raw ids of table keys of id space `space` (inverse of `space_keys`)."""
    k = as_key_array(keys, "keys")
    return (fmix64_inverse(k.reshape(-1)) ^ space_salt(space)).reshape(k.shape)
