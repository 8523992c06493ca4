"""Two-tower retrieval: logit = <user_tower(user fields), item_tower(item fields)> / temperature.

The towers are MLPs over concatenated field embeddings; their outputs are
L2-normalized, so the dot product is a cosine and item vectors can be
indexed for nearest-neighbour retrieval.
"""

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from monolith_jax.models.checks import no_dense_input, pooled_fields
from monolith_jax.models.mlp import MLP


class TwoTower(nnx.Module):
    def __init__(self, user_fields: Sequence[str], item_fields: Sequence[str], embed_dim: int,
                 hidden: Sequence[int] = (128,), out_dim: int = 64, temperature: float = 0.1,
                 *, rngs: nnx.Rngs):
        self.user_fields, self.item_fields = tuple(user_fields), tuple(item_fields)
        self.user = MLP(len(self.user_fields) * embed_dim, hidden, out_dim, rngs=rngs)
        self.item = MLP(len(self.item_fields) * embed_dim, hidden, out_dim, rngs=rngs)
        self.temperature = temperature
        self.embed_dim = embed_dim

    def _tower_input(self, fields: dict, names):
        return jnp.concatenate(pooled_fields(self, fields, names, self.embed_dim, f"embed_dim = {self.embed_dim}"),
                               axis=-1)

    def embed_users(self, fields: dict):
        u = self.user(self._tower_input(fields, self.user_fields))
        return u / (jnp.linalg.norm(u, axis=-1, keepdims=True) + 1e-6)

    def embed_items(self, fields: dict):
        i = self.item(self._tower_input(fields, self.item_fields))
        return i / (jnp.linalg.norm(i, axis=-1, keepdims=True) + 1e-6)

    def __call__(self, fields: dict, dense=None):
        no_dense_input(self, dense)
        return jnp.sum(self.embed_users(fields) * self.embed_items(fields), axis=-1) / self.temperature
