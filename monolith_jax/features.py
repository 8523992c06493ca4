"""Feature specs and the batch type the trainer feeds to models.

A `SparseFeature` names its table (several features may share one: their
ids then meet in one lookup and one fused apply per batch, so an id in two
features still steps once), a combiner for variable-length id lists and
where its ids come from in a record. A `DenseFeature` is a float column.

`SparseBatch` layout, for B examples and features f1 (max_len 3, ids from a
list column) and f2 (one id each):

    ids["f1"].words  uint32 (B, 3, 2)     lengths["f1"]  int32 (B,)
        ex0: [k7,  k9,  PAD]                  2
        ex1: [k4,  PAD, PAD]                  1
        ex2: [PAD, PAD, PAD]                  0      (no ids: pools to zeros)
    ids["f2"].words  uint32 (B, 1, 2)     lengths["f2"]  [1, 1, 1]
    dense            float32 (B, n_dense)
    labels           float32 (B,)
    weights          float32 (B,)         1 for real examples, 0 for padding rows

Shapes are static (max_len per feature, a fixed batch size with padded
examples weighted 0), so a jitted step compiles once. PAD is one reserved
key (`PAD_KEY`), masked out by `lengths`; its row exists but never reaches a
model.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from monolith_jax.sparse.keys import Keys, hash_strings

COMBINERS = ("sum", "mean", "sqrtn")
PAD_KEY = int(hash_strings(["<monolith_jax:padding>"])[0])


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    """name: the model's name for it; table: the TableConfig name it reads;
    column: the record field holding its ids (default: name); combiner: how
    a list of ids pools to one vector, or None to keep (max_len, dim)
    sequence output; max_len: ids kept per example (longer lists are cut);
    separator: for string columns holding several ids ("3|17|5")."""

    name: str
    table: str
    column: str | None = None
    combiner: str | None = "sum"
    max_len: int = 1
    separator: str | None = None

    def __post_init__(self):
        if self.combiner is not None and self.combiner not in COMBINERS:
            raise ValueError(f"feature {self.name!r}: combiner must be one of {COMBINERS} or None")
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"feature {self.name!r}: max_len must be an int >= 1")

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclasses.dataclass(frozen=True)
class DenseFeature:
    name: str
    column: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SparseBatch:
    """See the module docstring for the layout."""

    ids: dict            # feature name -> Keys (B, max_len)
    lengths: dict        # feature name -> int32 (B,)
    dense: jax.Array     # float32 (B, n_dense)
    labels: jax.Array    # float32 (B,)
    weights: jax.Array   # float32 (B,)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def _id_column(values, feature: SparseFeature) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 (n, max_len) padded with PAD_KEY, lengths int32 (n,)), vectorized."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    n = len(arr)
    if feature.separator is not None:
        if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
            raise TypeError(f"feature {feature.name!r}: separator needs a string column, got {arr.type}")
        arr = pc.split_pattern(arr, feature.separator)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        offsets = np.asarray(arr.offsets)
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
        raise ValueError(f"feature {feature.name!r}: column {feature.source!r} has missing ids")
    if pa.types.is_integer(flat.type):
        keys = np.asarray(flat.cast(pa.int64())).view(np.uint64)
    elif pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
        # Hash each distinct string once; rows map back by index.
        uniq, inverse = np.unique(np.asarray(flat.to_numpy(zero_copy_only=False), dtype=object).astype(str),
                                  return_inverse=True)
        keys = hash_strings(uniq.tolist())[inverse] if uniq.size else np.zeros(0, np.uint64)
    else:
        raise TypeError(f"feature {feature.name!r}: ids must be integers or strings, got {flat.type}")
    lengths = np.minimum(np.diff(offsets), feature.max_len).astype(np.int32)
    out = np.full((n, feature.max_len), PAD_KEY, np.uint64)
    # Scatter each example's first max_len ids without a Python loop.
    pos = np.arange(feature.max_len)
    take = pos[None, :] < lengths[:, None]
    src = (offsets[:-1, None] + pos[None, :])[take]
    out[take] = keys[src]
    return out, lengths


def records_to_batch(table, sparse: Sequence[SparseFeature], dense: Sequence[DenseFeature] = (),
                     label: str | None = "label", batch_size: int | None = None,
                     label_threshold: float | None = None) -> SparseBatch:
    """A pyarrow Table (or RecordBatch) of records -> a SparseBatch of numpy
    arrays, padded to `batch_size` rows (weight 0) when given."""
    import pyarrow as pa

    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    size = n if batch_size is None else batch_size
    if n > size:
        raise ValueError(f"{n} records do not fit a batch of {size}")
    missing = [c for c in [f.source for f in sparse] + [f.source for f in dense] + ([label] if label else [])
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
    dense_cols = [np.asarray(table.column(f.source).to_numpy(zero_copy_only=False), np.float32) for f in dense]
    dense_arr = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), np.float32)
    labels = np.asarray(table.column(label).to_numpy(zero_copy_only=False), np.float32) if label else np.zeros(n, np.float32)
    if label_threshold is not None:
        labels = (labels >= label_threshold).astype(np.float32)
    pad = size - n
    return SparseBatch(
        ids=ids, lengths=lengths,
        dense=np.concatenate([dense_arr, np.zeros((pad, dense_arr.shape[1]), np.float32)]),
        labels=np.concatenate([labels, np.zeros(pad, np.float32)]),
        weights=np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]),
    )
