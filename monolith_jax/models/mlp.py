"""A ReLU MLP, the deep part of every model here."""

from typing import Sequence

from flax import nnx

from monolith_jax.models.checks import input_width
from monolith_jax.models.matmul import bf16_dot_general, check_matmul


class MLP(nnx.Module):
    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int | None = None, *, matmul: str = "f32",
                 rngs: nnx.Rngs):
        """matmul: "f32", or "bf16": each layer's products from bf16 operands,
        accumulated in f32, forward and backward (`models.matmul`; params,
        activations and gradients stay f32). Changes numerics: a job
        choosing it checks its loss curve and AUC against f32."""
        dims = [d_in, *hidden]
        extra = {"dot_general": bf16_dot_general} if check_matmul(matmul) == "bf16" else {}
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs, **extra) for a, b in zip(dims[:-1], dims[1:])])
        self.out = nnx.Linear(dims[-1], d_out, rngs=rngs, **extra) if d_out is not None else None
        self.d_in = d_in

    def __call__(self, x):
        input_width(self, x, self.d_in, "the input")
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.out(x) if self.out is not None else x
