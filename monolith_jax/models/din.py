"""DIN, Deep Interest Network (Zhou et al., 2018): target attention over a behaviour sequence.

q = the target item's row (B, D);  k_j = the j-th behaviour's row (B, L, D)
a_j = mask_j * AttentionMLP([q, k_j, q - k_j, q * k_j])      (one score per position)
interest = sum_j a_j k_j                                      (B, D)
logit = MLP([interest, q, v_1..v_F, dense])

`sequence` is a SparseFeature with combiner=None (e.g. a user's recent
items), `target` a pooled feature (e.g. the item, max_len 1) reading the
same table in the same `id_space`, so an item in the history and the same
item as the target read one row. `fields` are the other pooled features
(user, context), each of width `embed_dim`.

Weights are NOT softmax-normalised (normalize=False, the default), as in
the paper: the sum keeps the intensity of the user's interest, so a history
with three items like the target says more than one with one, which a
softmax (weights summing to 1) would erase. normalize=True gives masked
softmax weights (a weighted mean of the behaviours) for sequences whose
length should not matter; an all-padding row then gets all-zero weights.

Padding: a model gets the pooled fields only, not the lengths; a sequence
feature's padding positions arrive as zero rows (`embedding.pool` masks
them whatever the padding key's row holds). A position is read as padding
when its row is all zeros, and padding gets weight exactly 0, so appending
padding does not change the output and an all-padding sequence gives a
zero interest vector (a finite logit, finite gradients). A real id whose row
is all zeros (an unseen id at evaluation reads zeros) is treated the same,
which with normalize=False is no change at all: its term a_j * 0 is 0.

The paper's activation unit uses PReLU/Dice; the MLPs here are the ReLU
`MLP` every model in this package uses.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from monolith_jax.models.checks import dense_input, input_width, pooled_fields
from monolith_jax.models.mlp import MLP


def sequence_field(model, fields: dict, name: str, width: int):
    """fields[name] checked to be a sequence feature's (batch, max_len, width) rows."""
    cls = type(model).__name__
    if name not in fields:
        raise KeyError(f"{cls} reads feature {name!r}, which no sparse feature provides "
                       f"(the features are {sorted(fields)})")
    x = fields[name]
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 3:
        raise ValueError(f"{cls}: feature {name!r} gives rows of shape {shape}; {cls} needs its behaviour "
                         f"sequence as (batch, max_len, {width}) rows: declare it with combiner=None and a "
                         f"max_len")
    return input_width(model, x, width, f"the sequence feature {name!r} (rows of its table)")


class DIN(nnx.Module):
    def __init__(self, sequence: str, target: str, fields: Sequence[str], embed_dim: int, n_dense: int = 0,
                 attention_hidden: Sequence[int] = (36,), hidden: Sequence[int] = (200, 80),
                 normalize: bool = False, *, rngs: nnx.Rngs):
        """sequence: the behaviour feature (combiner=None); target: the pooled
        feature it is attended against (same table); fields: the other pooled
        features; normalize: masked softmax weights instead of the paper's
        unnormalised ones (see the module docstring)."""
        self.sequence, self.target = sequence, target
        self.fields = tuple(fields)
        if sequence == target or sequence in self.fields or target in self.fields:
            raise ValueError(f"DIN: sequence {sequence!r}, target {target!r} and fields {list(self.fields)} "
                             f"must be different features")
        self.embed_dim = embed_dim
        self.n_dense = n_dense
        self.normalize = bool(normalize)
        self.attention = MLP(4 * embed_dim, attention_hidden, 1, rngs=rngs)
        self.deep = MLP((2 + len(self.fields)) * embed_dim + n_dense, hidden, 1, rngs=rngs)

    def attention_weights(self, query, keys):
        """query (B, D), keys (B, L, D) -> weights (B, L), 0 at padding (all-zero rows)."""
        mask = jnp.any(keys != 0, axis=-1)                                  # (B, L)
        q = jnp.broadcast_to(query[:, None, :], keys.shape)
        scores = self.attention(jnp.concatenate([q, keys, q - keys, q * keys], axis=-1))[..., 0]
        if not self.normalize:
            return jnp.where(mask, scores, 0.0)
        # Masked softmax that stays finite (weights all 0) when every position is padding.
        top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -1e30), axis=-1, keepdims=True))
        e = jnp.where(mask, jnp.exp(jnp.where(mask, scores, top) - top), 0.0)
        return e / jnp.maximum(e.sum(axis=-1, keepdims=True), 1e-30)

    def interest(self, fields: dict):
        """The attended interest vector (B, D) and the target's row (B, D)."""
        d = self.embed_dim
        keys = sequence_field(self, fields, self.sequence, d)
        (query,) = pooled_fields(self, fields, [self.target], d, f"embed_dim = {d} (the sequence's table)")
        if keys.shape[0] != query.shape[0]:
            raise ValueError(f"DIN: sequence {self.sequence!r} has {keys.shape[0]} rows, target "
                             f"{self.target!r} {query.shape[0]}")
        w = self.attention_weights(query, keys)
        return jnp.einsum("bl,bld->bd", w, keys), query

    def __call__(self, fields: dict, dense=None):
        interest, query = self.interest(fields)
        others = pooled_fields(self, fields, self.fields, self.embed_dim, f"embed_dim = {self.embed_dim}")
        dense = dense_input(self, dense, self.n_dense)
        parts = [interest, query, *others] + ([dense] if self.n_dense else [])
        return self.deep(jnp.concatenate(parts, axis=-1))[:, 0]
