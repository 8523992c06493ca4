"""Feature specs and the batch type the trainer feeds to models.

A `SparseFeature` names its table (several features may share one: they
then meet in one lookup and one fused apply per batch), a combiner for
variable-length id lists, where its ids come from in a record and its id
space. A `DenseFeature` is a float column.

The record boundary, the same for files, stream messages and predictor
requests:

- Naming: a record names a feature by its `source`: the feature's
  `column` if given, else its `name` (a file's column, an IdList's or
  FloatList's `name` in a stream message, a predictor request's feature).
- Key spaces: a record's id becomes a table key through
  `SparseFeature.keys` (`monolith_jax.sparse.keys.space_keys` with the
  feature's `space`), so `user=5` and `item=5` read two rows; features
  that should share rows declare one `id_space`. Padding stays `PAD_KEY`.
- A sparse feature absent from a record (a missing column, a null cell, no
  IdList of that name) is refused: it is not the same as a present, empty
  id list (`[]`, `""` with a separator), which is legitimate and pools to
  zeros. Files raise naming the feature and rows; the stream dead-letters
  the example; the predictor answers INVALID_ARGUMENT.
- A dense value that is missing (null, absent) or not finite is refused,
  naming the feature and how many, unless its `DenseFeature` declares a
  `fill`: then it is replaced by the fill and counted. `fill_counts()`
  reads the counts (per dense feature name, this process, every path:
  files, stream decoder, predictor) and `reset_fill_counts()` zeroes them.

`SparseBatch` layout, for B examples and features f1 (max_len 3, ids from a
list column) and f2 (one id each):

    ids["f1"].words  uint32 (B, 3, 2)     lengths["f1"]  int32 (B,)
        ex0: [k7,  k9,  PAD]                  2
        ex1: [k4,  PAD, PAD]                  1
        ex2: [PAD, PAD, PAD]                  0      (no ids: pools to zeros)
    ids["f2"].words  uint32 (B, 1, 2)     lengths["f2"]  [1, 1, 1]
    dense            float32 (B, n_dense)
    labels           float32 (B,)         (B, H) for a job of H heads, one column each
    weights          float32 (B,)         1 for real examples, 0 for padding rows
    label_mask       float32 (B, H)       0 where a head's label is undefined (or None)

Shapes are static (max_len per feature, a fixed batch size with padded
examples weighted 0), so a jitted step compiles once. PAD is one reserved
key (`PAD_KEY`), masked out by `lengths`; its row exists but never reaches a
model.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Sequence

import jax
import numpy as np

from monolith_jax.sparse.keys import Keys, hash_strings, space_keys

COMBINERS = ("sum", "mean", "sqrtn")
PAD_KEY = int(hash_strings(["<monolith_jax:padding>"])[0])


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """name: the model's name for it; table: the TableConfig name it reads;
    column: the record field holding its ids (default: name; see `source`);
    combiner: how a list of ids pools to one vector, or None to keep
    (max_len, dim) sequence output; max_len: ids kept per example (longer
    lists are cut); separator: for string columns holding several ids
    ("3|17|5"); id_space: the key space its ids live in (default: the
    feature's own name).

    Key spaces: a record's id becomes the key `space_keys(id, space)`, a
    keyed bijection fmix64(id XOR salt(space)) (`monolith_jax.sparse.keys`
    documents it). Two features with different spaces never share a row by
    sharing an integer (they meet only when a XOR b equals the XOR of their
    two salts: for hashed ids 2^-64 per pair); two features that should
    share rows, e.g. a `recent_items` history and the target `item`,
    declare the same `id_space`. Within a space no two ids share a row and
    all 64 bits are kept.

    A record must hold every sparse feature the job reads (an empty list is
    fine, an absent feature is refused)."""

    name: str
    table: str
    column: str | None = None
    combiner: str | None = "sum"
    max_len: int = 1
    separator: str | None = None
    id_space: str | None = None

    def __post_init__(self):
        if self.combiner is not None and self.combiner not in COMBINERS:
            raise ValueError(f"feature {self.name!r}: combiner must be one of {COMBINERS} or None")
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"feature {self.name!r}: max_len must be an int >= 1")
        if self.id_space is not None and (not isinstance(self.id_space, str) or not self.id_space):
            raise ValueError(f"feature {self.name!r}: id_space must be a non-empty string or None, "
                             f"got {self.id_space!r}")

    @property
    def source(self) -> str:
        """The name records use for this feature: `column`, else `name`."""
        return self.column or self.name

    @property
    def space(self) -> str:
        """The id space: `id_space`, else the feature's name."""
        return self.id_space or self.name

    def keys(self, ids) -> np.ndarray:
        """Table keys (uint64, same shape) of this feature's raw ids (integers;
        strings hashed with `hash_strings` first). Real ids only: padding
        positions keep `PAD_KEY` and must not pass through here."""
        return space_keys(ids, self.space)


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    """name: the model's name for it; column: the record field holding it
    (default: name; see `source`); fill: the value that replaces a missing
    (null, absent) or non-finite one, counted in `fill_counts()`. Without a
    fill such a value is refused, naming the feature and the count."""

    name: str
    column: str | None = None
    fill: float | None = None

    def __post_init__(self):
        if self.fill is not None:
            if isinstance(self.fill, bool) or not isinstance(self.fill, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(self.fill)):
                raise ValueError(f"dense feature {self.name!r}: fill must be a finite number or None, "
                                 f"got {self.fill!r}")
            object.__setattr__(self, "fill", float(self.fill))

    @property
    def source(self) -> str:
        """The name records use for this feature: `column`, else `name`."""
        return self.column or self.name


_fill_lock = threading.Lock()
_fill_counts: dict = {}


def fill_counts() -> dict:
    """Dense feature name -> how many values this process replaced by the
    feature's `fill` (missing or non-finite), since start or the last
    `reset_fill_counts()`: files, the stream decoder and the predictor."""
    with _fill_lock:
        return dict(_fill_counts)


def reset_fill_counts() -> None:
    with _fill_lock:
        _fill_counts.clear()


def fill_dense(values: np.ndarray, dense: Sequence[DenseFeature], where: str = "records") -> dict:
    """Checks float32 (n, len(dense)) dense values in place: a non-finite
    entry (NaN marks a missing one) is replaced by its feature's `fill`
    and counted, or, without a fill, refused with ValueError naming the
    feature and the count. Returns feature name -> values filled here."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return {}
    counts = bad.sum(axis=0)
    refused = [(f, int(c)) for f, c in zip(dense, counts) if c and f.fill is None]
    if refused:
        what = "; ".join(f"dense feature {f.name!r} (field {f.source!r}): {c} of {values.shape[0]} values "
                         f"missing or not finite" for f, c in refused)
        raise ValueError(f"{where}: {what}. Declare DenseFeature(..., fill=VALUE) to impute them")
    filled = {}
    for k, (f, c) in enumerate(zip(dense, counts)):
        if c:
            values[bad[:, k], k] = f.fill
            filled[f.name] = filled.get(f.name, 0) + int(c)
    with _fill_lock:
        for name, c in filled.items():
            _fill_counts[name] = _fill_counts.get(name, 0) + c
    return filled


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SparseBatch:
    """See the module docstring for the layout."""

    ids: dict            # feature name -> Keys (B, max_len)
    lengths: dict        # feature name -> int32 (B,)
    dense: jax.Array     # float32 (B, n_dense)
    labels: jax.Array    # float32 (B,); (B, H) for a job of H heads (monolith_jax.heads)
    weights: jax.Array   # float32 (B,)
    label_mask: jax.Array | None = None  # float32 (B, H): 0 where a head's label is undefined

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(r) for r in rows[:limit])
    return f"row{'s' if rows.size > 1 else ''} {shown}{', ...' if rows.size > limit else ''}"


def _id_column(values, feature: SparseFeature, raw_ids: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 (n, max_len) padded with PAD_KEY, lengths int32 (n,)), vectorized.
    raw_ids: the record's ids as they are (strings hashed), not yet in the
    feature's key space: what a stream message carries (the replayer)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    n = len(arr)
    where = f"feature {feature.name!r}: column {feature.source!r}"
    if arr.null_count:
        missing = np.asarray(arr.is_null())
        raise ValueError(f"{where} is missing (null) in {int(missing.sum())} of {n} records ({_rows(missing)} "
                         f"of the batch); a record without ids holds an empty list, it may not lack the feature")
    if feature.separator is not None:
        if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            raise TypeError(f"feature {feature.name!r}: separator needs a string column, got {arr.type}")
        arr = pc.split_pattern(arr, feature.separator)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = np.asarray(arr.offsets).astype(np.int64)
        offsets -= offsets[0]  # a sliced array's offsets start where its values do
        flat = arr.flatten()
        if feature.separator is not None:
            # "" and "a||b" hold no id between separators: drop empty tokens.
            keep = np.asarray(pc.not_equal(pc.utf8_length(flat), 0))
            kept = np.concatenate([[0], np.cumsum(keep)])
            offsets = kept[offsets]
            flat = flat.filter(pa.array(keep))
    else:
        offsets = np.arange(n + 1, dtype=np.int64)
        flat = arr
    if flat.null_count:
        at = np.flatnonzero(np.asarray(flat.is_null()))
        rows = np.zeros(n, bool)
        rows[np.searchsorted(offsets, at, side="right") - 1] = True
        raise ValueError(f"{where} holds missing (null) ids in {_rows(rows)} of the batch")
    if pa.types.is_integer(flat.type):
        raw = np.asarray(flat.cast(pa.int64())).view(np.uint64)
    elif pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        # Hash each distinct string once; rows map back by index.
        uniq, inverse = np.unique(np.asarray(flat.to_numpy(zero_copy_only=False), dtype=object).astype(str),
                                  return_inverse=True)
        raw = hash_strings(uniq.tolist())[inverse] if uniq.size else np.zeros(0, np.uint64)
    else:
        raise TypeError(f"feature {feature.name!r}: ids must be integers or strings, got {flat.type}")
    lengths = np.minimum(np.diff(offsets), feature.max_len).astype(np.int32)
    out = np.full((n, feature.max_len), PAD_KEY, np.uint64)
    # Scatter each example's first max_len ids without a Python loop.
    pos = np.arange(feature.max_len)
    take = pos[None, :] < lengths[:, None]
    src = (offsets[:-1, None] + pos[None, :])[take]
    out[take] = raw[src] if raw_ids else feature.keys(raw[src])
    return out, lengths


def _float_column(values, what: str) -> np.ndarray:
    """A numeric column as float32, nulls as NaN."""
    import pyarrow as pa

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_null(arr.type):  # a column of nothing but nulls
        return np.full(len(arr), np.nan, np.float32)
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_boolean(arr.type)
            or pa.types.is_decimal(arr.type)):
        raise TypeError(f"{what} must be numeric, got {arr.type}")
    # Nulls read as NaN in float64.
    return np.asarray(arr.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False), np.float32)


def _head_labels(table, heads, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels float32 (n, H), label_mask (n, H) or None) of the heads' columns."""
    labels = np.empty((n, len(heads)), np.float32)
    mask = None
    for k, h in enumerate(heads):
        col = _float_column(table.column(h.label), f"label column {h.label!r} (head {h.name!r})")
        bad = ~np.isfinite(col)
        if bad.any():
            if h.missing != "mask":
                raise ValueError(f"label column {h.label!r} (head {h.name!r}): {int(bad.sum())} of {n} labels "
                                 f"missing or not finite ({_rows(bad)} of the batch); Head(..., missing='mask') "
                                 f"leaves the head undefined there")
            if mask is None:
                mask = np.ones((n, len(heads)), np.float32)
            mask[bad, k] = 0.0
            col = np.where(bad, 0.0, col).astype(np.float32)
        labels[:, k] = col if h.threshold is None else (col >= h.threshold).astype(np.float32)
    return labels, mask


def records_to_batch(table, sparse: Sequence[SparseFeature], dense: Sequence[DenseFeature] = (),
                     label="label", batch_size: int | None = None,
                     label_threshold: float | None = None) -> SparseBatch:
    """A pyarrow Table (or RecordBatch) of records -> a SparseBatch of numpy
    arrays, padded to `batch_size` rows (weight 0) when given.

    Features are found by `source`; ids become keys through each feature's
    `keys` (its id space). Refused with an error naming the feature: a
    missing column, a null sparse cell or null id (an empty list is fine),
    a missing or non-finite dense value of a feature without `fill` (with
    one: filled and counted in `fill_counts()`), a missing or non-finite
    label.

    label: the label column, None (labels 0), or a job's heads
    (`monolith_jax.heads.Head`, several columns): labels (B, H), each
    head's column thresholded by its `threshold`; a missing label of a
    head with `missing="mask"` is masked (`label_mask` 0) instead of
    refused."""
    import pyarrow as pa

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    size = n if batch_size is None else batch_size
    if n > size:
        raise ValueError(f"{n} records do not fit a batch of {size}")
    heads = None if label is None or isinstance(label, str) else tuple(label)
    label_cols = [h.label for h in heads] if heads is not None else ([label] if label else [])
    missing = [c for c in dict.fromkeys([f.source for f in sparse] + [f.source for f in dense] + label_cols)
               if c not in table.column_names]
    if missing:
        raise KeyError(f"records lack columns {missing}; they have {table.column_names}")
    ids, lengths = {}, {}
    for f in sparse:
        keys, lens = _id_column(table.column(f.source), f)
        if size > n:
            keys = np.concatenate([keys, np.full((size - n, f.max_len), PAD_KEY, np.uint64)])
            lens = np.concatenate([lens, np.zeros(size - n, np.int32)])
        ids[f.name] = Keys.from_ids(keys)
        lengths[f.name] = lens
    dense_cols = [_float_column(table.column(f.source), f"dense feature {f.name!r} (column {f.source!r})")
                  for f in dense]
    dense_arr = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), np.float32)
    fill_dense(dense_arr, dense, f"records ({n})")
    mask = None
    if heads is not None:
        labels, mask = _head_labels(table, heads, n)
    elif label:
        labels = _float_column(table.column(label), f"label column {label!r}")
        bad = ~np.isfinite(labels)
        if bad.any():
            raise ValueError(f"label column {label!r}: {int(bad.sum())} of {n} labels missing or not finite "
                             f"({_rows(bad)} of the batch)")
    else:
        labels = np.zeros(n, np.float32)
    if heads is None and label_threshold is not None:
        labels = (labels >= label_threshold).astype(np.float32)

    def padded(a):  # padding rows: zeros (weight 0, labels and mask 0)
        return np.concatenate([a, np.zeros((size - n, *a.shape[1:]), np.float32)])

    return SparseBatch(ids=ids, lengths=lengths, dense=padded(dense_arr), labels=padded(labels),
                       weights=padded(np.ones(n, np.float32)), label_mask=None if mask is None else padded(mask))
