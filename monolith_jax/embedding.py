"""From a SparseBatch to per-feature embeddings, through the tables.

`EmbeddingCollection` owns the tables of a model. Features that share a
table meet in one lookup and one fused apply per batch (their ids are
concatenated), so an id appearing in two features steps once.
`SparseFeatures` (an NNX module with no parameters: table rows are not
`nnx.Param`s) pools the looked-up rows per feature:

    rows["f1"]  (B, L, D) --mask by lengths, combine--> (B, D)     combiner "sum" | "mean" | "sqrtn"
                          --mask by lengths-----------> (B, L, D)  combiner None (sequence output)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monolith_jax.features import SparseBatch, SparseFeature
from monolith_jax.sparse import EmbeddingTable, Keys, TableConfig


def pool(rows: jax.Array, lengths: jax.Array, combiner: str | None) -> jax.Array:
    """rows (B, L, D), lengths (B,) -> (B, D), or masked (B, L, D) for None."""
    mask = (jnp.arange(rows.shape[1])[None, :] < lengths[:, None])[..., None].astype(rows.dtype)
    masked = rows * mask
    if combiner is None:
        return masked
    total = masked.sum(axis=1)
    n = jnp.maximum(lengths, 1).astype(rows.dtype)[:, None]
    if combiner == "sum":
        return total
    if combiner == "mean":
        return total / n
    if combiner == "sqrtn":
        return total / jnp.sqrt(n)
    raise ValueError(f"unknown combiner {combiner!r}")


class SparseFeatures(nnx.Module):
    """Pools looked-up rows per feature; holds no parameters."""

    def __init__(self, features: Sequence[SparseFeature]):
        self.features = tuple(features)

    def __call__(self, rows: dict, lengths: dict) -> dict:
        return {f.name: pool(rows[f.name], lengths[f.name], f.combiner) for f in self.features}


class EmbeddingCollection:
    """The tables of a model and the features that read them."""

    def __init__(self, tables: Sequence[TableConfig], features: Sequence[SparseFeature]):
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        self.tables = {t.name: EmbeddingTable(t) for t in tables}
        self.features = tuple(features)
        for f in self.features:
            if f.table not in self.tables:
                raise ValueError(f"feature {f.name!r} reads table {f.table!r}, which is not among {names}")
        self.by_table = {name: [f for f in self.features if f.table == name] for name in self.tables}

    def _table_words(self, batch: SparseBatch, name: str):
        feats = self.by_table[name]
        return jnp.concatenate([batch.ids[f.name].words for f in feats], axis=1) if len(feats) > 1 \
            else batch.ids[feats[0].name].words

    def host_words(self, batch: SparseBatch, name: str) -> np.ndarray:
        """`_table_words` for host code: numpy, with no program dispatched."""
        words = [np.asarray(batch.ids[f.name].words) for f in self.by_table[name]]
        return np.concatenate(words, axis=1) if len(words) > 1 else words[0]

    def lookup(self, batch: SparseBatch) -> dict:
        """In a program: per table, rows (B, sum of its features' max_len, D)."""
        return {name: t.lookup(Keys(self._table_words(batch, name)))
                for name, t in self.tables.items() if self.by_table[name]}

    def find_host(self, batch: SparseBatch) -> dict:
        """Read-only, from the host: rows of present ids, zeros elsewhere (no
        rows created, no admission sightings counted): for evaluation."""
        out = {}
        for name, t in self.tables.items():
            if self.by_table[name]:
                out[name] = t.find(Keys(self.host_words(batch, name)).to_numpy())[0]
        return out

    def split(self, table_rows: dict) -> dict:
        """Per table rows -> per feature rows (B, max_len, D)."""
        out = {}
        for name, feats in self.by_table.items():
            start = 0
            for f in feats:
                out[f.name] = table_rows[name][:, start:start + f.max_len]
                start += f.max_len
        return out

    def apply(self, batch: SparseBatch, table_grads: dict, step, after=None) -> dict:
        """In a program: one fused apply per table; returns the order tokens."""
        return {name: self.tables[name].apply_gradients(Keys(self._table_words(batch, name)), g, step=step,
                                                        after=after)
                for name, g in table_grads.items()}
