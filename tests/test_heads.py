"""Heads: several objectives in one model, trained, evaluated and read from files.

The job here is a synthetic shop, not MovieLens: a click (binary), a
purchase that exists only after a click (binary, masked elsewhere, as in
ESMM), and a dwell time (a value)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pytest
from flax import nnx

import monolith_jax as mj
from monolith_jax.features import SparseBatch, SparseFeature, records_to_batch
from monolith_jax.heads import Head, total_loss
from monolith_jax.metrics import auc
from monolith_jax.models import MMoE
from monolith_jax.training import Trainer

DIM = 8
FEATURES = [SparseFeature("user", "ids", column="user"), SparseFeature("item", "ids", column="item")]
HEADS = (Head("click"), Head("buy", missing="mask", weight=0.5), Head("dwell", loss="squared", label="dwell_s"))


def shop(n: int, seed: int) -> pa.Table:
    """Each user and item has a hidden taste; click, buy (only after a click) and dwell follow it."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 200, n), rng.integers(0, 100, n)
    taste = np.random.default_rng(99)
    u, i = taste.normal(size=200), taste.normal(size=100)
    score = u[users] + i[items]
    click = (rng.random(n) < 1 / (1 + np.exp(-2 * score))).astype(np.float64)
    buy = np.where(click > 0, (rng.random(n) < 1 / (1 + np.exp(-2 * (i[items] - 0.5)))).astype(np.float64), np.nan)
    dwell = 3.0 + 2.0 * u[users] + rng.normal(0, 0.3, n)
    return pa.table({"user": [f"u{x}" for x in users], "item": [f"i{x}" for x in items],
                     "click": click, "buy": buy, "dwell_s": dwell})


def trainer(heads=HEADS, seed=0):
    tables = [mj.TableConfig("ids", DIM, mj.Normal(0, 0.05), mj.Adagrad(0.1), seed=seed)]
    model = MMoE(["user", "item"], DIM, n_experts=3, expert_hidden=(32,), tower_hidden=(16,),
                 tasks=[h.name for h in heads], rngs=nnx.Rngs(seed))
    return Trainer(model, tables, FEATURES, optimizer=optax.adam(3e-3), heads=heads, log_every=0)


def batches(table: pa.Table, size=256, heads=HEADS):
    return [records_to_batch(table.slice(s, size), FEATURES, (), heads, size) for s in range(0, table.num_rows, size)]


def test_heads_are_checked():
    with pytest.raises(ValueError, match="loss must be one of"):
        Head("x", loss="hinge")
    with pytest.raises(ValueError, match="weight must be"):
        Head("x", weight=0)
    with pytest.raises(ValueError, match="missing must be"):
        Head("x", missing="drop")
    with pytest.raises(ValueError, match="head names used twice"):
        mj.Job(sparse=FEATURES, tables=[mj.TableConfig("ids", DIM, mj.Zeros(), mj.SGD(0.1))], model=lambda r: None,
               heads=(Head("a"), Head("a")))
    assert Head("t", loss="squared").kind == "value" and Head("t").kind == "binary"
    assert Head("t", loss=lambda o, y: jnp.abs(o - y)).kind == "value"


def test_file_labels_one_column_per_head_with_thresholds_and_masks():
    table = pa.table({"user": ["a", "b", "c"], "item": ["x", "y", "z"], "click": [1.0, 0.0, 1.0],
                      "buy": [1.0, None, 0.0], "dwell_s": [2.5, 4.0, 1.0]})
    heads = (Head("click"), Head("buy", missing="mask"), Head("long", label="dwell_s", threshold=2.0))
    b = records_to_batch(table, FEATURES, (), heads, batch_size=4)
    assert b.labels.shape == (4, 3) and b.label_mask.shape == (4, 3)
    np.testing.assert_array_equal(b.labels[:3], [[1, 1, 1], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b.label_mask, [[1, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(b.weights, [1, 1, 1, 0])
    refused = (Head("click"), Head("buy"))  # missing="refuse" by default
    with pytest.raises(ValueError, match=r"label column 'buy' \(head 'buy'\): 1 of 3 labels missing"):
        records_to_batch(table, FEATURES, (), refused)
    with pytest.raises(KeyError, match="watch"):
        records_to_batch(table, FEATURES, (), (Head("watch"),))


def test_the_total_loss_is_the_weighted_sum_of_the_heads_masked_where_undefined():
    rng = np.random.default_rng(0)
    out = {h.name: jnp.asarray(rng.normal(size=6), jnp.float32) for h in HEADS}
    labels = np.stack([rng.integers(0, 2, 6), rng.integers(0, 2, 6), rng.normal(3, 1, 6)], 1).astype(np.float32)
    mask = np.ones((6, 3), np.float32)
    mask[[1, 4], 1] = 0
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
    batch = SparseBatch(ids={}, lengths={}, dense=np.zeros((6, 0), np.float32), labels=labels, weights=weights,
                        label_mask=mask)
    n = weights.sum()
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    bce = lambda o, y: -(y * np.log(sig(o)) + (1 - y) * np.log(1 - sig(o)))  # noqa: E731
    o = {k: np.asarray(v, np.float64) for k, v in out.items()}
    want = (np.sum(weights * bce(o["click"], labels[:, 0])) / n
            + 0.5 * np.sum(weights * mask[:, 1] * bce(o["buy"], labels[:, 1])) / n
            + np.sum(weights * (o["dwell"] - labels[:, 2]) ** 2) / n)
    assert float(total_loss(out, batch, HEADS, n)) == pytest.approx(want, rel=1e-5)


def test_a_masked_label_changes_nothing():
    data = shop(1024, 1)
    clean = batches(data)
    noisy = [SparseBatch(b.ids, b.lengths, b.dense, np.where(b.label_mask > 0, b.labels, 7.0).astype(np.float32),
                         b.weights, b.label_mask) for b in clean]
    a, b = trainer(), trainer()
    for x, y in zip(clean, noisy):
        a.train_step(x)
        b.train_step(y)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    keys = mj.hash_strings(np.array([f"u{i}" for i in range(200)]))
    ka = a.tables["ids"].find(mj.Keys.from_ids(keys).to_numpy())[0]
    kb = b.tables["ids"].find(mj.Keys.from_ids(keys).to_numpy())[0]
    np.testing.assert_array_equal(ka, kb)


def test_mmoe_learns_three_heads_and_reports_each():
    train, test = shop(24_000, 2), shop(4_000, 3)
    t = trainer()
    t.fit(batches(train), epochs=3)
    ev = t.evaluate(batches(test))
    heads = ev["heads"]
    assert set(heads) == {"click", "buy", "dwell"}
    assert heads["click"]["auc"] > 0.85 and heads["buy"]["auc"] > 0.75, heads
    clicked = int(np.nansum(test.column("click").to_numpy()))
    assert heads["buy"]["examples"] == clicked < heads["click"]["examples"] == 4_000
    spread = float(np.std(test.column("dwell_s").to_numpy()))
    assert heads["dwell"]["rmse"] < 0.3 * spread, (heads["dwell"], spread)
    assert ev["auc"] == heads["click"]["auc"]  # the first binary head at the top
    scores = t.predict(batches(test)[0])
    assert set(scores) == {"click", "buy", "dwell"}
    assert ((scores["click"] > 0) & (scores["click"] < 1)).all() and scores["dwell"].mean() > 1.0


def test_a_model_must_return_every_head():
    t = trainer(heads=HEADS[:2])
    bad = Trainer(MMoE(["user", "item"], DIM, tasks=["click"], rngs=nnx.Rngs(0)),
                  [mj.TableConfig("ids", DIM, mj.Normal(0, 0.05), mj.Adagrad(0.1))], FEATURES,
                  heads=HEADS[:2], log_every=0)
    b = batches(shop(256, 0), heads=HEADS[:2])[0]
    with pytest.raises(ValueError, match=r"missing \['buy'\]"):
        bad.train_step(b)
    one = Trainer(MMoE(["user", "item"], DIM, tasks=["click"], single_task=True, rngs=nnx.Rngs(0)),
                  [mj.TableConfig("ids", DIM, mj.Normal(0, 0.05), mj.Adagrad(0.1))], FEATURES,
                  heads=HEADS[:2], log_every=0)
    with pytest.raises(TypeError, match="needs a dict"):
        one.train_step(b)
    wrong = batches(shop(256, 0), heads=HEADS)[0]  # three label columns for two heads
    with pytest.raises(ValueError, match=r"need \(B, 2\)"):
        t.train_step(wrong)


def test_monolith_train_runs_a_job_with_heads_from_files(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(shop(4096, 4), tmp_path / "train.parquet")
    pq.write_table(shop(1024, 5), tmp_path / "valid.parquet")
    (tmp_path / "shop_job.py").write_text(
        "import optax, monolith_jax as mj\n"
        "from monolith_jax.features import SparseFeature\n"
        "from monolith_jax.models import MMoE\n"
        "HEADS = (mj.Head('click'), mj.Head('buy', missing='mask'), mj.Head('dwell', loss='squared', label='dwell_s'))\n"
        "job = mj.Job(sparse=[SparseFeature('user', 'ids'), SparseFeature('item', 'ids')],\n"
        "             tables=[mj.TableConfig('ids', 8, mj.Normal(0, 0.05), mj.Adagrad(0.1))],\n"
        "             model=lambda rngs: MMoE(['user', 'item'], 8, tasks=[h.name for h in HEADS], rngs=rngs),\n"
        "             optimizer=optax.adam(3e-3), heads=HEADS, batch_size=256, name='shop')\n")
    run = subprocess.run([sys.executable, "-m", "monolith_jax.cli", "train", "--job", "shop_job:job",
                          "--data", "train.parquet", "--validation", "valid.parquet", "--epochs", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    epochs = [json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("epoch {")]
    assert len(epochs) == 2 and set(epochs[-1]["heads"]) == {"click", "buy", "dwell"}
    assert epochs[-1]["heads"]["click"]["auc"] > 0.6


def test_a_single_binary_head_exports_its_logit_and_several_heads_each_output(tmp_path):
    from monolith_jax.serving.export import export_model, load_exported

    one = trainer(heads=(Head("click"),))
    b = batches(shop(256, 6), heads=(Head("click"),))[0]
    one.train_step(b)
    export_model(one, str(tmp_path / "one"))
    model = load_exported(str(tmp_path / "one"))
    rows = one.collection.find_host(b)
    logits = model([np.asarray(x) for x in jax.tree.leaves(one.params)], rows, b.lengths, b.dense)
    np.testing.assert_allclose(jax.nn.sigmoid(np.asarray(logits)), one.predict(b)["click"], rtol=1e-5, atol=1e-6)
    spec = export_model(trainer(), str(tmp_path / "three"), negative_rate={"buy": 0.5})
    assert [(h["name"], h["kind"], h.get("negative_rate")) for h in spec["heads"]] == \
        [("click", "binary", 1.0), ("buy", "binary", 0.5), ("dwell", "value", None)]
    with pytest.raises(ValueError, match=r"negative_rate\['dwell'\] is 0.5, but head 'dwell' is a value head"):
        export_model(trainer(), str(tmp_path / "four"), negative_rate={"dwell": 0.5})
