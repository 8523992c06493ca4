"""Per-feature key spaces: two features on one table that hold the same
integer read two rows, unless they declare one id space; the same through
files, the stream decoder and the predictor, against a dict reference."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from monolith_jax.features import PAD_KEY, DenseFeature, SparseFeature, records_to_batch
from monolith_jax.io import iter_batches
from monolith_jax.sparse import SGD, Normal, TableConfig, hash_strings, space_ids, space_keys
from monolith_jax.training import Trainer

M64 = (1 << 64) - 1


def reference_key(raw: int, space: str) -> int:
    """The documented scheme, written out on Python ints."""
    salt = int.from_bytes(hashlib.blake2b(("<monolith_jax:id_space>" + space).encode(), digest_size=8).digest(),
                          "little")
    x = (raw & M64) ^ salt
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def test_the_mapping_is_a_bijection_within_a_space_and_differs_across_spaces():
    rng = np.random.default_rng(0)
    ids = np.unique(rng.integers(0, 2**64, 200_000, dtype=np.uint64, endpoint=False))
    user, item = space_keys(ids, "user"), space_keys(ids, "item")
    assert np.unique(user).size == ids.size and np.unique(item).size == ids.size   # no two ids share a key
    np.testing.assert_array_equal(space_ids(user, "user"), ids)                    # and it inverts
    assert np.intersect1d(user, item).size == 0                                    # the spaces do not meet
    assert not np.any(user == ids)
    for raw in ids[:200].tolist() + [0, 1, 5, M64]:
        assert int(space_keys(np.array([raw], np.uint64), "user")[0]) == reference_key(raw, "user")
    # Stable across versions: snapshots and exports depend on these exact keys.
    assert space_keys(np.array([0, 1, 5, M64], np.uint64), "user").tolist() == [
        15831080584762675459, 7458946018920215672, 17196216844112428675, 13623538449887957299]
    # Small integer ids (the collision that motivates all this) in two spaces.
    small = np.arange(1 << 16, dtype=np.uint64)
    assert np.intersect1d(space_keys(small, "user_id"), space_keys(small, "item_id")).size == 0
    # int64 ids map as their bit pattern; shapes are kept; empty is fine.
    assert space_keys(np.array([-1], np.int64), "u")[0] == space_keys(np.array([M64], np.uint64), "u")[0]
    assert space_keys(np.zeros((3, 0), np.uint64), "u").shape == (3, 0)
    assert space_keys(ids[:6].reshape(2, 3), "u").shape == (2, 3)
    with pytest.raises(ValueError, match="non-empty string"):
        space_keys(ids[:1], "")
    with pytest.raises(ValueError, match="id_space must be a non-empty string"):
        SparseFeature("x", "t", id_space="")
    f = SparseFeature("hist", "ids", id_space="item")
    assert f.space == "item" and SparseFeature("item", "ids").space == "item"
    np.testing.assert_array_equal(f.keys(ids[:9]), space_keys(ids[:9], "item"))


class SumModel(nnx.Module):
    """Logit = w * (sum of both features' pooled rows) + dense weights: every row counts."""

    def __init__(self, n_dense: int):
        self.w = nnx.Param(jnp.ones(()))
        self.v = nnx.Param(jnp.linspace(0.5, 1.0, n_dense))

    def __call__(self, fields, dense):
        return self.w[...] * (fields["user"].sum(-1) + fields["item"].sum(-1)) + dense @ self.v[...]


def features(shared: bool):
    space = "things" if shared else None
    return [SparseFeature("user", "ids", column="user_id", id_space=space),
            SparseFeature("item", "ids", column="item_id", max_len=2, id_space=space)]


DENSE = [DenseFeature("price", fill=0.5), DenseFeature("age")]


def make_trainer(feats):
    return Trainer(SumModel(len(DENSE)), [TableConfig("ids", 2, Normal(0.0, 0.1), SGD(0.1))], feats, DENSE,
                   optax.sgd(0.0), out=lambda *a, **k: None)


def records(n=40, seed=0):
    """Users and items drawn from the same small integers: the same id in both features, often."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 12, n)
    items = [rng.integers(0, 20, rng.integers(0, 3)).tolist() for _ in range(n)]
    return {"user_id": users, "item_id": items, "price": rng.random(n), "age": rng.random(n),
            "label": rng.integers(0, 2, n).astype(np.float32)}


def reference_rows(rec, feats) -> set:
    """Dict reference: one row per (id space, id) a record holds."""
    rows = {}
    for u, items in zip(rec["user_id"], rec["item_id"]):
        for f, ids in ((feats[0], [u]), (feats[1], items[:2])):
            for i in ids:
                rows.setdefault((f.space, int(i)), len(rows))
    return {reference_key(i, space) for space, i in rows}


def train(trainer, batch) -> None:
    jax.block_until_ready((trainer.train_step(batch), trainer.params))  # the step (and its table apply) ran


def table_keys(trainer) -> set:
    return set(trainer.tables["ids"].dump()["keys"].tolist()) - {PAD_KEY}


@pytest.mark.parametrize("shared", [False, True])
def test_files_key_each_feature_in_its_space(shared, tmp_path):
    feats = features(shared)
    rec = records()
    want = reference_rows(rec, feats)
    trainer = make_trainer(feats)
    train(trainer, records_to_batch(pa.table(rec), feats, DENSE, batch_size=64))
    assert table_keys(trainer) == want
    both = set(rec["user_id"].tolist()) & {i for items in rec["item_id"] for i in items}
    n_raw = len(set(rec["user_id"].tolist()) | {i for items in rec["item_id"] for i in items})
    assert len(want) == (n_raw if shared else n_raw + len(both)) and both  # the same integer: one row or two
    # The same records from a Parquet file, in batches of 16.
    pq.write_table(pa.table(rec), tmp_path / "r.parquet")
    from_file = make_trainer(feats)
    for batch in iter_batches(str(tmp_path / "r.parquet"), feats, DENSE, batch_size=16):
        train(from_file, batch)
    assert table_keys(from_file) == want


@pytest.mark.parametrize("shared", [False, True])
def test_the_stream_decoder_keys_as_files_do(shared):
    from monolith_jax.stream import messages as M

    feats = features(shared)
    rec = records(seed=1)
    values = [M.encode_example(M.encode_features(f"r{i}", i, {"user_id": [int(u)], "item_id": items},
                                                 {"price": float(p), "age": float(a)}), float(y), 1.0, i)
              for i, (u, items, p, a, y) in enumerate(zip(*rec.values()))]
    batch, info, bad = M.ExampleDecoder(feats, DENSE).decode(values, 64)
    assert bad == [] and info["rows"] == 40
    files = records_to_batch(pa.table(rec), feats, DENSE, batch_size=64)
    for f in feats:
        np.testing.assert_array_equal(batch.ids[f.name].to_numpy(), files.ids[f.name].to_numpy())
        np.testing.assert_array_equal(batch.lengths[f.name], files.lengths[f.name])
    trainer = make_trainer(feats)
    train(trainer, batch)
    assert table_keys(trainer) == reference_rows(rec, feats)


def served(trainer, tmp_path):
    """The trainer exported, its rows on an in-process serving PS, a Predictor on both."""
    from monolith_jax.serving import serving_ps
    from monolith_jax.serving.export import dense_arrays, export_model
    from monolith_jax.serving.predictor import Predictor
    from monolith_jax.serving.sync import SyncPusher

    export_model(trainer, str(tmp_path), max_batch=64)
    server, port, _ = serving_ps.serve({"ids": 2})
    pusher = SyncPusher(trainer.tables, f"127.0.0.1:{port}", "t0",
                        dense_source=lambda: (dense_arrays(trainer.params), 1.0))
    assert pusher.push_once() and pusher.push_dense()
    pusher.stop(final_push=False)
    predictor = Predictor(str(tmp_path), f"127.0.0.1:{port}")
    predictor.start()
    return server, predictor


def request(rec):
    """Records -> the predictor's arrays: source -> (flat raw ids, lengths)."""
    items = rec["item_id"]
    return {"user_id": (np.asarray(rec["user_id"], np.uint64), np.ones(len(items), np.int32)),
            "item_id": (np.asarray([i for it in items for i in it], np.uint64),
                        np.asarray([len(it) for it in items], np.int32))}


@pytest.mark.parametrize("shared", [False, True])
def test_the_predictor_keys_requests_as_the_trainer_did(shared, tmp_path):
    from monolith_jax.rpc.wire import RequestError

    feats = features(shared)
    rec = records(seed=2)
    trainer = make_trainer(feats)
    batch = records_to_batch(pa.table(rec), feats, DENSE, batch_size=64)
    train(trainer, batch)
    server, predictor = served(trainer, tmp_path)
    try:
        dense = np.stack([rec["price"], rec["age"]], 1).astype(np.float32)
        out = predictor.predict_arrays(request(rec), dense, 40)
        expect = np.asarray(trainer._logits(trainer.params, trainer.collection.find_host(batch), batch))[:40]
        np.testing.assert_allclose(out["logits"], expect, rtol=1e-5, atol=1e-6)
        assert (out["unknown"] == 0).all()
        # Users holding ids seen only as items: known rows only if the spaces are shared.
        only_items = sorted({i for it in rec["item_id"] for i in it} - set(rec["user_id"].tolist()))
        assert only_items
        probe = {"user_id": (np.asarray(only_items, np.uint64), np.ones(len(only_items), np.int32)),
                 "item_id": (np.zeros(0, np.uint64), np.zeros(len(only_items), np.int32))}
        unknown = predictor.predict_arrays(probe, np.zeros((len(only_items), 2), np.float32))["unknown"]
        assert (unknown == (0 if shared else 1)).all()

        # A dense value left out (NaN) is filled where the feature has a fill, and counted.
        gap = dense[:3].copy()
        gap[:, 0] = np.nan
        sub = {k: (v[0][:int(v[1][:3].sum())], v[1][:3]) for k, v in request(rec).items()}
        filled = predictor.predict_arrays(sub, gap, 3)["logits"]
        gap[:, 0] = 0.5
        np.testing.assert_allclose(filled, predictor.predict_arrays(sub, gap, 3)["logits"], rtol=1e-6)
        assert predictor.stats["dense_filled"] == {"price": 3}
        gap[1, 1] = np.inf
        with pytest.raises(RequestError, match=r"dense feature 'age' \(field 'age'\): 1 of 3 values missing"):
            predictor.predict_arrays(sub, gap, 3)
        with pytest.raises(RequestError, match="lacks sparse feature 'item_id'"):
            predictor.predict_arrays({"user_id": sub["user_id"]}, dense[:3], 3)
        with pytest.raises(RequestError, match=r"unknown feature 'item'; the model reads \['item_id', 'user_id'\] "
                                               r"\(feature 'item' is read from 'item_id': requests name features "
                                               r"by source"):
            predictor.predict_arrays({**sub, "item": sub["item_id"]}, dense[:3], 3)
    finally:
        predictor.close()
        server.stop(0)


def test_an_export_without_id_spaces_is_refused(tmp_path):
    from monolith_jax.serving.export import export_model, load_exported

    trainer = make_trainer(features(False))
    export_model(trainer, str(tmp_path), max_batch=8)
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert [f["id_space"] for f in spec["features"]] == ["user", "item"]
    assert [d["fill"] for d in spec["dense_features"]] == [0.5, None]
    for f in spec["features"]:
        del f["id_space"]
    del spec["key_scheme"]
    spec["format_version"] = 1
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="predates per-feature key spaces .* Export the model again"):
        load_exported(str(tmp_path))


def test_string_ids_hash_then_key_per_space():
    feats = [SparseFeature("user", "ids"), SparseFeature("movie", "ids")]
    batch = records_to_batch(pa.table({"user": ["x", "y"], "movie": ["x", "z"], "label": [1, 0]}), feats)
    raw = hash_strings(["x", "y", "z"])
    assert batch.ids["user"].to_numpy()[:, 0].tolist() == space_keys(raw[[0, 1]], "user").tolist()
    assert batch.ids["movie"].to_numpy()[:, 0].tolist() == space_keys(raw[[0, 2]], "movie").tolist()
    assert batch.ids["user"].to_numpy()[0, 0] != batch.ids["movie"].to_numpy()[0, 0]
