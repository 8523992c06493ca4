"""Export, predictor (its own process) and dense sync: the served answer is the trainer's own."""

import json
import os
import subprocess
import sys
import time

import grpc
import jax
import numpy as np
import pytest

from monolith_jax.serving.export import dense_arrays, export_model, load_exported
from monolith_jax.features import SparseBatch
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.examples.movielens.loop import movielens_trainer
from monolith_jax.examples.movielens.replay import movielens_features
from monolith_jax.serving.predictor import PredictorClient
from monolith_jax.serving.sync import SyncPusher
from monolith_jax.sparse import Keys, hash_strings, space_ids
from tests.serving.test_serving_ps import start_server

DIM = 4
B = 32


def make_batch(trainer, rng, b=B, pool=500, fresh=None):
    """Random ids from a pool, keyed in each feature's id space as records
    are; `fresh`: a feature whose ids nobody has seen."""
    ids, lengths = {}, {}
    for f in trainer.features:
        raw = rng.integers(1, pool, (b, f.max_len)).astype(np.uint64)
        if f.name == fresh:
            raw = raw + np.uint64(10**12)
        lens = rng.integers(1, f.max_len + 1, b).astype(np.int32)
        ids[f.name] = Keys.from_ids(f.keys(raw))
        lengths[f.name] = lens
    return SparseBatch(ids=ids, lengths=lengths, dense=np.zeros((b, 0), np.float32),
                       labels=(rng.random(b) < 0.3).astype(np.float32), weights=np.ones(b, np.float32))


def flat_ids(trainer, batch):
    """SparseBatch -> source -> (flat uint64 raw ids, int32 lengths), as a
    client sends them (keys back to ids with the inverse mapping)."""
    out = {}
    for f in trainer.features:
        k, lens = batch.ids[f.name].to_numpy(), np.asarray(batch.lengths[f.name])
        take = np.arange(k.shape[1])[None, :] < lens[:, None]
        out[f.source] = (space_ids(k[take], f.space), lens)
    return out


def trainer_logits(trainer, batch):
    return np.asarray(trainer._logits(trainer.params, trainer.collection.find_host(batch), batch))


def start_predictor(model_dir, ps_port, poll=0.1):
    proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", str(model_dir),
                             "--serving-ps", f"127.0.0.1:{ps_port}", "--dense-poll", str(poll)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def trained():
    trainer = movielens_trainer(seed=1, dim=DIM, hidden=(16,), out=lambda *a, **k: None)
    rng = np.random.default_rng(0)
    for step in range(20):
        trainer.train_step(make_batch(trainer, rng), stamp=step)
    return trainer


def test_export_loads_without_training_code_and_matches(trained, tmp_path):
    spec = export_model(trained, str(tmp_path), negative_rate=0.5, max_batch=64)
    assert sorted(os.listdir(tmp_path)) == ["model.stablehlo", "params.npz", "spec.json"]
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["tables"]["ids"]["features"] == [f.name for f in trained.features]
    model = load_exported(str(tmp_path))
    batch = make_batch(trained, np.random.default_rng(5), b=7)   # any batch size: the batch dim is symbolic
    rows = trained.collection.find_host(batch)
    got = model(model.params, rows, batch.lengths, batch.dense)
    np.testing.assert_allclose(np.asarray(got), trainer_logits(trained, batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dense param"):
        model.check_params({**dense_arrays(trained.params), model.param_names[0]: np.zeros(3, np.float32)})


def test_export_runs_on_every_platform_it_was_lowered_for_that_this_machine_has(trained, tmp_path):
    import jax

    from monolith_jax.serving.export import PLATFORMS

    spec = export_model(trained, str(tmp_path), max_batch=64)
    assert spec["platforms"] == list(PLATFORMS)     # recorded as lowered (cpu and cuda by default)
    model = load_exported(str(tmp_path))
    batch = make_batch(trained, np.random.default_rng(6), b=5)
    rows = trained.collection.find_host(batch)
    want = trainer_logits(trained, batch)
    ran = []
    for platform in spec["platforms"]:
        try:
            device = jax.devices("gpu" if platform == "cuda" else platform)[0]
        except RuntimeError:
            continue                                 # this machine has no such device
        args = jax.device_put((model.params, rows, batch.lengths, batch.dense), device)
        got = model(*args)
        assert {d.platform for d in got.devices()} == {device.platform}
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        ran.append(platform)
    assert "cpu" in ran


def test_predictor_answers_as_the_trainer_and_follows_dense_syncs(trained, tmp_path):
    ps, ps_port = start_server(table=f"ids:{DIM + 1}")
    pred = None
    try:
        # Every id of these two batches has a row (each feature has its own key space).
        rng = np.random.default_rng(9)
        batch, fresh = make_batch(trained, rng), make_batch(trained, rng, b=5)
        trained.train_step(batch, stamp=19)
        trained.train_step(fresh, stamp=19)
        user = next(f for f in trained.features if f.name == "user")
        fresh.ids["user"] = Keys.from_ids(user.keys(np.arange(5, dtype=np.uint64).reshape(5, 1) + np.uint64(10**12)))
        export_model(trained, str(tmp_path), negative_rate=0.25, max_batch=64)
        pusher = SyncPusher(trained.tables, f"127.0.0.1:{ps_port}", "t0",
                            dense_source=lambda: (dense_arrays(trained.params), 0.5))
        assert pusher.push_once() and pusher.push_dense()
        pred, port = start_predictor(tmp_path, ps_port)
        client = PredictorClient(f"127.0.0.1:{port}")
        out = client.predict_arrays(flat_ids(trained, batch))
        expect = trainer_logits(trained, batch)
        np.testing.assert_allclose(out["logits"], expect, rtol=1e-5, atol=1e-5)
        # The dense push's negative rate (0.5) wins over the export's (0.25).
        np.testing.assert_allclose(out["probabilities"], jax.nn.sigmoid(expect + np.log(0.5)), rtol=1e-5, atol=1e-6)
        assert (out["unknown"] == 0).all()

        # Ids nobody trained read zeros, as in the trainer's evaluation, and are counted.
        out = client.predict_arrays(flat_ids(trained, fresh))
        np.testing.assert_allclose(out["logits"], trainer_logits(trained, fresh), rtol=1e-5, atol=1e-5)
        assert (out["unknown"] == 1).all()
        assert client.info()[1]["unknown_ids"]["ids"] == 5

        # More training; sparse and dense syncs reach the predictor without a restart.
        version = out["dense_version"]
        for step in range(20, 30):
            trained.train_step(make_batch(trained, rng), stamp=step)
        assert pusher.push_once() and pusher.push_dense()
        deadline = time.monotonic() + 20
        while client.predict_arrays(flat_ids(trained, batch))["dense_version"] == version:
            assert time.monotonic() < deadline, "the predictor never took the new dense params"
            time.sleep(0.05)
        np.testing.assert_allclose(client.predict_arrays(flat_ids(trained, batch))["logits"], trainer_logits(trained, batch),
                                   rtol=1e-5, atol=1e-5)
        # The dict client hashes string ids as the trainer does and takes ints as raw ids.
        everything = {f.source: [] for f in trained.features}
        reqs = [{**everything, "user": "user:u1", "movie": 3, "genres": ["genre:Drama", "genre:War"]}, everything]
        probs = client.predict(reqs)
        assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))
        as_arrays = flat_ids(trained, batch)
        as_arrays["movie"] = (np.array([3], np.uint64), np.array([1, 0], np.int32))
        as_arrays["user"] = (hash_strings(["user:u1"]), np.array([1, 0], np.int32))
        as_arrays["genres"] = (hash_strings(["genre:Drama", "genre:War"]), np.array([2, 0], np.int32))
        for name in set(as_arrays) - {"movie", "user", "genres"}:
            as_arrays[name] = (np.zeros(0, np.uint64), np.zeros(2, np.int32))
        np.testing.assert_array_equal(probs, client.predict_arrays(as_arrays)["probabilities"])
        with pytest.raises(ValueError, match="request 1 lacks sparse feature 'genres'; send \\[\\] for no ids"):
            client.predict([everything, {k: v for k, v in everything.items() if k != "genres"}])
        pusher.stop(final_push=False)
    finally:
        for proc in (pred, ps):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture(scope="module")
def predictor_process(trained, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    export_model(trained, str(model_dir), negative_rate=1.0, max_batch=8)
    ps, ps_port = start_server(table=f"ids:{DIM + 1}")
    pusher = SyncPusher(trained.tables, f"127.0.0.1:{ps_port}", "t0",
                        dense_source=lambda: (dense_arrays(trained.params), 1.0))
    pusher.push_once()
    pusher.push_dense()
    pred, port = start_predictor(model_dir, ps_port)
    yield pbg.PredictorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for proc in (pred, ps):
        proc.terminate()
        proc.wait(10)


def _sparse(feature="user", ids=(1, 2), lengths=(1, 1)):
    return pb.SparseIds(feature=feature, ids=np.asarray(ids, np.uint64).tobytes(),
                        lengths=np.asarray(lengths, np.int32).tobytes())


SOURCES = [f.source for f in movielens_features()]


def _complete(*given, b=2):
    """The given SparseIds plus every other feature the model reads, with no ids."""
    have = {g.feature for g in given}
    return [*given, *[_sparse(s, (), (0,) * b) for s in SOURCES if s not in have]]


@pytest.mark.parametrize("request_, expect", [
    (pb.PredictRequest(batch_size=2, sparse=[_sparse("nope")]), "unknown feature 'nope'"),
    (pb.PredictRequest(batch_size=2, sparse=[_sparse(), _sparse()]), "feature 'user' twice"),
    (pb.PredictRequest(batch_size=2, sparse=[pb.SparseIds(feature="user", ids=b"123", lengths=b"")]),
     "not a whole number of uint64"),
    (pb.PredictRequest(batch_size=3, sparse=[_sparse()]), "2 values, expected 3"),
    (pb.PredictRequest(batch_size=2, sparse=[_sparse(lengths=(2, 1))]), "add up to 3, but 2 ids came"),
    (pb.PredictRequest(batch_size=2, sparse=[_sparse(lengths=(-1, 3))]), "negative lengths"),
    (pb.PredictRequest(batch_size=9), "batch_size must be 1..8"),
    (pb.PredictRequest(batch_size=0), "batch_size must be 1..8"),
    (pb.PredictRequest(batch_size=2, dense=b"\0" * 8), "dense: 2 values, expected 0"),
    (pb.PredictRequest(batch_size=2, sparse=[_sparse()]), "the request lacks sparse features 'movie', 'age', "),
    (pb.PredictRequest(batch_size=2, sparse=[s for s in _complete() if s.feature != "genres"]),
     "the request lacks sparse feature 'genres'; every request carries each feature the model reads "
     "(lengths 0 for no ids)"),
])
def test_bad_requests_get_invalid_argument(predictor_process, request_, expect):
    with pytest.raises(grpc.RpcError) as err:
        predictor_process.Predict(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert expect in err.value.details()
    ok = predictor_process.Predict(pb.PredictRequest(batch_size=2, sparse=_complete(_sparse())), timeout=30)
    assert np.frombuffer(ok.probabilities, np.float32).shape == (2,)


def test_serving_ps_refuses_bad_dense_params_and_keeps_the_last_good():
    ps, port = start_server()
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        good = pb.Tensor(name="w", dtype="float32", shape=[2], data=np.ones(2, np.float32).tobytes())
        v = stub.PushDense(pb.DenseParams(trainer="t", tensors=[good], negative_rate=0.5), timeout=30).version
        assert v > 0 and stub.Version(pb.VersionRequest()).dense_version == v
        for tensor, expect in [
            (pb.Tensor(name="w", dtype="float32", shape=[3], data=np.ones(2, np.float32).tobytes()),
             "2 values, expected 3"),
            (pb.Tensor(name="w", dtype="float32", shape=[2], data=np.array([1, np.nan], np.float32).tobytes()),
             "not finite"),
            (pb.Tensor(name="w", dtype="object", shape=[2], data=b""), "dtype must be one of"),
            (pb.Tensor(name="", dtype="float32", shape=[0], data=b""), "without a name"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.PushDense(pb.DenseParams(trainer="t", tensors=[tensor]), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expect in err.value.details()
        got = stub.GetDense(pb.DenseRequest(have=0), timeout=30)
        assert got.version == v and list(got.tensors) == [good] and got.negative_rate == 0.5
        assert not stub.GetDense(pb.DenseRequest(have=v), timeout=30).tensors  # current: nothing resent
    finally:
        ps.terminate()
        ps.wait(10)
