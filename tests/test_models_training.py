"""Models' forward shapes, pooling, and training that lowers the loss on a
synthetic set with a known signal; shared tables step once per id."""

import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pytest
from flax import nnx

from monolith_jax.embedding import pool
from monolith_jax.features import DenseFeature, SparseFeature, records_to_batch
from monolith_jax.models import DCNv2, DeepFM, TwoTower, WideAndDeep
from monolith_jax.sparse import SGD, Adagrad, Constant, Normal, TableConfig
from monolith_jax.training import Trainer


def test_pooling_combiners_and_masks():
    rows = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    lengths = jnp.array([2, 0])
    np.testing.assert_allclose(pool(rows, lengths, "sum"), [[2, 4], [0, 0]])
    np.testing.assert_allclose(pool(rows, lengths, "mean"), [[1, 2], [0, 0]])
    np.testing.assert_allclose(pool(rows, lengths, "sqrtn"), [[2 / np.sqrt(2), 4 / np.sqrt(2)], [0, 0]])
    seq = pool(rows, lengths, None)
    assert seq.shape == (2, 3, 2) and float(jnp.abs(seq[0, 2]).sum()) == 0 and float(jnp.abs(seq[1]).sum()) == 0


@pytest.mark.parametrize("make, dim", [
    (lambda r: DeepFM(["a", "b"], 4, 3, (8,), rngs=r), 5),
    (lambda r: WideAndDeep(["a", "b"], 4, 3, (8,), rngs=r), 5),
    (lambda r: DCNv2(["a", "b"], 4, 3, 2, (8,), rngs=r), 4),
    (lambda r: TwoTower(["a"], ["b"], 4, (8,), 6, rngs=r), 4),
])
def test_model_forward_shapes(make, dim):
    m = make(nnx.Rngs(0))
    out = m({"a": jnp.ones((7, dim)), "b": jnp.ones((7, dim))}, None if isinstance(m, TwoTower) else jnp.ones((7, 3)))
    assert out.shape == (7,) and jnp.isfinite(out).all()


def _synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, 2000, n), rng.integers(0, 300, n)
    tu, ti = rng.standard_normal(2000), rng.standard_normal(300)
    x = rng.standard_normal(n).astype(np.float32)
    p = 1 / (1 + np.exp(-(1.5 * tu[u] + 1.5 * ti[i] + x)))
    return pa.table({"user": u, "item": i, "x": x, "label": (rng.random(n) < p).astype(np.float32)})


@pytest.mark.parametrize("model_name", ["deepfm", "dcn", "wide_deep"])
def test_training_lowers_the_loss_and_learns_the_signal(model_name, tmp_path):
    feats = [SparseFeature("user", "ids"), SparseFeature("item", "ids")]
    dense = [DenseFeature("x")]
    wide = model_name in ("deepfm", "wide_deep")
    tables = [TableConfig("ids", 9 if wide else 8, Normal(0, 0.01), Adagrad(0.05))]
    r = nnx.Rngs(0)
    model = {"deepfm": lambda: DeepFM(["user", "item"], 8, 1, (32, 32), rngs=r),
             "dcn": lambda: DCNv2(["user", "item"], 8, 1, 2, (32,), rngs=r),
             "wide_deep": lambda: WideAndDeep(["user", "item"], 8, 1, (32,), rngs=r)}[model_name]()
    metrics = tmp_path / "metrics.jsonl"
    tr = Trainer(model, tables, feats, dense, optax.adam(3e-3), metrics_path=str(metrics), log_every=20,
                 out=lambda *a, **k: None)
    data = _synthetic(120_000)
    batches = [records_to_batch(data.slice(s, 1000), feats, dense, "label", 1000) for s in range(0, 100_000, 1000)]
    test = [records_to_batch(data.slice(s, 1000), feats, dense, "label", 1000) for s in range(100_000, 120_000, 1000)]
    before = tr.evaluate(test)
    fit = tr.fit(batches * 2)
    after = tr.evaluate(test)
    assert fit["steps"] == 200 and fit["examples"] == 200_000
    assert after["logloss"] < before["logloss"] - 0.05
    assert after["auc"] > 0.75
    assert 0.8 < after["calibration"] < 1.2
    lines = metrics.read_text().splitlines()
    assert len(lines) >= 12 and '"event": "eval"' in lines[-1]
    # Evaluation created no rows for ids that never trained.
    assert len(tr.tables["ids"]) <= 2300


def test_features_sharing_a_table_step_each_id_once():
    feats = [SparseFeature("a", "ids", id_space="shared"), SparseFeature("b", "ids", id_space="shared")]
    tables = [TableConfig("ids", 3, Constant(0.0), SGD(1.0))]

    class Sum(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(()))

        def __call__(self, fields, dense):
            return self.w[...] * (fields["a"].sum(-1) + fields["b"].sum(-1))

    tr = Trainer(Sum(), tables, feats, optimizer=optax.sgd(0.0), out=lambda *a, **k: None)
    batch = records_to_batch(pa.table({"a": [5, 6], "b": [5, 7], "label": [1.0, 1.0]}), feats)
    tr.train_step(batch)
    d = tr.tables["ids"].dump()
    k5, k6, k7 = feats[0].keys(np.array([5, 6, 7], np.uint64)).tolist()
    counts = dict(zip(d["keys"].tolist(), d["update_count"].tolist()))
    assert counts == {k5: 1, k6: 1, k7: 1}
    rows = dict(zip(d["keys"].tolist(), d["values"][:, 0].tolist()))
    # d loss / d row = sigmoid(0) - 1 = -0.5 per occurrence; id 5 appears twice.
    assert rows[k5] == pytest.approx(1.0) and rows[k6] == pytest.approx(0.5)


# ------------------------------------------------------------ small jobs
FEATS = [SparseFeature("user", "ids"), SparseFeature("item", "ids")]
DENSE = [DenseFeature("x")]
QUIET = dict(out=lambda *a, **k: None)


def _small_trainer(seed=0, model=None, dim=5, features=FEATS, dense=DENSE, **kwargs):
    model = model or DeepFM(["user", "item"], 4, len(dense), (8,), rngs=nnx.Rngs(seed))
    kwargs = {**QUIET, **kwargs}
    return Trainer(model, [TableConfig("ids", dim, Normal(0, 0.05), Adagrad(0.05))], features, dense,
                   optax.adam(3e-3), **kwargs)


def _small_batches(n=2000, size=250, seed=0, features=FEATS, dense=DENSE):
    data = _synthetic(n, seed)
    return [records_to_batch(data.slice(s, size), features, dense, "label", size) for s in range(0, n, size)]


@pytest.mark.parametrize("make", [
    lambda r: DeepFM(["user", "item"], 4, 1, (8,), rngs=r),
    lambda r: WideAndDeep(["user", "item"], 4, 1, (8,), rngs=r),
])
def test_wide_models_refuse_a_table_of_another_width(make):
    for dim in (4, 8):   # embed_dim and something else: both would train silently
        tr = _small_trainer(model=make(nnx.Rngs(0)), dim=dim)
        with pytest.raises(ValueError, match=rf"feature 'user' reads a table with rows of width {dim}; "
                                             r"\w+ needs rows of width embed_dim \+ 1 = 5"):
            tr.train_step(_small_batches()[0])
        assert tr.step_count == 0 and len(tr.tables["ids"]) == 0


@pytest.mark.parametrize("make, dim", [
    (lambda r: DeepFM(["user", "item"], 4, 0, (8,), rngs=r), 5),
    (lambda r: WideAndDeep(["user", "item"], 4, 0, (8,), rngs=r), 5),
    (lambda r: DCNv2(["user", "item"], 4, 0, 1, (8,), rngs=r), 4),
    (lambda r: TwoTower(["user"], ["item"], 4, (8,), 6, rngs=r), 4),
])
def test_models_refuse_sequence_features_other_widths_and_unread_inputs(make, dim):
    batch_of = lambda feats, dense=(): _small_batches(500, 250, features=feats, dense=dense)[0]
    seq = [SparseFeature("user", "ids", combiner=None, max_len=3), SparseFeature("item", "ids")]
    tr = _small_trainer(model=make(nnx.Rngs(0)), dim=dim, features=seq, dense=())
    with pytest.raises(ValueError, match=r"feature 'user' gives rows of shape \(250, 3, \d\).*combiner=None"):
        tr.train_step(batch_of(seq))
    tr = _small_trainer(model=make(nnx.Rngs(0)), dim=dim + 2, dense=())
    with pytest.raises(ValueError, match=rf"feature 'user' reads a table with rows of width {dim + 2}"):
        tr.train_step(batch_of(FEATS))
    # dense features the model was not built to read would be ignored: refused
    tr = _small_trainer(model=make(nnx.Rngs(0)), dim=dim, dense=DENSE)
    with pytest.raises(ValueError, match=r"dense features of shape \(250, 1\).*ignored"):
        tr.train_step(batch_of(FEATS, DENSE))
    # a field no feature provides
    other = [SparseFeature("user", "ids"), SparseFeature("movie", "ids", column="item")]
    tr = _small_trainer(model=make(nnx.Rngs(0)), dim=dim, features=other, dense=())
    with pytest.raises(KeyError, match=r"reads feature 'item', which no sparse feature provides"):
        tr.train_step(batch_of(other))


def test_a_model_built_for_dense_features_refuses_a_batch_without_them():
    tr = _small_trainer(model=DCNv2(["user", "item"], 4, 2, 1, (8,), rngs=nnx.Rngs(0)), dim=4, dense=DENSE)
    with pytest.raises(ValueError, match=r"DCNv2 was built with n_dense=2 but the batch has dense features of "
                                         r"shape \(250, 1\)"):
        tr.train_step(_small_batches()[0])
