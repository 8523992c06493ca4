"""DCN-v2 (Wang et al., 2021), parallel form.

x0 = [v_1..v_F, dense];  x_{l+1} = x0 * (W_l x_l + b_l) + x_l  (full-rank cross)
logit = Linear([x_L, MLP(x0)])
"""

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from monolith_jax.models.checks import dense_input, pooled_fields
from monolith_jax.models.mlp import MLP


class DCNv2(nnx.Module):
    def __init__(self, fields: Sequence[str], embed_dim: int, n_dense: int = 0, cross_layers: int = 3,
                 hidden: Sequence[int] = (256, 256), *, rngs: nnx.Rngs):
        self.fields = tuple(fields)
        d = len(self.fields) * embed_dim + n_dense
        self.cross = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(cross_layers)])
        self.deep = MLP(d, hidden, rngs=rngs)
        self.out = nnx.Linear(d + hidden[-1], 1, rngs=rngs)
        self.n_dense = n_dense
        self.embed_dim = embed_dim

    def __call__(self, fields: dict, dense=None):
        x0 = jnp.concatenate(pooled_fields(self, fields, self.fields, self.embed_dim,
                                           f"embed_dim = {self.embed_dim}"), axis=-1)
        dense = dense_input(self, dense, self.n_dense)
        if self.n_dense:
            x0 = jnp.concatenate([x0, dense], axis=-1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.out(jnp.concatenate([x, self.deep(x0)], axis=-1))[:, 0]
