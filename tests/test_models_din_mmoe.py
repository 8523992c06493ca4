"""DIN and MMoE: forward shapes and input checks, DIN's padding mask, and
learning: DIN through the Trainer on a label that only the behaviour
sequence explains, MMoE on two synthetic tasks (a direct optax loop over
pooled inputs) and, with one task, through the Trainer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pytest
from flax import nnx

from monolith_jax.embedding import pool
from monolith_jax.features import DenseFeature, SparseFeature, records_to_batch
from monolith_jax.metrics import auc
from monolith_jax.models import DIN, DCNv2, MMoE
from monolith_jax.sparse import Adagrad, Normal, TableConfig
from monolith_jax.training import Trainer
from tests.test_models_training import learns_the_synthetic_signal

QUIET = dict(out=lambda *a, **k: None)


def _din(normalize=False, n_dense=3, seed=0):
    return DIN("hist", "item", ["user"], 4, n_dense, (8,), (16,), normalize=normalize, rngs=nnx.Rngs(seed))


def _din_inputs(b=7, length=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"hist": jnp.asarray(rng.standard_normal((b, length, 4)), jnp.float32),
            "item": jnp.asarray(rng.standard_normal((b, 4)), jnp.float32),
            "user": jnp.asarray(rng.standard_normal((b, 4)), jnp.float32)}, jnp.ones((b, 3))


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize("normalize", [False, True])
def test_din_forward_shape_and_attention_weights(normalize):
    m = _din(normalize)
    fields, dense = _din_inputs()
    out = m(fields, dense)
    assert out.shape == (7,) and out.dtype == jnp.float32 and jnp.isfinite(out).all()
    w = m.attention_weights(fields["item"], fields["hist"])
    assert w.shape == (7, 5)
    if normalize:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        assert (w >= 0).all()
    interest, query = m.interest(fields)
    np.testing.assert_allclose(interest, jnp.einsum("bl,bld->bd", w, fields["hist"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(query, fields["item"])
    # other features and dense columns reach the output
    assert not np.allclose(m({**fields, "user": fields["user"] + 1.0}, dense), out)
    assert not np.allclose(m(fields, dense + 1.0), out)
    # a behaviour seen twice: unnormalised weights count it twice (the
    # paper's "intensity"), softmax weights give the same weighted mean
    once = fields["hist"][:, :1]
    twice = jnp.concatenate([once, once], axis=1)
    i1, _ = m.interest({**fields, "hist": once})
    i2, _ = m.interest({**fields, "hist": twice})
    np.testing.assert_allclose(i2, i1 if normalize else 2 * i1, rtol=1e-5, atol=1e-6)
    if normalize:
        np.testing.assert_allclose(i1, once[:, 0], rtol=1e-5, atol=1e-6)
    # without other features or dense columns
    bare = DIN("hist", "item", [], 4, rngs=nnx.Rngs(0))
    assert bare({"hist": fields["hist"], "item": fields["item"]}).shape == (7,)


def test_din_refuses_inputs_it_would_misread():
    m = _din()
    fields, dense = _din_inputs()
    with pytest.raises(ValueError, match=r"feature 'hist' gives rows of shape \(7, 4\).*combiner=None"):
        m({**fields, "hist": fields["hist"].sum(1)}, dense)
    with pytest.raises(ValueError, match=r"feature 'item' gives rows of shape \(7, 5, 4\)"):
        m({**fields, "item": fields["hist"]}, dense)
    with pytest.raises(ValueError, match=r"sequence feature 'hist'.*shape \(7, 5, 6\); expected last axis 4"):
        m({**fields, "hist": jnp.ones((7, 5, 6))}, dense)
    with pytest.raises(KeyError, match=r"DIN reads feature 'hist', which no sparse feature provides"):
        m({"item": fields["item"], "user": fields["user"]}, dense)
    with pytest.raises(ValueError, match=r"DIN was built with n_dense=3 but the batch has dense features of "
                                         r"shape \(7, 1\)"):
        m(fields, jnp.ones((7, 1)))
    with pytest.raises(ValueError, match=r"must be different features"):
        DIN("item", "item", [], 4, rngs=nnx.Rngs(0))


def _mmoe(**kw):
    kw = {"tasks": ["click", "like"], **kw}
    return MMoE(["a", "b"], 4, 3, 3, (8,), (6,), rngs=nnx.Rngs(0), **kw)


def test_mmoe_forward_shapes_gates_and_single_task():
    fields, dense = {"a": jnp.ones((7, 4)), "b": -jnp.ones((7, 4))}, jnp.arange(21.0).reshape(7, 3) / 21
    m = _mmoe()
    out = m(fields, dense)
    assert isinstance(out, dict) and list(out) == ["click", "like"]
    assert all(v.shape == (7,) and jnp.isfinite(v).all() for v in out.values())
    assert not np.allclose(out["click"], out["like"])          # a tower and a gate per task
    gates = m.gate_weights(fields, dense)
    assert list(gates) == ["click", "like"] and all(g.shape == (7, 3) for g in gates.values())
    for g in gates.values():
        np.testing.assert_allclose(g.sum(-1), 1.0, rtol=1e-5)
        assert (g > 0).all()
    params = nnx.state(m, nnx.Param)
    assert "click" in params["towers"] and "like" in params["gates"]   # parameters named by task

    one = MMoE(["a", "b"], 4, 3, 3, (8,), (6,), tasks=["ctr"], single_task=True, rngs=nnx.Rngs(0))
    arr = one(fields, dense)
    assert isinstance(arr, jax.Array) and arr.shape == (7,)
    np.testing.assert_array_equal(arr, one.task_logits(fields, dense)["ctr"])
    # without single_task one task is still a dict
    assert list(MMoE(["a"], 4, tasks=["ctr"], rngs=nnx.Rngs(0))({"a": fields["a"]})) == ["ctr"]


def test_mmoe_refuses_bad_tasks_and_inputs():
    with pytest.raises(ValueError, match=r"single_task=True returns one task's logits"):
        _mmoe(single_task=True)
    with pytest.raises(TypeError, match=r"tasks must be a sequence of task names, got the string 'ctr'"):
        _mmoe(tasks="ctr")
    for bad in ([], ["x", "x"], ["x", ""]):
        with pytest.raises(ValueError, match=r"tasks must be distinct non-empty names"):
            _mmoe(tasks=bad)
    m = _mmoe()
    with pytest.raises(ValueError, match=r"feature 'a' gives rows of shape \(7, 2, 4\).*combiner=None"):
        m({"a": jnp.ones((7, 2, 4)), "b": jnp.ones((7, 4))}, jnp.ones((7, 3)))
    with pytest.raises(ValueError, match=r"MMoE was built with n_dense=3"):
        m({"a": jnp.ones((7, 4)), "b": jnp.ones((7, 4))}, None)


# ------------------------------------------------------------ DIN padding
@pytest.mark.parametrize("normalize", [False, True])
def test_din_output_ignores_padding_appended_or_all_padding(normalize):
    """Through `pool` (what the trainer gives a model), with padding rows
    that hold garbage: appending padding positions does not change the
    output, and all-padding rows are finite, with finite gradients."""
    m = _din(normalize)
    fields, dense = _din_inputs(b=6, length=5, seed=1)
    rng = np.random.default_rng(2)
    rows = jnp.asarray(rng.standard_normal((6, 5, 4)), jnp.float32)      # nonzero at every position
    lengths = jnp.array([5, 3, 0, 1, 0, 4])
    out = m({**fields, "hist": pool(rows, lengths, None)}, dense)
    assert jnp.isfinite(out).all()
    for extra in (1, 7):
        more = jnp.concatenate([rows, jnp.asarray(rng.standard_normal((6, extra, 4)), jnp.float32)], axis=1)
        np.testing.assert_allclose(m({**fields, "hist": pool(more, lengths, None)}, dense), out,
                                   rtol=1e-5, atol=1e-6)
    # other garbage in the padding positions: the same output
    garbage = jnp.where((jnp.arange(5)[None, :] < lengths[:, None])[..., None], rows, 100.0)
    np.testing.assert_allclose(m({**fields, "hist": pool(garbage, lengths, None)}, dense), out, rtol=1e-5, atol=1e-6)
    # an all-padding row's interest is zero: its output is the model's on a zero interest vector
    interest, _ = m.interest({**fields, "hist": pool(rows, lengths, None)})
    np.testing.assert_array_equal(interest[2], 0.0)
    np.testing.assert_array_equal(interest[4], 0.0)
    w = m.attention_weights(fields["item"], pool(rows, lengths, None))
    assert (w[2] == 0).all() and (w[3, 1:] == 0).all() and (w[1, 3:] == 0).all()
    np.testing.assert_allclose(out[2], m({**fields, "hist": jnp.zeros((6, 1, 4))}, dense)[2], rtol=1e-6)

    # every row all padding: finite output and finite gradients
    none = jnp.zeros(6, jnp.int32)

    def loss(model, rows):
        return model({**fields, "hist": pool(rows, none, None)}, dense).sum()

    g_model, g_rows = nnx.grad(loss, argnums=(0, 1))(m, rows)
    assert jnp.isfinite(loss(m, rows))
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves(nnx.state(g_model, nnx.Param)))
    assert jnp.isfinite(g_rows).all() and (g_rows == 0).all()


# ------------------------------------------------------------ DIN learning
SEQ_LEN = 10
DIN_FEATS = [SparseFeature("hist", "ids", combiner=None, max_len=SEQ_LEN, id_space="item"),
             SparseFeature("item", "ids"), SparseFeature("user", "ids")]
DIN_DENSE = [DenseFeature("x")]


def _din_records(n, seed=0, n_items=300, n_users=500):
    """Each user's history holds 0..SEQ_LEN distinct items; the target is one of
    them (half the rows with a history) or an item not in it. The label is 1
    with probability sigmoid(+-3 + 0.5 x): + when the target is in the history.
    Each item is a target about as often either way, so the item alone says
    nothing."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, SEQ_LEN + 1, n)
    slots = np.arange(SEQ_LEN)[None, :] < lengths[:, None]          # (n, SEQ_LEN): the history's positions

    # distinct items per history: draw, then redraw the rows holding a repeat
    hist = rng.integers(0, n_items, (n, SEQ_LEN))
    while True:
        s = np.sort(np.where(slots, hist, -1 - np.arange(SEQ_LEN)[None, :]), axis=1)
        again = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if again.size == 0:
            break
        hist[again] = rng.integers(0, n_items, (again.size, SEQ_LEN))
    pos = (rng.random(n) < 0.5) & (lengths > 0)
    # a target in the history: one of its items; else an item not in it
    item = hist[np.arange(n), (rng.random(n) * np.maximum(lengths, 1)).astype(np.int64)]
    neg = np.flatnonzero(~pos)
    while neg.size:
        item[neg] = rng.integers(0, n_items, neg.size)
        neg = neg[((hist[neg] == item[neg, None]) & slots[neg]).any(axis=1)]
    hist = [h[:k] for h, k in zip(hist, lengths)]
    x = rng.standard_normal(n).astype(np.float32)
    p = 1 / (1 + np.exp(-(3.0 * (2 * pos - 1) + 0.5 * x)))
    return pa.table({"hist": pa.array([h.tolist() for h in hist], pa.list_(pa.int64())), "item": item,
                     "user": rng.integers(0, n_users, n), "x": x,
                     "label": (rng.random(n) < p).astype(np.float32)}), pos


def _din_trainer(model, feats=DIN_FEATS):
    return Trainer(model, [TableConfig("ids", 8, Normal(0, 0.1), Adagrad(0.05))], feats, DIN_DENSE,
                   optax.adam(3e-3), **QUIET)


DIN_ROWS, DIN_BATCH = 70_000, 500


@functools.lru_cache(maxsize=None)
def _din_data():
    return _din_records(DIN_ROWS)


def _din_batches(feats) -> list:
    data, _ = _din_data()
    return [records_to_batch(data.slice(s, DIN_BATCH), feats, DIN_DENSE, "label", DIN_BATCH)
            for s in range(0, DIN_ROWS, DIN_BATCH)]


@functools.lru_cache(maxsize=None)
def _din_baseline_auc() -> float:
    """The same job without the sequence (only x explains the label), trained
    as DIN is: what DIN must beat. One for both DIN variants."""
    no_seq = DIN_FEATS[1:]
    base = _din_trainer(DCNv2(["item", "user"], 8, 1, 1, (32,), rngs=nnx.Rngs(0)), no_seq)
    every = _din_batches(no_seq)
    base.fit(every[:120], epochs=3)
    return base.evaluate(every[120:])["auc"]


@pytest.mark.parametrize("normalize", [False, True])
def test_din_learns_whether_the_target_is_in_the_history(normalize):
    data, pos = _din_data()
    size = DIN_BATCH
    every = _din_batches(DIN_FEATS)
    train, test = every[:120], every[120:]
    make = lambda seed: DIN("hist", "item", ["user"], 8, 1, (32,), (32,), normalize=normalize, rngs=nnx.Rngs(seed))
    din = _din_trainer(make(0))
    before = din.evaluate(test)
    din.fit(train, epochs=3)
    after = din.evaluate(test)
    base_auc = _din_baseline_auc()
    print(f"DIN(normalize={normalize}) auc {after['auc']:.4f} (before {before['auc']:.4f}); "
          f"without the sequence {base_auc:.4f}")
    assert after["auc"] > 0.8 and after["auc"] > base_auc + 0.25
    assert after["logloss"] < before["logloss"] - 0.15

    # attention does the work: for held-out rows whose target is in the
    # history, the target's own position gets the largest weight (in
    # magnitude: unnormalised weights may take either sign)
    batch, first = test[0], 120 * size
    fields = din.pooling(din.collection.split(din.collection.find_host(batch)), batch.lengths)
    w = np.abs(np.asarray(din.model().attention_weights(fields["item"], fields["hist"])))
    hist, item = data.column("hist").to_pylist()[first:first + size], data.column("item").to_numpy()[first:]
    rows = np.flatnonzero(pos[first:first + size])
    hits = [np.argmax(w[r, :len(hist[r])]) == hist[r].index(item[r]) for r in rows]
    print(f"target position weighted most in {np.mean(hits):.3f} of {len(rows)} rows")
    assert np.mean(hits) > 0.85

    # appending padding ids through the whole path: a trainer reading the
    # sequence with max_len + 6 and the same state predicts the same
    longer = [SparseFeature("hist", "ids", combiner=None, max_len=SEQ_LEN + 6, id_space="item"), *DIN_FEATS[1:]]
    wide = _din_trainer(make(5), longer)
    wide.load_state_dict(din.state_dict())
    probe = records_to_batch(data.slice(first, size), longer, DIN_DENSE, "label", size)
    assert probe.ids["hist"].words.shape[1] == SEQ_LEN + 6
    np.testing.assert_allclose(wide.predict(probe), din.predict(batch), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------- MMoE learning
def _two_tasks(n, seed=0):
    """Pooled inputs a, b (n, 8) and dense (n, 2); click and like share a
    factor and differ in another (click: +, like: -), and like has a
    nonlinear part of its own."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, 8)).astype(np.float32), rng.standard_normal((n, 8)).astype(np.float32)
    dense = rng.standard_normal((n, 2)).astype(np.float32)
    u, v = np.linspace(-1, 1, 8) / 1.3, np.cos(np.arange(8.0)) / 1.6
    shared, own = a @ u + dense[:, 0], b @ v
    logits = {"click": 1.5 * shared + 1.5 * own, "like": 1.5 * shared - 1.5 * own + 2.0 * (np.abs(dense[:, 1]) - 0.8)}
    labels = {t: (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32) for t, z in logits.items()}
    return {"a": a, "b": b}, dense, labels


def test_mmoe_learns_two_tasks():
    fields, dense, labels = _two_tasks(24_000)
    train, test = slice(0, 20_000), slice(20_000, None)
    model = MMoE(["a", "b"], 8, 2, 4, (32,), (16,), tasks=["click", "like"], rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(model, f, d, y):
        out = model(f, d)
        return sum(optax.sigmoid_binary_cross_entropy(out[t], y[t]).mean() for t in model.tasks)

    @nnx.jit
    def step(model, opt, f, d, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, f, d, y)
        opt.update(model, grads)
        return loss

    def held_out():
        out = nnx.jit(lambda m, f, d: m(f, d))(model, {k: v[test] for k, v in fields.items()}, dense[test])
        return {t: np.asarray(out[t]) for t in model.tasks}

    before = held_out()
    losses = []
    for epoch in range(4):
        for s in range(0, 20_000, 500):
            b = slice(s, s + 500)
            losses.append(float(step(model, opt, {k: v[b] for k, v in fields.items()}, dense[b],
                                     {t: y[b] for t, y in labels.items()})))
    after = held_out()
    aucs = {t: auc(labels[t][test], after[t]) for t in model.tasks}
    print("MMoE held-out auc", {t: round(x, 4) for t, x in aucs.items()},
          "before", {t: round(auc(labels[t][test], before[t]), 4) for t in model.tasks})
    assert np.mean(losses[-40:]) < np.mean(losses[:40]) - 0.2
    assert aucs["click"] > 0.8 and aucs["like"] > 0.8
    # each task's head predicts its own task, not the other's
    assert aucs["click"] > auc(labels["click"][test], after["like"]) + 0.15
    assert aucs["like"] > auc(labels["like"][test], after["click"]) + 0.15


def test_single_task_mmoe_trains_through_the_trainer():
    feats, dense = [SparseFeature("user", "ids"), SparseFeature("item", "ids")], [DenseFeature("x")]
    model = MMoE(["user", "item"], 8, 1, 3, (32,), (16,), tasks=["ctr"], single_task=True, rngs=nnx.Rngs(0))
    tr = Trainer(model, [TableConfig("ids", 8, Normal(0, 0.01), Adagrad(0.05))], feats, dense,
                 optax.adam(3e-3), **QUIET)
    before, after = learns_the_synthetic_signal(tr, feats, dense)
    print(f"single-task MMoE auc {after['auc']:.4f} (before {before['auc']:.4f})")
    assert "towers/ctr/out/kernel" in tr.state_dict(tables=False)["params"]
