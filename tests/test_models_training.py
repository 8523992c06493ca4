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
    out = m({"a": jnp.ones((7, dim)), "b": jnp.ones((7, dim))}, jnp.ones((7, 3)))
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
    feats = [SparseFeature("a", "ids"), SparseFeature("b", "ids")]
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
    counts = dict(zip(d["keys"].tolist(), d["update_count"].tolist()))
    assert counts == {5: 1, 6: 1, 7: 1}
    rows = dict(zip(d["keys"].tolist(), d["values"][:, 0].tolist()))
    # d loss / d row = sigmoid(0) - 1 = -0.5 per occurrence; id 5 appears twice.
    assert rows[5] == pytest.approx(1.0) and rows[6] == pytest.approx(0.5)
