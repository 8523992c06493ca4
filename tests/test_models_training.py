"""Models' forward shapes, pooling, and training that lowers the loss on a
synthetic set with a known signal; shared tables step once per id."""

import json
import re

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


def learns_the_synthetic_signal(tr, feats, dense) -> tuple[dict, dict]:
    """Two passes over 100,000 synthetic examples; the loss falls, the AUC
    on 20,000 held out passes 0.75, calibrated. (before, after) evaluations."""
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
    return before, after


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
    learns_the_synthetic_signal(tr, feats, dense)
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


class _Logits(nnx.Module):
    """logit = <w, [user row, item row, x]> + b, returned in `shape` form."""

    def __init__(self, shape="b", dim=4):
        self.w = nnx.Param(0.1 * jnp.ones((2 * dim + 1,)))
        self.b = nnx.Param(jnp.zeros(()))
        self.shape = shape

    def __call__(self, fields, dense):
        z = jnp.concatenate([fields["user"], fields["item"], dense], axis=-1) @ self.w[...] + self.b[...]
        return {"b": z, "b1": z[:, None], "b2": jnp.stack([z, z], axis=1), "bb": z[:, None] + z[None, :],
                "scalar": z.sum(), "int": z.astype(jnp.int32)}[self.shape]


def test_logits_of_shape_b1_train_exactly_as_b():
    batches = _small_batches()
    a = _small_trainer(model=_Logits("b"), dim=4)
    b = _small_trainer(model=_Logits("b1"), dim=4)
    fa, fb = a.fit(batches), b.fit(batches)
    assert fa["loss"] == pytest.approx(fb["loss"], rel=1e-6)
    np.testing.assert_allclose(a.predict(batches[0]), b.predict(batches[0]), rtol=1e-6)
    assert b.predict(batches[0]).shape == (250,)
    assert b.evaluate(batches)["auc"] > 0.6


@pytest.mark.parametrize("shape, returned", [("b2", r"\(250, 2\)"), ("bb", r"\(250, 250\)"), ("scalar", r"\(\)")])
def test_other_logit_shapes_are_refused_at_the_first_step(shape, returned):
    tr = _small_trainer(model=_Logits(shape), dim=4)
    batch = _small_batches()[0]
    message = rf"_Logits returned logits of shape {returned}; expected \(250,\) .*or \(250, 1\)"
    with pytest.raises(ValueError, match=message):
        tr.train_step(batch)
    assert tr.step_count == 0 and len(tr.tables["ids"]) == 0      # nothing ran
    with pytest.raises(ValueError, match=message):
        tr.predict(batch)
    with pytest.raises(ValueError, match=message):
        tr.fit([batch])
    with pytest.raises(TypeError, match="_Logits returned logits of dtype int32"):
        _small_trainer(model=_Logits("int"), dim=4).train_step(batch)


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


# ------------------------------------------------------------------- fit
def test_fit_epochs_over_a_list_or_a_function_with_validation(tmp_path):
    batches, val = _small_batches(2000), _small_batches(1000, seed=1)
    lines = []
    metrics = tmp_path / "m.jsonl"
    tr = _small_trainer(out=lines.append, log_every=0, metrics_path=str(metrics))
    s = tr.fit(batches, epochs=3, validation=val)
    assert s["steps"] == 24 and s["examples"] == 6000 and tr.step_count == 24
    assert [e["epoch"] for e in s["epochs"]] == [1, 2, 3] and all(e["steps"] == 8 for e in s["epochs"])
    aucs = [e["validation"]["auc"] for e in s["epochs"]]
    assert aucs[-1] > aucs[0] and s["epochs"][-1]["validation"]["examples"] == 1000
    events = [json.loads(x) for x in metrics.read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and epochs[2]["validation"]["auc"] == aucs[2]
    assert events[-1]["event"] == "fit" and events[-1]["steps"] == 24
    assert lines == []                                           # log_every=0: quiet

    calls = []

    def make():
        calls.append(1)
        return iter(batches)

    tr2 = _small_trainer(log_every=0)
    s2 = tr2.fit(make, epochs=3, validation=lambda: iter(val))
    assert len(calls) == 3 and s2["steps"] == 24
    # the same batches in the same order train the same model
    np.testing.assert_allclose([e["validation"]["auc"] for e in s2["epochs"]], aucs, rtol=1e-6)

    # max_steps counts across epochs; no batch past it is drawn
    drawn = []

    def counting():
        for b in batches:
            drawn.append(1)
            yield b

    s3 = _small_trainer(log_every=0).fit(counting, epochs=3, max_steps=10)
    assert s3["steps"] == 10 and [e["steps"] for e in s3["epochs"]] == [8, 2] and len(drawn) == 10


def test_fit_refuses_epochs_over_a_one_shot_iterator_and_an_exhausted_function():
    batches = _small_batches(1000)
    tr = _small_trainer()
    with pytest.raises(ValueError, match=r"fit\(epochs=2\): batches is a one-shot iterator \(generator\).*"
                                         r"lambda: iter_batches"):
        tr.fit((b for b in batches), epochs=2)
    with pytest.raises(ValueError, match=r"validation is a one-shot iterator"):
        tr.fit(batches, epochs=2, validation=iter(batches))
    assert tr.step_count == 0                                    # refused before training
    once = iter(batches)
    with pytest.raises(ValueError, match=r"epoch 2 got no batches"):
        tr.fit(lambda: once, epochs=2)
    with pytest.raises(TypeError, match=r"batches must be an iterable of SparseBatches or a function"):
        tr.fit(batches[0])
    with pytest.raises(ValueError, match=r"epochs must be an int >= 1"):
        tr.fit(batches, epochs=0)
    # one pass over a generator, as before
    assert _small_trainer().fit(b for b in batches)["steps"] == 4


def test_fit_prints_from_the_first_step_then_every_log_every_steps():
    lines = []
    tr = _small_trainer(out=lines.append, log_every=3, log_every_s=1e9)
    tr.fit(_small_batches(2000))                                  # 8 steps
    assert len(lines) == 3
    assert re.match(r"step +1  first step compiled and ran in \d+\.\d+ s  loss \d\.\d{4}$", lines[0]), lines[0]
    assert re.match(r"step +3 +750 examples .* ex/s  loss \d\.\d{4}$", lines[1]) and "step       6" in lines[2]
    lines.clear()
    tr.fit(_small_batches(500))                                   # compiled already
    assert "first step ran in" in lines[0] and "compiled" not in lines[0]
    # or every few seconds, whichever comes first
    lines.clear()
    _small_trainer(out=lines.append, log_every=10**6, log_every_s=1e-9).fit(_small_batches(1000))
    assert len(lines) == 4
    # epochs: a line per epoch
    lines.clear()
    _small_trainer(out=lines.append, log_every=100, log_every_s=1e9).fit(_small_batches(500), epochs=2)
    assert [x.split("  ")[0] for x in lines] == ["epoch 1/2", "epoch 1/2", "epoch 2/2"]
    assert "2 steps  500 examples  loss" in lines[1]


# ----------------------------------------------------------------- state
def _rows(trainer):
    d = trainer.tables["ids"].dump()
    order = np.argsort(d["keys"])
    return {k: v[order] for k, v in d.items() if isinstance(v, np.ndarray) and v.shape[:1] == d["keys"].shape}


def test_state_dict_copies_and_restores_the_whole_training_state():
    batches, probe = _small_batches(2000), _small_batches(500, seed=3)
    tr = _small_trainer()
    tr.fit(batches[:4])
    state = tr.state_dict()
    assert state["step_count"] == 4 and state["examples"] == 1000
    assert all(isinstance(v, np.ndarray) for v in [*state["params"].values(), *state["opt_state"].values()])
    assert "deep/layers/0/kernel" in state["params"]
    at_copy, rows_at_copy = [tr.predict(b) for b in probe], _rows(tr)
    frozen = {k: v.copy() for k, v in state["params"].items()}
    tr.fit(batches[4:])
    after = [tr.predict(b) for b in probe]
    assert np.abs(after[0] - at_copy[0]).max() > 1e-4
    assert all(np.array_equal(frozen[k], v) for k, v in state["params"].items())   # a copy: training did not move it

    tr.load_state_dict(state)
    assert tr.step_count == 4 and tr.examples == 1000
    for p, q in zip(at_copy, [tr.predict(b) for b in probe]):
        np.testing.assert_array_equal(p, q)
    for k, v in _rows(tr).items():
        np.testing.assert_array_equal(v, rows_at_copy[k])
    # and training on from it repeats the same steps exactly
    tr.fit(batches[4:])
    for p, q in zip(after, [tr.predict(b) for b in probe]):
        np.testing.assert_array_equal(p, q)

    # into a fresh trainer of the same job (other initial params): the same model
    fresh = _small_trainer(seed=7)
    fresh.load_state_dict(state)
    for p, q in zip(at_copy, [fresh.predict(b) for b in probe]):
        np.testing.assert_array_equal(p, q)
    state["params"]["bias"][...] = 100.0                        # the trainer holds its own copy
    np.testing.assert_array_equal(fresh.predict(probe[0]), at_copy[0])


def test_load_state_dict_refuses_a_state_of_another_job_before_changing_anything():
    tr = _small_trainer()
    tr.fit(_small_batches(500))
    state = tr.state_dict()
    other = _small_trainer(model=DeepFM(["user", "item"], 4, 1, (16,), rngs=nnx.Rngs(0)))
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"state 'params': deep/layers/0/bias is float32\(8,\), this trainer's "
                                         r"is float32\(16,\)"):
        other.load_state_dict(state)
    assert other.step_count == 0 and len(other.tables["ids"]) == 0
    assert all(np.array_equal(before["params"][k], v) for k, v in other.state_dict()["params"].items())
    wide = _small_trainer(dim=9, model=DeepFM(["user", "item"], 8, 1, (8,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"missing \[.*\], unexpected|is float32"):
        wide.load_state_dict(state)
    with pytest.raises(ValueError, match=r"state lacks \['tables'\]"):
        tr.load_state_dict(tr.state_dict(tables=False))
    # strict=False: only the parts given (the dense part, for a serving copy)
    copy = _small_trainer(seed=3)
    copy.load_state_dict({"params": state["params"]}, strict=False)
    assert copy.step_count == 0 and len(copy.tables["ids"]) == 0
    assert all(np.array_equal(state["params"][k], v) for k, v in copy.state_dict()["params"].items())
