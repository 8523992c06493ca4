"""DeepFM (Guo et al., 2017), the Monolith paper's model.

logit = bias + sum_f w_f + FM(v_1..v_F) + MLP([v_1..v_F, dense]) + <a, dense>
FM(v) = 1/2 sum_d ((sum_f v_fd)^2 - sum_f v_fd^2)
Each field's row is (v_f, w_f): tables of dim `embed_dim + 1`.
"""

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from monolith_jax.models.checks import dense_input, pooled_fields
from monolith_jax.models.mlp import MLP


class DeepFM(nnx.Module):
    def __init__(self, fields: Sequence[str], embed_dim: int, n_dense: int = 0,
                 hidden: Sequence[int] = (400, 400, 400), *, matmul: str = "f32", rngs: nnx.Rngs):
        """matmul: the deep part's products, "f32" or "bf16" (`MLP`)."""
        self.fields = tuple(fields)
        self.embed_dim = embed_dim
        self.deep = MLP(len(self.fields) * embed_dim + n_dense, hidden, 1, matmul=matmul, rngs=rngs)
        self.dense_linear = nnx.Linear(n_dense, 1, rngs=rngs) if n_dense else None
        self.bias = nnx.Param(jnp.zeros(()))
        self.n_dense = n_dense

    def __call__(self, fields: dict, dense=None):
        d = self.embed_dim
        rows = jnp.stack(pooled_fields(self, fields, self.fields, d + 1,
                                       f"embed_dim + 1 = {d + 1} ({d} embedding values, then the first-order "
                                       f"weight)"), axis=1)  # (B, F, D+1)
        dense = dense_input(self, dense, self.n_dense)
        v, w = rows[..., : self.embed_dim], rows[..., self.embed_dim]
        fm = 0.5 * jnp.sum(jnp.square(v.sum(axis=1)) - jnp.square(v).sum(axis=1), axis=-1)
        deep_in = v.reshape(v.shape[0], -1)
        if self.dense_linear is not None:
            deep_in = jnp.concatenate([deep_in, dense], axis=-1)
        logit = self.bias[...] + w.sum(axis=1) + fm + self.deep(deep_in)[:, 0]
        if self.dense_linear is not None:
            logit = logit + self.dense_linear(dense)[:, 0]
        return logit
