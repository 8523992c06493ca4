"""bf16 products with f32 accumulation (`models.matmul`): the product and
both gradients against numpy on bf16-rounded operands; the f32 default is
the plain `nnx.Linear` chain; DeepFM trains with bf16 products as with f32."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.models import MLP, DeepFM
from monolith_jax.models.matmul import bf16_dot
from monolith_jax.sparse import Adagrad, Normal, TableConfig
from monolith_jax.training import Trainer
from tests.test_models_training import learns_the_synthetic_signal


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def test_bf16_dot_and_its_gradients_are_products_of_rounded_operands():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(33, 20)).astype(np.float32)
    w = rng.normal(size=(20, 7)).astype(np.float32)
    g = rng.normal(size=(33, 7)).astype(np.float32)
    out, vjp = jax.vjp(bf16_dot, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert out.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(out, _bf16(x) @ _bf16(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, _bf16(g) @ _bf16(w).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, _bf16(x).T @ _bf16(g), rtol=1e-5, atol=1e-5)
    # and it is not the f32 product: the operands did lose bits
    assert float(jnp.abs(out - x @ w).max()) > 1e-4


def test_mlp_f32_is_the_linear_chain_and_bf16_stays_close():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 12)).astype(np.float32))
    f32 = MLP(12, (8, 8), 1, rngs=nnx.Rngs(0))
    h = x
    for layer in f32.layers:
        h = jax.nn.relu(h @ layer.kernel[...] + layer.bias[...])
    np.testing.assert_array_equal(f32(x), h @ f32.out.kernel[...] + f32.out.bias[...])
    bf = MLP(12, (8, 8), 1, matmul="bf16", rngs=nnx.Rngs(0))  # the same init: same params
    assert bf(x).dtype == jnp.float32
    np.testing.assert_allclose(bf(x), f32(x), rtol=0.05, atol=0.05)
    assert not np.array_equal(np.asarray(bf(x)), np.asarray(f32(x)))
    for p in jax.tree.leaves(nnx.state(bf, nnx.Param)):
        assert p.dtype == jnp.float32


def test_an_unknown_matmul_and_a_3d_input_are_refused():
    with pytest.raises(ValueError, match="matmul must be one of"):
        MLP(4, (4,), 1, matmul="fp8", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matmul must be one of"):
        DeepFM(["a"], 4, 0, (4,), matmul="half", rngs=nnx.Rngs(0))
    layer = MLP(4, (3,), matmul="bf16", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="2-D input"):
        layer.layers[0](jnp.ones((2, 5, 4)))


def test_deepfm_with_bf16_products_learns_the_signal():
    feats = [SparseFeature("user", "ids"), SparseFeature("item", "ids")]
    dense = [DenseFeature("x")]
    tables = [TableConfig("ids", 9, Normal(0, 0.01), Adagrad(0.05))]
    model = DeepFM(["user", "item"], 8, 1, (32, 32), matmul="bf16", rngs=nnx.Rngs(0))
    tr = Trainer(model, tables, feats, dense, optax.adam(3e-3), log_every=0, out=None)
    learns_the_synthetic_signal(tr, feats, dense)
