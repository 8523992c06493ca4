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


def _schedule(lrs):
    return lambda count: jnp.asarray(lrs, jnp.float32)[count]


def _rowwise_adagrad_ref(cfg):
    def run(w, grads, lrs=LRS):
        acc = np.full((w.shape[0], 1), cfg.initial_accumulator_value, np.float32)
        out = []
        for lr, g in zip(lrs, grads):
            acc = acc + np.mean(g * g, axis=1, keepdims=True)
            w = w - np.float32(lr) * g / (np.sqrt(acc) + np.float32(cfg.eps))
            out.append(w)
        return out
    return run


def _ftrl_ref(cfg):
    # TensorFlow's ApplyFtrlV2 (without l2_shrinkage), in float64.
    def run(w, grads, lrs=LRS, z=None):
        w = w.astype(np.float64)
        z = np.zeros_like(w) if z is None else z.astype(np.float64)
        n = np.full_like(w, cfg.initial_accumulator_value)
        p = cfg.learning_rate_power
        out = []
        for lr, g in zip(lrs, grads):
            g = g.astype(np.float64)
            n_new = n + g * g
            sigma = (n_new ** -p - n ** -p) / lr
            z = z + g - sigma * w
            n = n_new
            quadratic = (cfg.beta + n ** -p) / lr + 2 * cfg.l2
            w = np.where(np.abs(z) <= cfg.l1, 0.0, (np.sign(z) * cfg.l1 - z) / quadratic)
            with np.errstate(over="ignore"):
                out.append(w.astype(np.float32))
        return out
    return run


def _optax_ref(make):
    """make(learning rate schedule) -> the optax transformation."""
    def run(w, grads, lrs=LRS):
        tx = make(_schedule(lrs))
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
    "sgd": (SGD(), _optax_ref(lambda lr: optax.sgd(lr))),
    "momentum": (Momentum(momentum=0.8), _optax_ref(lambda lr: optax.sgd(lr, momentum=0.8))),
    "nesterov": (Momentum(momentum=0.8, nesterov=True),
                 _optax_ref(lambda lr: optax.sgd(lr, momentum=0.8, nesterov=True))),
    "adagrad": (Adagrad(initial_accumulator_value=0.1, eps=1e-7),
                _optax_ref(lambda lr: optax.adagrad(lr, initial_accumulator_value=0.1, eps=1e-7))),
    "rowwise_adagrad": (RowwiseAdagrad(initial_accumulator_value=0.05),
                        _rowwise_adagrad_ref(RowwiseAdagrad(initial_accumulator_value=0.05))),
    "adam": (Adam(b1=0.9, b2=0.99, eps=1e-6), _optax_ref(lambda lr: optax.adam(lr, b1=0.9, b2=0.99, eps=1e-6))),
    "adam_eps_root": (Adam(eps_root=1e-8),
                      _optax_ref(lambda lr: optax.adam(lr, eps_root=1e-8))),
    "amsgrad": (AMSGrad(b1=0.8, b2=0.95, eps=1e-6),
                _optax_ref(lambda lr: optax.amsgrad(lr, b1=0.8, b2=0.95, eps=1e-6))),
    "rmsprop": (RMSProp(decay=0.8, eps=1e-6),
                _optax_ref(lambda lr: optax.rmsprop(lr, decay=0.8, eps=1e-6))),
    "rmsprop_initial_scale": (RMSProp(decay=0.9, eps=1e-8, initial_scale=0.5),
                              _optax_ref(lambda lr: optax.rmsprop(lr, decay=0.9, eps=1e-8, initial_scale=0.5))),
    "ftrl": (FTRL(l1=0.001, l2=0.01, beta=0.1), _ftrl_ref(FTRL(l1=0.001, l2=0.01, beta=0.1))),
    "ftrl_power": (FTRL(learning_rate_power=-0.6, l1=0.0005),
                   _ftrl_ref(FTRL(learning_rate_power=-0.6, l1=0.0005))),
}
# Rules that keep squares of the gradient in their slots.
SQUARES = {"adagrad", "rowwise_adagrad", "adam", "adam_eps_root", "amsgrad", "rmsprop", "rmsprop_initial_scale",
           "ftrl", "ftrl_power"}


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


BIG_LR = 1e37        # finite in float32; a step of about this size
NEAR_MAX = 3.39e38   # float32's largest finite value is 3.4028e38


def _rows(dump, ids):
    where = {int(k): i for i, k in enumerate(dump["keys"])}
    return np.array([where[int(k)] for k in ids])


def _one_step(table, ids, grads, lr, path):
    if path == "host":
        return table.apply_gradients_host(ids, grads, learning_rate=lr, step=9)
    step = jax.jit(lambda w, g, lr: table.apply_gradients(Keys(w), g, learning_rate=lr, step=9))
    return tuple(int(x) for x in np.asarray(step(Keys.from_ids(ids).words, grads, np.float32(lr))))


def _check_skipped_rows_kept(table, before, ids, bad, path, step_result):
    """Rows `ids[bad]` are exactly as in `before` (values, slots, metadata,
    no touched mark); counted as skipped in the result and the stats."""
    assert step_result == (len(ids) - bad.sum(), bad.sum())
    assert table.stats()["nonfinite_skipped"] == bad.sum()
    after = table.dump()
    b, a = _rows(before, ids[bad]), _rows(after, ids[bad])
    for field in ("values", "slots", "last_update", "update_count"):
        np.testing.assert_array_equal(after[field][a], before[field][b], err_msg=field)
    assert np.isfinite(after["values"]).all() and np.isfinite(after["slots"]).all()
    touched, _ = table.drain_touched()
    assert sorted(touched.tolist()) == sorted(ids[~bad].tolist())


@pytest.mark.parametrize("path", ["host", "jit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_step_whose_result_would_overflow_leaves_its_row_unchanged(name, path):
    """A finite gradient times a large learning rate: rows whose new values
    (or slots) would overflow keep their state and are counted; the other
    rows of the same call step as the reference does."""
    opt, reference = CASES[name]
    table = EmbeddingTable(TableConfig(name, DIM, initializer=Normal(0.0, 0.5), optimizer=opt, seed=7))
    ids = np.arange(N, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    bad = np.arange(N) % 3 == 0
    w0 = _initial(table, ids)
    # The bad rows sit next to float32's limit, where this step takes them past it.
    state = table.dump()
    rows = _rows(state, ids[bad])
    state["values"][rows] = -NEAR_MAX
    if name.startswith("ftrl"):  # FTRL's weights come from its linear slot z
        state["slots"][rows, :DIM] = NEAR_MAX
    table.load(state)
    table.drain_touched()
    before = table.dump()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    grads = (0.01 * rng.standard_normal((N, DIM))).astype(np.float32)
    grads[bad] = 1.0
    # The reference agrees that the bad rows' step overflows ...
    kwargs = {"z": np.full((bad.sum(), DIM), NEAR_MAX)} if name.startswith("ftrl") else {}
    with np.errstate(over="ignore", invalid="ignore"):
        ref_bad = reference(np.full((bad.sum(), DIM), -NEAR_MAX, np.float32), [grads[bad]], [BIG_LR], **kwargs)[0]
    assert not np.isfinite(ref_bad).any()
    result = _one_step(table, ids, grads, BIG_LR, path)
    _check_skipped_rows_kept(table, before, ids, bad, path, result)
    # ... and the good rows step as it does.
    want = reference(w0[~bad], [grads[~bad]], [BIG_LR])[0]
    got, found = table.find(ids[~bad])
    assert found.all() and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (table.dump()["update_count"][_rows(table.dump(), ids[~bad])] == 1).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_gradient_whose_square_overflows_never_reaches_the_slots(name):
    """g = 3e19 is finite but g^2 is not: rules that keep squares would
    write Inf into the slots (and then never move the row again); they skip
    the row instead. SGD and momentum step it (their results are finite)."""
    opt, reference = CASES[name]
    table = EmbeddingTable(TableConfig(name, DIM, initializer=Normal(0.0, 0.5), optimizer=opt, seed=3))
    ids = np.arange(6, dtype=np.uint64)
    bad = np.array([False, True, False, False, True, False])
    w0 = _initial(table, ids)
    table.drain_touched()
    before = table.dump()
    grads = np.full((6, DIM), 0.1, np.float32)
    grads[bad] = 3e19
    result = table.apply_gradients_host(ids, grads, learning_rate=0.05, step=9)
    if name in SQUARES:
        _check_skipped_rows_kept(table, before, ids, bad, "host", result)
        np.testing.assert_allclose(table.find(ids[~bad])[0], reference(w0[~bad], [grads[~bad]], [0.05])[0],
                                   rtol=1e-5, atol=1e-7)
    else:
        assert result == (6, 0)
        np.testing.assert_allclose(table.find(ids)[0], reference(w0, [grads], [0.05])[0], rtol=1e-5)
