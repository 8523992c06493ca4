"""bf16 matmuls with f32 accumulation, forward and backward.

`nnx.Linear(dtype=bfloat16)` rounds only the forward product: JAX's
transpose of a dot with `preferred_element_type` computes both gradients
in f32 (the cotangent is f32), so two of a layer's three matmuls stay f32,
and its bias is rounded too. `bf16_dot` rounds the operands of all three
products to bf16 and accumulates each in f32 (on a CPU with avx512_bf16,
XLA's bf16 dot runs about twice the f32 rate); the parameters, the
activations between layers and the gradients handed to the optimizer stay
f32, so only the products' inputs lose bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MATMULS = ("f32", "bf16")


def check_matmul(matmul: str) -> str:
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS} (the dense layers' products), got {matmul!r}")
    return matmul


def _dot(a, b, dims):
    return lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dims,
                           preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_dot(x, w):
    """x (B, n) @ w (n, m) -> (B, m) f32, from bf16 operands."""
    return _dot(x, w, (((1,), (0,)), ((), ())))


def _fwd(x, w):
    return bf16_dot(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    dx = _dot(g, w, (((1,), (1,)), ((), ())))  # g @ w.T
    dw = _dot(x, g, (((0,), (0,)), ((), ())))  # x.T @ g
    return dx.astype(x.dtype), dw.astype(w.dtype)


bf16_dot.defvjp(_fwd, _bwd)


def bf16_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """`nnx.Linear(dot_general=...)` for a 2-D input: `bf16_dot`."""
    if x.ndim != 2 or dimension_numbers != (((1,), (0,)), ((), ())):
        raise ValueError(f"bf16 matmul: a 2-D input contracted on its last axis, got input shape {x.shape}")
    return bf16_dot(x, w)
