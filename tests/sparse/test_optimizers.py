"""Every fused optimizer against optax (or its reference formula), step by step.

Each case runs several steps of the same gradients, with a learning rate that
changes every step, through the table and through the reference, and compares
all rows to 1e-5 relative after every step.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from monolith_jax.sparse import (
    AMSGrad, FTRL, SGD, Adagrad, Adam, EmbeddingTable, Keys, Momentum, Normal, RMSProp,
    RowwiseAdagrad, TableConfig,
)

STEPS = 6
LRS = [0.05, 0.04, 0.06, 0.03, 0.05, 0.02]
N, DIM = 24, 5


def _schedule(count):
    return jnp.asarray(LRS)[count]


def _rowwise_adagrad_ref(cfg):
    def run(w, grads):
        acc = np.full((w.shape[0], 1), cfg.initial_accumulator_value, np.float32)
        out = []
        for lr, g in zip(LRS, grads):
            acc = acc + np.mean(g * g, axis=1, keepdims=True)
            w = w - np.float32(lr) * g / (np.sqrt(acc) + np.float32(cfg.eps))
            out.append(w)
        return out
    return run


def _ftrl_ref(cfg):
    # TensorFlow's ApplyFtrlV2 (without l2_shrinkage), in float64.
    def run(w, grads):
        w = w.astype(np.float64)
        z = np.zeros_like(w)
        n = np.full_like(w, cfg.initial_accumulator_value)
        p = cfg.learning_rate_power
        out = []
        for lr, g in zip(LRS, grads):
            g = g.astype(np.float64)
            n_new = n + g * g
            sigma = (n_new ** -p - n ** -p) / lr
            z = z + g - sigma * w
            n = n_new
            quadratic = (cfg.beta + n ** -p) / lr + 2 * cfg.l2
            w = np.where(np.abs(z) <= cfg.l1, 0.0, (np.sign(z) * cfg.l1 - z) / quadratic)
            out.append(w.astype(np.float32))
        return out
    return run


def _optax_ref(tx):
    def run(w, grads):
        params = jnp.asarray(w)
        state = tx.init(params)
        out = []
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, params)
            params = optax.apply_updates(params, updates)
            out.append(np.asarray(params))
        return out
    return run


CASES = {
    "sgd": (SGD(), _optax_ref(optax.sgd(_schedule))),
    "momentum": (Momentum(momentum=0.8), _optax_ref(optax.sgd(_schedule, momentum=0.8))),
    "nesterov": (Momentum(momentum=0.8, nesterov=True),
                 _optax_ref(optax.sgd(_schedule, momentum=0.8, nesterov=True))),
    "adagrad": (Adagrad(initial_accumulator_value=0.1, eps=1e-7),
                _optax_ref(optax.adagrad(_schedule, initial_accumulator_value=0.1, eps=1e-7))),
    "rowwise_adagrad": (RowwiseAdagrad(initial_accumulator_value=0.05),
                        _rowwise_adagrad_ref(RowwiseAdagrad(initial_accumulator_value=0.05))),
    "adam": (Adam(b1=0.9, b2=0.99, eps=1e-6), _optax_ref(optax.adam(_schedule, b1=0.9, b2=0.99, eps=1e-6))),
    "adam_eps_root": (Adam(eps_root=1e-8),
                      _optax_ref(optax.adam(_schedule, eps_root=1e-8))),
    "amsgrad": (AMSGrad(b1=0.8, b2=0.95, eps=1e-6),
                _optax_ref(optax.amsgrad(_schedule, b1=0.8, b2=0.95, eps=1e-6))),
    "rmsprop": (RMSProp(decay=0.8, eps=1e-6),
                _optax_ref(optax.rmsprop(_schedule, decay=0.8, eps=1e-6))),
    "rmsprop_initial_scale": (RMSProp(decay=0.9, eps=1e-8, initial_scale=0.5),
                              _optax_ref(optax.rmsprop(_schedule, decay=0.9, eps=1e-8, initial_scale=0.5))),
    "ftrl": (FTRL(l1=0.001, l2=0.01, beta=0.1), _ftrl_ref(FTRL(l1=0.001, l2=0.01, beta=0.1))),
    "ftrl_power": (FTRL(learning_rate_power=-0.6, l1=0.0005),
                   _ftrl_ref(FTRL(learning_rate_power=-0.6, l1=0.0005))),
}


def _gradients(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((N, DIM)).astype(np.float32) for _ in range(STEPS)]


def _initial(table, ids):
    return table.lookup_host(ids).copy()


@pytest.mark.parametrize("path", ["host", "jit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_optimizer_matches_reference(name, path):
    opt, reference = CASES[name]
    table = EmbeddingTable(TableConfig(name, DIM, initializer=Normal(0.0, 0.5), optimizer=opt, seed=7))
    ids = np.arange(N, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    w0 = _initial(table, ids)
    grads = _gradients(zlib.crc32(name.encode()))
    expected = reference(w0, grads)
    apply_jit = jax.jit(lambda w, g, lr, step: table.apply_gradients(Keys(w), g, learning_rate=lr, step=step))
    words = Keys.from_ids(ids).words
    for step, (lr, g, want) in enumerate(zip(LRS, grads, expected)):
        if path == "host":
            updated, skipped = table.apply_gradients_host(ids, g, learning_rate=lr, step=step)
        else:
            updated, skipped = np.asarray(apply_jit(words, g, np.float32(lr), step))
        assert (updated, skipped) == (N, 0)
        got, found = table.find(ids)
        assert found.all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{name} step {step}")


@pytest.mark.parametrize("name", ["adagrad", "adam", "ftrl", "momentum"])
def test_duplicate_ids_step_once_on_summed_gradient(name):
    """TensorFlow's sparse apply: one step per unique id with the summed gradient."""
    opt, reference = CASES[name]
    table = EmbeddingTable(TableConfig(name, DIM, initializer=Normal(0.0, 0.5), optimizer=opt))
    ids = np.arange(N, dtype=np.uint64)
    w0 = _initial(table, ids)
    grads = _gradients(3)
    expected = reference(w0, grads)
    # Each step's gradient of row i arrives split over three duplicate ids.
    dup_ids = np.concatenate([ids, ids[::-1], ids])
    for lr, g, want in zip(LRS, grads, expected):
        parts = [0.5 * g, 0.25 * g[::-1], 0.25 * g]
        updated, _ = table.apply_gradients_host(dup_ids, np.concatenate(parts).astype(np.float32), learning_rate=lr)
        assert updated == N
        np.testing.assert_allclose(table.find(ids)[0], want, rtol=2e-5, atol=1e-6)
    assert (table.dump()["update_count"] == STEPS).all()


def test_bias_correction_uses_each_rows_own_update_count():
    """A row first updated late gets Adam's first-step update, not a stale one."""
    table = EmbeddingTable(TableConfig("adam", 2, initializer=Normal(0, 0), optimizer=Adam(learning_rate=0.1)))
    for step in range(5):
        table.apply_gradients_host([1], np.ones((1, 2), np.float32), step=step)
    table.apply_gradients_host([2], np.ones((1, 2), np.float32), step=5)
    rows, _ = table.find([2])
    # Adam's first step moves by lr * sign(g) (up to eps).
    np.testing.assert_allclose(rows, [[-0.1, -0.1]], rtol=1e-5)
