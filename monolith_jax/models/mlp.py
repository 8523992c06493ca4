"""A ReLU MLP, the deep part of every model here."""

from typing import Sequence

from flax import nnx

from monolith_jax.models.checks import input_width


class MLP(nnx.Module):
    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int | None = None, *, rngs: nnx.Rngs):
        dims = [d_in, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.out = nnx.Linear(dims[-1], d_out, rngs=rngs) if d_out is not None else None
        self.d_in = d_in

    def __call__(self, x):
        input_width(self, x, self.d_in, "the input")
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.out(x) if self.out is not None else x
