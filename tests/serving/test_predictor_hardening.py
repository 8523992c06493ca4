"""The predictor (its own process) on bad dense params and bad requests: it
starts on its export's params when the serving PS holds a set that does not
fit, refuses that set once and says so once, answers fuzzed requests with
INVALID_ARGUMENT, and counts it all in its Prometheus metrics."""

import json
import time

import grpc
import numpy as np
import pytest

from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.serving.export import export_model
from monolith_jax.serving.sync import SyncPusher
from tests.rpc.fuzz import fuzz
from tests.rpc.servers import Server, metric, scrape
from tests.serving.test_predictor import DIM, _complete, _sparse, flat_ids, make_batch, trained, trainer_logits  # noqa: F401


@pytest.fixture(scope="module")
def predictor_on_bad_dense(trained, tmp_path_factory):  # noqa: F811
    model_dir = tmp_path_factory.mktemp("model")
    export_model(trained, str(model_dir), negative_rate=1.0, max_batch=8)
    log_path = tmp_path_factory.mktemp("logs") / "predictor.log"
    ps = Server("serving-ps", "--table", f"ids:{DIM + 1}")
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(ps.address))
        # Accepted (a serving PS without --model takes the first set), but not this model's params.
        bad = pb.Tensor(name="w", dtype="float32", shape=[2], data=np.ones(2, np.float32).tobytes())
        stub.PushDense(pb.DenseParams(trainer="other", tensors=[bad], negative_rate=1.0), timeout=30)
        pusher = SyncPusher(trained.tables, ps.address, "t0")
        assert pusher.push_once()
        pusher.stop(final_push=False)
        with open(log_path, "w") as log:
            pred = Server("predictor", "--model", model_dir, "--serving-ps", ps.address, "--dense-poll", 0.01,
                          "--metrics-port", 0, stderr=log)
        yield pred, log_path
        pred.stop()
    finally:
        ps.stop()


def _stats(pred):
    reply = pbg.PredictorStub(grpc.insecure_channel(pred.address)).Info(pb.InfoRequest(), timeout=30)
    return json.loads(reply.stats_json)


def test_a_predictor_starts_on_its_exports_params_and_refuses_a_set_that_does_not_fit_once(
        trained, predictor_on_bad_dense):  # noqa: F811
    pred, log_path = predictor_on_bad_dense
    from monolith_jax.serving.predictor import PredictorClient

    client = PredictorClient(pred.address)
    batch = make_batch(trained, np.random.default_rng(3), b=8)
    out = client.predict_arrays(flat_ids(trained, batch))
    np.testing.assert_allclose(out["logits"], trainer_logits(trained, batch), rtol=1e-5, atol=1e-5)
    assert out["dense_version"] == 0          # the export's own params
    for _ in range(3000):                     # many polls of the serving PS (bounded)
        if _stats(pred)["dense_polls"] >= 40:
            break
        time.sleep(0.01)
    stats = _stats(pred)
    assert stats["dense_polls"] >= 40 and stats["dense_refused"] == 1 and stats["dense_updates"] == 0
    lines = [line for line in log_path.read_text().splitlines() if "dense" in line]
    assert len(lines) == 1 and "do not fit this export" in lines[0] and "dense params lack" in lines[0], lines
    m = scrape(pred.metrics_port)
    assert metric(m, "monolith_refusals_total", reason="dense_refused") == 1
    assert metric(m, "monolith_rpc_requests_total", method="Predictor/Predict", code="OK") >= 1
    assert metric(m, "monolith_table_rows_looked_up_total", table="ids") > 0
    assert metric(m, "monolith_dense_version") == 0 and metric(m, "monolith_sync_lag_seconds") > 0
    client.close()


def test_fuzzed_predict_requests_are_invalid_argument_and_the_predictor_goes_on(predictor_on_bad_dense):
    pred, _ = predictor_on_bad_dense
    valid = pb.PredictRequest(batch_size=2, sparse=_complete(_sparse()))
    seen = fuzz(pred.address, "Predictor", {"Predict": (valid, pb.PredictReply), "Info": (pb.InfoRequest(),
                                                                                         pb.InfoReply)}, n=60)
    assert seen["INVALID_ARGUMENT"] > 20, seen
    ok = pbg.PredictorStub(grpc.insecure_channel(pred.address)).Predict(valid, timeout=30)
    assert np.frombuffer(ok.probabilities, np.float32).shape == (2,) and pred.alive()
    m = scrape(pred.metrics_port)
    assert metric(m, "monolith_rpc_requests_total", method="Predictor/Predict", code="INVALID_ARGUMENT") >= 20
    assert metric(m, "monolith_refusals_total", reason="bad_request") >= 20
