"""The serving PS (its own process) never stops or bloats on what requests
carry: unfinished pushes and lookups are bounded, tables of any dim reach
it, dense params must fit the model it serves, bad requests of any shape
are INVALID_ARGUMENT, and its Prometheus metrics count all of it."""

import json

import grpc
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.rpc import wire
from monolith_jax.serving.sync import SyncPusher
from tests.rpc.fuzz import fuzz
from tests.rpc.servers import Server, memory_mb, metric, scrape

DIM = 64


def rows(n, dim=DIM, start=1, value=1.0):
    keys = np.arange(start, start + n, dtype=np.uint64)
    return pb.TableRows(table="ids", dim=dim, dtype="float32", keys=keys.tobytes(),
                        values=np.full((n, dim), value, np.float32).tobytes())


def stub(server):
    return pbg.ServingPSStub(grpc.insecure_channel(server.address, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]))


def test_unfinished_pushes_are_bounded_and_refused_with_the_limit_named():
    with Server("serving-ps", "--table", f"ids:{DIM}", "--metrics-port", 0) as server:
        s = stub(server)
        refused = []
        for t in range(40):
            try:
                s.Push(pb.PushRequest(trainer=f"t{t}", sequence=1, last=False, tables=[rows(1000)]), timeout=60)
            except grpc.RpcError as err:
                refused.append(err)
        assert len(refused) == 24    # 16 (--max-open-pushes' default) staged, the rest refused
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-open-pushes" in e.details()
                   for e in refused)
        m = scrape(server.metrics_port)
        assert metric(m, "monolith_staged_pushes") == 16
        assert metric(m, "monolith_refusals_total", reason="limit_open_pushes") == 24
        assert metric(m, "monolith_rpc_requests_total", method="ServingPS/Push", code="RESOURCE_EXHAUSTED") == 24
        # A trainer finishing its push frees its slot; the server goes on serving.
        s.Push(pb.PushRequest(trainer="t0", sequence=1, last=True, tables=[rows(10, start=10**6)]), timeout=60)
        assert dict(s.Version(pb.VersionRequest(), timeout=30).rows) == {"ids": 1010}
        assert metric(scrape(server.metrics_port), "monolith_staged_pushes") == 15


def test_unfinished_pushes_do_not_grow_the_server():
    # 40 pushes that never send their last message, ~7 MB each: the old
    # server held all of them (~290 MB) for ever.
    with Server("serving-ps", "--table", f"ids:{DIM}", "--max-open-pushes", 4) as server:
        s = stub(server)
        before = memory_mb(server.pid)
        codes = []
        for t in range(40):
            try:
                s.Push(pb.PushRequest(trainer=f"t{t}", sequence=1, last=False, tables=[rows(27_000)]), timeout=60)
                codes.append("OK")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        assert codes == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 36
        assert memory_mb(server.pid) - before < 150
        assert server.alive()


def test_staged_bytes_are_bounded_and_stale_or_abandoned_pushes_dropped():
    with Server("serving-ps", "--table", f"ids:{DIM}", "--max-staged-bytes", "10M", "--stale-push-s", 0,
                "--metrics-port", 0) as server:
        s = stub(server)
        s.Push(pb.PushRequest(trainer="a", sequence=1, last=False, tables=[rows(27_000)]), timeout=60)
        # With --stale-push-s 0, a's push (idle since its message) is dropped when b's comes.
        s.Push(pb.PushRequest(trainer="b", sequence=1, last=False, tables=[rows(27_000)]), timeout=60)
        m = scrape(server.metrics_port)
        assert metric(m, "monolith_refusals_total", reason="stale_push_dropped") == 1
        assert metric(m, "monolith_staged_pushes") == 1
        # A later message of a dropped push is refused, never applied as if it were whole.
        with pytest.raises(grpc.RpcError) as err:
            s.Push(pb.PushRequest(trainer="a", sequence=1, last=True, tables=[rows(5)]), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dropped unfinished" in err.value.details()
        assert dict(s.Version(pb.VersionRequest(), timeout=30).rows) == {"ids": 0}
        # One message over what may be staged: RESOURCE_EXHAUSTED naming the limit.
        with pytest.raises(grpc.RpcError) as err:
            s.Push(pb.PushRequest(trainer="c", sequence=1, last=False, tables=[rows(45_000)]), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-staged-bytes" in err.value.details()
        # A newer push of a trainer drops its unfinished older one.
        s.Push(pb.PushRequest(trainer="d", sequence=1, last=False, tables=[rows(100)]), timeout=60)
        s.Push(pb.PushRequest(trainer="d", sequence=2, last=True, tables=[rows(3)]), timeout=60)
        m = scrape(server.metrics_port)
        assert metric(m, "monolith_refusals_total", reason="abandoned_push_dropped") == 1
        assert metric(m, "monolith_refusals_total", reason="limit_staged_bytes") == 1
        assert dict(s.Version(pb.VersionRequest(), timeout=30).rows) == {"ids": 3}


def test_a_lookup_whose_reply_would_pass_the_limit_is_refused_before_it_is_built():
    with Server("serving-ps", "--table", "ids:256") as server:
        s = stub(server)
        peak = memory_mb(server.pid, "VmHWM")
        keys = np.arange(1, 300_001, dtype=np.uint64)       # 2.4 MB asking for 307 MB of rows
        with pytest.raises(grpc.RpcError) as err:
            s.Lookup(pb.LookupRequest(table="ids", keys=keys.tobytes()), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        fit = wire.MAX_PAYLOAD_BYTES // (256 * 4 + 1)
        assert f"ask for at most {fit} keys per call" in err.value.details(), err.value.details()
        assert memory_mb(server.pid, "VmHWM") - peak < 100    # the old server peaked ~700 MB higher
        got = s.Lookup(pb.LookupRequest(table="ids", keys=keys[:fit].tobytes()), timeout=60)
        assert len(got.values) == fit * 256 * 4
        assert server.alive()


def test_a_dim_256_table_reaches_the_serving_ps_in_messages_below_the_limit():
    # 70,000 rows x 256 float32 = 72 MB: the old pusher sent 65,536 rows (67.6 MB) a message, over
    # gRPC's 64 MB, and retried that for ever.
    table = mj.EmbeddingTable(mj.TableConfig("ids", 256, mj.Normal(0, 0.1), mj.SGD(0.1)))
    keys = np.arange(1, 70_001, dtype=np.uint64)
    table.lookup_host(keys)
    with Server("serving-ps", "--table", "ids:256") as server:
        pusher = SyncPusher({"ids": table}, server.address, "t0", timeout_s=60)
        assert pusher.push_once(), pusher.stats
        assert pusher.stats["messages"] >= 5 and pusher.stats["bytes"] / pusher.stats["messages"] < 17 << 20
        s = stub(server)
        assert dict(s.Version(pb.VersionRequest(), timeout=30).rows) == {"ids": 70_000}
        probe = keys[::997]
        got = s.Lookup(pb.LookupRequest(table="ids", keys=probe.tobytes()), timeout=60)
        np.testing.assert_array_equal(np.frombuffer(got.values, np.float32).reshape(-1, 256), table.find(probe)[0])
        # A row wider than a message is refused when the pusher is made, not retried for ever.
        wide = mj.EmbeddingTable(mj.TableConfig("w", 4096, mj.Zeros(), mj.SGD(0.1)))
        with pytest.raises(ValueError, match="one row of dim 4096"):
            SyncPusher({"w": wide}, server.address, "t1", max_message_bytes=16_000)
        pusher.stop(final_push=False)


def _tensor(name, shape, dtype="float32"):
    a = np.ones(shape, dtype)
    return pb.Tensor(name=name, dtype=dtype, shape=list(shape), data=a.tobytes())


def test_dense_params_must_match_the_model_served(tmp_path):
    spec = {"tables": {"ids": {"dim": 8}}, "params": [{"name": "['w']", "shape": [2, 3], "dtype": "float32"},
                                                      {"name": "['b']", "shape": [3], "dtype": "float32"}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with Server("serving-ps", "--model", tmp_path) as server:
        s = stub(server)
        for tensors, expect in [
            ([_tensor("['w']", (2, 3)), _tensor("['x']", (3,))], "they lack 1 the model has (e.g. \"['b']\") and "
                                                                  "have 1 it does not (e.g. \"['x']\")"),
            ([_tensor("['w']", (2, 3))], "they lack 1 the model has"),
            ([_tensor("['w']", (3, 2)), _tensor("['b']", (3,))], "dense param \"['w']\": float32[3, 2], the model "
                                                                 "served (its export's spec.json) has float32[2, 3]"),
            ([_tensor("['w']", (2, 3), "float16"), _tensor("['b']", (3,))], "float16[2, 3]"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                s.PushDense(pb.DenseParams(trainer="t", tensors=tensors), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expect in err.value.details(), \
                err.value.details()
        assert s.Version(pb.VersionRequest(), timeout=30).dense_version == 0
        good = [_tensor("['w']", (2, 3)), _tensor("['b']", (3,))]
        assert s.PushDense(pb.DenseParams(trainer="t", tensors=good), timeout=30).version > 0
    # Without --model, the first set accepted fixes them.
    with Server("serving-ps", "--table", "ids:8") as server:
        s = stub(server)
        v = s.PushDense(pb.DenseParams(trainer="t", tensors=good), timeout=30).version
        with pytest.raises(grpc.RpcError) as err:
            s.PushDense(pb.DenseParams(trainer="u", tensors=[_tensor("w", (2, 3))]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the first dense params accepted, from 't'" in err.value.details()
        assert s.GetDense(pb.DenseRequest(), timeout=30).version == v


def test_bad_requests_of_any_shape_are_invalid_argument_and_the_server_goes_on():
    with Server("serving-ps", "--table", "ids:8", "--table", "big:256") as server:
        seen = fuzz(server.address, "ServingPS", {
            "Push": (pb.PushRequest(trainer="t", sequence=1, last=True, tables=[rows(2, 8)]), pb.PushReply),
            "Lookup": (pb.LookupRequest(table="ids", keys=np.arange(3, dtype=np.uint64).tobytes()), pb.LookupReply),
            "PushDense": (pb.DenseParams(trainer="t", tensors=[_tensor("w", (2,))], negative_rate=0.5),
                          pb.DenseReply),
            "GetDense": (pb.DenseRequest(have=0), pb.DenseParams),
            "Version": (pb.VersionRequest(), pb.VersionReply),
        })
        assert seen["INVALID_ARGUMENT"] > 40 and seen["OK"] > 20, seen
        s = stub(server)
        # The two from the issue: a shape whose size overflows int64, a body that does not decode.
        huge = pb.Tensor(name="w", dtype="float32", shape=[2**62, 2**62, 4], data=b"")
        with pytest.raises(grpc.RpcError) as err:
            s.PushDense(pb.DenseParams(trainer="t", tensors=[huge]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "0 values, expected" in err.value.details()
        raw = grpc.insecure_channel(server.address).unary_unary("/monolith_jax.v1.ServingPS/Push")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x05ab", timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not decode" in err.value.details()
        assert server.alive() and "ids" in dict(s.Version(pb.VersionRequest(), timeout=30).rows)


def test_metrics_count_requests_rows_and_sync_lag():
    with Server("serving-ps", "--table", "ids:8", "--metrics-port", 0) as server:
        s = stub(server)
        m = scrape(server.metrics_port)
        assert metric(m, "monolith_sync_lag_seconds") > 0 and metric(m, "monolith_table_rows", table="ids") == 0
        s.Push(pb.PushRequest(trainer="t", sequence=1, last=True, tables=[rows(5, 8)]), timeout=30)
        for _ in range(7):
            s.Lookup(pb.LookupRequest(table="ids", keys=np.arange(3, dtype=np.uint64).tobytes()), timeout=30)
        with pytest.raises(grpc.RpcError):
            s.Lookup(pb.LookupRequest(table="nope"), timeout=30)
        lag_after_push = metric(scrape(server.metrics_port), "monolith_sync_lag_seconds")
        m = scrape(server.metrics_port)
        assert metric(m, "monolith_rpc_requests_total", method="ServingPS/Lookup", code="OK") == 7
        assert metric(m, "monolith_rpc_requests_total", method="ServingPS/Lookup", code="INVALID_ARGUMENT") == 1
        assert metric(m, "monolith_rpc_requests_total", method="ServingPS/Push", code="OK") == 1
        assert metric(m, "monolith_rpc_seconds_count", method="ServingPS/Lookup") == 8
        assert metric(m, "monolith_table_rows", table="ids") == 5
        assert 0 <= lag_after_push <= metric(m, "monolith_sync_lag_seconds")
