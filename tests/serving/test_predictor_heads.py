"""Serving a model with heads (`tests.jobs.shop_tasks`: "click" and "buy"):
the export returns every head's output, the serving PS and the predictor
(their own processes, two hops or with local tables) answer a score per
head equal to the trainer's own, and each binary head is corrected by its
own negative rate, only where its negatives were sampled. A model
without heads answers as before."""

import json

import grpc
import jax
import numpy as np
import pytest

from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.rpc.wire import tensors_to_proto
from monolith_jax.serving.export import dense_arrays, export_model, job_negative_rates, load_exported
from monolith_jax.serving.predictor import PredictorClient
from monolith_jax.serving.sync import SyncPusher
from tests.jobs import shop, shop_tasks
from tests.jobs.test_shop_job import Server, monolith, requests_of

N = 200   # requests checked


def own_outputs(trainer, job, path, n=N) -> tuple[dict, dict]:
    """The trainer's own scores (`predict`) and raw outputs by head, for
    the first n rows of a file."""
    scores, raw = {}, {}
    for b in job.batches([str(path)]):
        real = int(np.sum(np.asarray(b.weights) > 0))
        p = trainer.predict(b)
        out = trainer._logits(trainer.params, trainer.collection.find_host(b), b)
        for name in p:
            scores.setdefault(name, []).append(np.asarray(p[name])[:real])
            raw.setdefault(name, []).append(np.asarray(out[name])[:real])
    return ({k: np.concatenate(v)[:n] for k, v in scores.items()},
            {k: np.concatenate(v)[:n] for k, v in raw.items()})


def served(address, cols, n=N) -> dict:
    """{"scores", "outputs", "negative_rates"} by head for the first n
    rows, asked through the dict client (after the pushed dense params
    are in), and the client's `predict` answer checked against them."""
    import time

    client = PredictorClient(address)
    try:
        deadline = time.monotonic() + 60
        while client.info()[1]["dense_version"] == 0:
            assert time.monotonic() < deadline, "the predictor never took the pushed dense params"
            time.sleep(0.1)
        parts = []
        for s in range(0, n, 100):
            reqs = requests_of(cols, range(s, min(s + 100, n)))
            got = client.predict(reqs)
            assert isinstance(got, dict) and sorted(got) == ["buy", "click"]
            parts.append((got, _arrays(client, reqs)))
        for got, arrays in parts:
            for name in got:
                np.testing.assert_array_equal(got[name], arrays["scores"][name])
        stats = client.info()[1]
        assert stats["predictions"] > 0 and stats["unknown_ids"]["ids"] < 0.05 * stats["ids"], stats
        out = {k: {name: np.concatenate([a[k][name] for _, a in parts]) for name in ("click", "buy")}
               for k in ("scores", "outputs")}
        out["negative_rates"] = parts[0][1]["negative_rates"]
        out["stats"] = stats
        out["spec"] = client.spec
        return out
    finally:
        client.close()


def _arrays(client, reqs) -> dict:
    """The same requests through predict_arrays (the reply's per-head fields)."""
    out = client.predict_arrays(*client.encode(reqs), len(reqs))
    assert out["probabilities"].size == 0 and out["logits"].size == 0   # a model with heads: by head only
    assert out["kinds"] == {"click": "binary", "buy": "binary"}
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The two-head job trained from a small Parquet log, its export and a test log."""
    d = tmp_path_factory.mktemp("tasks")
    train, test = d / "train.parquet", d / "test.parquet"
    shop_tasks.make_log(str(train), n=800, part=0)
    cols = shop_tasks.make_log(str(test), n=N, part=1)
    job = shop_tasks.job
    trainer = job.make_trainer(log_every=0)
    trainer.fit(lambda: job.batches([str(train)]), epochs=2)
    model = d / "model"
    spec = export_model(trainer, str(model), negative_rate={"buy": 0.25}, max_batch=128)
    return {"job": job, "trainer": trainer, "model": model, "spec": spec, "test": test, "cols": cols}


def test_export_records_the_heads_and_returns_each_output(tasks):
    spec, trainer, job = tasks["spec"], tasks["trainer"], tasks["job"]
    assert spec["heads"] == [{"name": "click", "kind": "binary", "negative_rate": 1.0},
                             {"name": "buy", "kind": "binary", "negative_rate": 0.25}]
    assert spec["format_version"] == 3 and spec["negative_rate"] is None
    assert json.loads((tasks["model"] / "spec.json").read_text()) == spec
    model = load_exported(str(tasks["model"]))
    b = next(iter(job.batches([str(tasks["test"])])))
    out = model(model.params, trainer.collection.find_host(b), b.lengths, b.dense)
    assert isinstance(out, dict) and sorted(out) == ["buy", "click"]
    own = trainer.predict(b)
    for name in ("click", "buy"):
        np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(out[name])), own[name], rtol=1e-5, atol=1e-6)


def test_export_refuses_rates_that_do_not_fit_the_heads(tasks, tmp_path):
    trainer = tasks["trainer"]
    for rates, expect in [({"nope": 0.5},
                           r"names \['nope'\], not heads of this model; its heads are \['click', 'buy'\]"),
                          ({"buy": 0.0}, r"negative_rate\['buy'\] must be a number in \(0, 1\], got 0.0"),
                          ({"click": 1.5}, r"negative_rate\['click'\] must be a number in \(0, 1\]"),
                          (0.0, r"negative_rate must be a number in \(0, 1\]")]:
        with pytest.raises(ValueError, match=expect):
            export_model(trainer, str(tmp_path), negative_rate=rates)
    assert not (tmp_path / "spec.json").exists()
    assert job_negative_rates(tasks["job"]) == {"click": 1.0, "buy": 1.0}   # a rule per head, none sampled
    from tests.jobs import shop

    assert job_negative_rates(shop.job) == 1.0   # one rule without sampling: not corrected


def test_two_hop_predictor_serves_each_head_with_its_own_correction(tasks):
    trainer, model, cols = tasks["trainer"], tasks["model"], tasks["cols"]
    own, raw = own_outputs(trainer, tasks["job"], tasks["test"])
    ps = Server("serving-ps", "--model", model, "--port", 0)
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(ps.address))
        named = dense_arrays(trainer.params)
        # Rates that do not fit the heads are refused, naming what is wrong.
        for rates, expect in [({"buy": 0.0}, "head_negative_rates['buy'] must be a number in (0, 1], got 0.0"),
                              ({"buy": 1.5}, "must be a number in (0, 1], got 1.5"),
                              ({"buy": float("nan")}, "head_negative_rates['buy'] must be a number in (0, 1]"),
                              ({"views": 0.5}, "names ['views'], not heads of this model; its heads are "
                                               "['click', 'buy']")]:
            with pytest.raises(grpc.RpcError) as err:
                stub.PushDense(pb.DenseParams(trainer="t", tensors=tensors_to_proto(named),
                                              head_negative_rates=rates), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert expect in err.value.details(), err.value.details()
        # Params of another model (one head fewer) do not match the one served.
        fewer = dict(list(named.items())[:-1])
        with pytest.raises(grpc.RpcError) as err:
            stub.PushDense(pb.DenseParams(trainer="t", tensors=tensors_to_proto(fewer)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not match" in err.value.details()
        assert stub.Version(pb.VersionRequest(), timeout=30).dense_version == 0   # nothing taken

        pusher = SyncPusher(trainer.tables, ps.address, "tasks-0",
                            dense_source=lambda: (dense_arrays(trainer.params), {"click": 1.0, "buy": 0.25}))
        assert pusher.push_once() and pusher.push_dense()
        pusher.stop(final_push=False)
        got = stub.GetDense(pb.DenseRequest(have=0), timeout=30)
        assert dict(got.head_negative_rates) == {"click": 1.0, "buy": 0.25}
        current = stub.GetDense(pb.DenseRequest(have=got.version), timeout=30)
        assert not current.tensors and dict(current.head_negative_rates) == {"click": 1.0, "buy": 0.25}

        pred = Server("predictor", "--model", model, "--serving-ps", ps.address, "--port", 0)
        try:
            out = served(pred.address, cols)
        finally:
            pred.stop()
        assert pred.proc.returncode == 0, "".join(pred.lines[-30:])
        assert any("serving heads click (binary, negative rate 1), buy (binary, negative rate 0.25)" in line
                   for line in pred.lines), "".join(pred.lines[-30:])
    finally:
        ps.stop()
    assert out["negative_rates"] == {"click": 1.0, "buy": 0.25}
    for name in ("click", "buy"):   # the model's own outputs, as the trainer's
        np.testing.assert_allclose(out["outputs"][name], raw[name], rtol=1e-5, atol=1e-5)
    # click's negatives were not sampled: its score is the trainer's own.
    np.testing.assert_allclose(out["scores"]["click"], own["click"], rtol=1e-5, atol=1e-6)
    # buy's were (a quarter kept): its logit shifted by log 0.25, and only its.
    np.testing.assert_allclose(out["scores"]["buy"], jax.nn.sigmoid(out["outputs"]["buy"] + np.log(0.25)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scores"]["buy"], own["buy"] / (own["buy"] + 4 * (1 - own["buy"])),
                               rtol=1e-4, atol=1e-6)
    assert np.all(out["scores"]["buy"] < own["buy"])
    assert np.std(out["scores"]["click"]) > 0.02   # the model tells requests apart
    assert [h["name"] for h in out["spec"]["heads"]] == ["click", "buy"]
    assert [h["negative_rate"] for h in out["stats"]["heads"]] == [1.0, 0.25]
    mean_click = out["stats"]["head_score_sum"]["click"] / out["stats"]["predictions"]
    assert abs(mean_click - float(np.mean(out["scores"]["click"]))) < 1e-3


def test_local_tables_predictor_serves_each_head_as_the_trainer(tasks):
    trainer, model, cols = tasks["trainer"], tasks["model"], tasks["cols"]
    own, raw = own_outputs(trainer, tasks["job"], tasks["test"])
    pred = Server("predictor", "--model", model, "--tables", "local", "--port", 0)
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(pred.address))
        with pytest.raises(grpc.RpcError) as err:   # the local tables check the rates as a serving PS does
            stub.PushDense(pb.DenseParams(trainer="t", tensors=tensors_to_proto(dense_arrays(trainer.params)),
                                          head_negative_rates={"buy": -1.0}), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "(0, 1]" in err.value.details()
        # One rate for a model with heads: every binary head's (1: none sampled).
        pusher = SyncPusher(trainer.tables, pred.address, "tasks-0",
                            dense_source=lambda: (dense_arrays(trainer.params), 1.0))
        assert pusher.push_once() and pusher.push_dense()
        pusher.stop(final_push=False)
        out = served(pred.address, cols)
    finally:
        pred.stop()
    assert pred.proc.returncode == 0, "".join(pred.lines[-30:])
    assert out["negative_rates"] == {"click": 1.0, "buy": 1.0}   # the sync's rate replaced the export's 0.25
    for name in ("click", "buy"):
        np.testing.assert_allclose(out["outputs"][name], raw[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["scores"][name], own[name], rtol=1e-5, atol=1e-6)


def test_a_model_without_heads_answers_as_before(tmp_path):
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    shop.make_log(str(train), n=600, part=0)
    cols = shop.make_log(str(test), n=100, part=1)
    job = shop.job
    trainer = job.make_trainer(log_every=0)
    trainer.fit(lambda: job.batches([str(train)]), epochs=1)
    spec = export_model(trainer, str(tmp_path / "model"), negative_rate=0.5, max_batch=128)
    assert "heads" not in spec and spec["format_version"] == 2 and spec["negative_rate"] == 0.5
    with pytest.raises(ValueError, match="by head, but this model has no heads"):
        export_model(trainer, str(tmp_path / "other"), negative_rate={"click": 0.5})
    pred = Server("predictor", "--model", tmp_path / "model", "--tables", "local", "--port", 0)
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(pred.address))
        named = dense_arrays(trainer.params)
        with pytest.raises(grpc.RpcError) as err:
            stub.PushDense(pb.DenseParams(trainer="t", tensors=tensors_to_proto(named),
                                          head_negative_rates={"click": 0.5}), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the model served has no heads" in err.value.details()
        pusher = SyncPusher(trainer.tables, pred.address, "shop-0", dense_source=lambda: (named, 0.5))
        assert pusher.push_once() and pusher.push_dense()
        pusher.stop(final_push=False)
        client = PredictorClient(pred.address)
        import time

        deadline = time.monotonic() + 60
        while client.info()[1]["dense_version"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        probs = client.predict(requests_of(cols, range(50)))
        reply = pbg.PredictorStub(grpc.insecure_channel(pred.address)).Predict(
            pb.PredictRequest(batch_size=1, sparse=[pb.SparseIds(feature=s, lengths=np.zeros(1, np.int32).tobytes())
                                                    for s in {f.source for f in trainer.features}],
                              dense=np.full(1, np.nan, np.float32).tobytes()), timeout=30)
        assert "heads" not in client.info()[1]
        client.close()
    finally:
        pred.stop()
    assert isinstance(probs, np.ndarray) and probs.shape == (50,)
    assert not reply.heads and np.frombuffer(reply.probabilities, np.float32).shape == (1,)
    b = next(iter(job.batches([str(test)])))
    logits = np.asarray(trainer._logits(trainer.params, trainer.collection.find_host(b), b))[:50]
    np.testing.assert_allclose(probs, jax.nn.sigmoid(logits + np.log(0.5)), rtol=1e-5, atol=1e-6)


def test_files_train_export_and_serve_two_heads_through_commands(tmp_path):
    from monolith_jax.job import load_job
    from monolith_jax.snapshot import Snapshots

    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    shop_tasks.make_log(str(train), n=800, part=0)
    cols = shop_tasks.make_log(str(test), n=N, part=1)
    monolith("train", "--job", "tests.jobs.shop_tasks:job", "--data", train, "--epochs", 1,
             "--export", tmp_path / "model", "--snapshot-dir", tmp_path / "snaps")
    spec = json.loads((tmp_path / "model" / "spec.json").read_text())
    assert [h["name"] for h in spec["heads"]] == ["click", "buy"]
    job = load_job("tests.jobs.shop_tasks:job")
    trainer = job.make_trainer(log_every=0)
    snaps = Snapshots(str(tmp_path / "snaps"))
    assert snaps.restore(trainer) is not None
    snaps.close()
    own, _ = own_outputs(trainer, job, test)
    ps = Server("serving-ps", "--model", tmp_path / "model", "--port", 0, "--snapshot-dir", tmp_path / "snaps")
    try:
        pred = Server("predictor", "--model", tmp_path / "model", "--serving-ps", ps.address, "--port", 0)
        try:
            client = PredictorClient(pred.address)
            parts = [client.predict(requests_of(cols, range(s, s + 100))) for s in range(0, N, 100)]
            got = {name: np.concatenate([p[name] for p in parts]) for name in ("click", "buy")}
            stats = client.info()[1]
            client.close()
        finally:
            pred.stop()
    finally:
        ps.stop()
    # The rows came from the trainer's snapshot (the few unknown: ids the
    # 800 training rows never had, zeros for the trainer too).
    assert stats["unknown_ids"]["ids"] < 0.05 * stats["ids"], stats
    for name in ("click", "buy"):
        np.testing.assert_allclose(got[name], own[name], rtol=1e-4, atol=1e-6)


def test_a_value_head_is_served_as_it_is_and_never_corrected(tmp_path):
    """In process (local tables): click, buy (binary) and dwell (a value)."""
    from monolith_jax.serving import serving_ps as sps
    from monolith_jax.serving.predictor import Predictor
    from monolith_jax.sparse import space_ids
    from tests import test_heads as th

    trainer = th.trainer()
    bs = th.batches(th.shop(512, 3))
    for b in bs:
        trainer.train_step(b)
    export_model(trainer, str(tmp_path), negative_rate={"buy": 0.5, "dwell": 1.0}, max_batch=256)
    state = sps.ServingTables(sps.tables_of_export(str(tmp_path)), dense_spec=sps.dense_spec_of_export(str(tmp_path)),
                              heads=sps.heads_of_export(str(tmp_path)))
    for name, t in trainer.tables.items():
        state.tables[name].assign(*t.export("float32"))
    with pytest.raises(ValueError, match=r"head_negative_rates\['dwell'\] is 0.5, but head 'dwell' is a value head"):
        state._check_head_rates({"dwell": 0.5})
    pred = Predictor(str(tmp_path), None, local=state)
    try:
        b = bs[0]
        ids = {}
        for f in trainer.features:
            k, lens = b.ids[f.name].to_numpy(), np.asarray(b.lengths[f.name])
            ids[f.source] = (space_ids(k[np.arange(k.shape[1])[None, :] < lens[:, None]], f.space), lens)
        out = pred.predict_arrays(ids, None, 256)
        from monolith_jax.rpc.metrics import Metrics
        from monolith_jax.serving.predictor import add_metrics

        m = Metrics()
        add_metrics(m, pred)
        text = m.text()
    finally:
        pred.close()
    assert 'monolith_head_negative_rate{head="buy"} 0.5' in text, text
    assert 'monolith_head_score_sum_total{head="dwell"}' in text, text
    own = trainer.predict(b)
    assert out["negative_rates"] == {"click": 1.0, "buy": 0.5}   # no rate for a value head
    np.testing.assert_allclose(out["scores"]["dwell"], own["dwell"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["scores"]["dwell"], out["outputs"]["dwell"])
    np.testing.assert_allclose(out["scores"]["click"], own["click"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scores"]["buy"], jax.nn.sigmoid(out["outputs"]["buy"] + np.log(0.5)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.nn.sigmoid(out["outputs"]["buy"]), own["buy"], rtol=1e-5, atol=1e-6)


def test_a_job_of_one_binary_head_is_served_as_one_probability_its_rate_named_or_not(tmp_path):
    """One declared binary head: the export is one logit, as before, and
    names the head, so that a sync's rate given by head name reaches it."""
    from monolith_jax.heads import Head
    from monolith_jax.serving import serving_ps as sps
    from monolith_jax.serving.predictor import Predictor
    from monolith_jax.sparse import space_ids
    from tests import test_heads as th

    heads = (Head("click"),)
    trainer = th.trainer(heads=heads)
    bs = th.batches(th.shop(256, 4), heads=heads)
    trainer.train_step(bs[0])
    spec = export_model(trainer, str(tmp_path), negative_rate={"click": 0.5}, max_batch=256)
    assert "heads" not in spec and spec["head"] == "click" and spec["negative_rate"] == 0.5
    assert spec["format_version"] == 2
    state = sps.ServingTables(sps.tables_of_export(str(tmp_path)), dense_spec=sps.dense_spec_of_export(str(tmp_path)),
                              heads=sps.heads_of_export(str(tmp_path)))
    for name, t in trainer.tables.items():
        state.tables[name].assign(*t.export("float32"))
    tensors = tensors_to_proto(dense_arrays(trainer.params))
    with pytest.raises(ValueError, match=r"names \['buy'\], not heads of this model"):
        state.push_dense(pb.DenseParams(trainer="t", tensors=tensors, head_negative_rates={"buy": 0.5}))
    state.push_dense(pb.DenseParams(trainer="t", tensors=tensors, head_negative_rates={"click": 0.25}))
    pred = Predictor(str(tmp_path), None, local=state)
    try:
        assert pred.refresh_dense() and pred.negative_rate == 0.25
        b = bs[0]
        ids = {}
        for f in trainer.features:
            k, lens = b.ids[f.name].to_numpy(), np.asarray(b.lengths[f.name])
            ids[f.source] = (space_ids(k[np.arange(k.shape[1])[None, :] < lens[:, None]], f.space), lens)
        out = pred.predict_arrays(ids, None, 256)
    finally:
        pred.close()
    assert "scores" not in out and out["probabilities"].shape == (256,)
    np.testing.assert_allclose(jax.nn.sigmoid(out["logits"]), trainer.predict(b)["click"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probabilities"], jax.nn.sigmoid(out["logits"] + np.log(0.25)), rtol=1e-5, atol=1e-6)
