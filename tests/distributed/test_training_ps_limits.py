"""A training PS shard (its own process) never bloats on rounds that do not
complete, answers fuzzed requests with INVALID_ARGUMENT, refuses lookups
whose reply would not fit, and counts it all in its Prometheus metrics."""

import json

import grpc
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.rpc import wire
from monolith_jax.rpc.wire import tensors_to_proto
from monolith_jax.sparse.config import config_to_dict
from tests.rpc.fuzz import fuzz
from tests.rpc.servers import Server, memory_mb, metric, scrape

DIM = 64


@pytest.fixture
def tables_json(tmp_path):
    path = tmp_path / "tables.json"
    path.write_text(json.dumps([config_to_dict(mj.TableConfig("ids", DIM, mj.Normal(0, 0.1), mj.Adagrad(0.1)))]))
    return path


def contribution(round_, session, n=26_000, contributors=2):
    keys = np.arange(1, n + 1, dtype=np.uint64)     # ~7 MB of keys and gradients
    return pb.ShardApplyRequest(table="ids", keys=keys.tobytes(), grads=np.ones((n, DIM), np.float32).tobytes(),
                                step=1, round=round_, contributors=contributors, session=session)


def stub(server):
    return pbg.TrainingPSStub(grpc.insecure_channel(server.address, options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]))


def test_rounds_that_never_complete_do_not_grow_a_shard(tables_json):
    # 30 contributions to rounds whose partner never comes grew the old shard by ~220 MB.
    with Server("training-ps", "--shard", 0, "--shards", 1, "--tables", tables_json, "--max-open-rounds", 4,
                "--metrics-port", 0) as shard:
        s = stub(shard)
        s.Apply(contribution(1, session=1), timeout=60)
        s.Apply(contribution(2, session=1), timeout=60)   # round 1 applied with what arrived
        before = memory_mb(shard.pid)
        for r in range(3, 18):                               # one session moving on
            s.Apply(contribution(r, session=1), timeout=60)
        for session in range(2, 17):                         # sessions that never complete a round
            s.Apply(contribution(1, session=session), timeout=60)
        assert memory_mb(shard.pid) - before < 100
        m = scrape(shard.metrics_port)
        assert metric(m, "monolith_open_rounds") <= 4
        assert metric(m, "monolith_refusals_total", reason="superseded_round_applied") == 16
        assert metric(m, "monolith_refusals_total", reason="round_applied_for_room") == 12
        assert metric(m, "monolith_table_rows", table="ids") == 26_000
        assert metric(m, "monolith_rpc_requests_total", method="TrainingPS/Apply", code="OK") == 32


def test_a_round_contribution_over_the_byte_limit_is_resource_exhausted(tables_json):
    with Server("training-ps", "--shard", 0, "--shards", 1, "--tables", tables_json,
                "--max-round-bytes", "5M") as shard:
        with pytest.raises(grpc.RpcError) as err:
            stub(shard).Apply(contribution(1, session=1), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-round-bytes" in err.value.details()


def test_fuzzed_requests_are_invalid_argument_and_big_lookups_are_refused_before_they_are_built(tables_json):
    with Server("training-ps", "--shard", 0, "--shards", 2, "--tables", tables_json) as shard:
        from monolith_jax.distributed.training_ps import shard_of

        keys = np.arange(1, 50, dtype=np.uint64)
        mine = keys[shard_of(keys, 2) == 0][:3]
        seen = fuzz(shard.address, "TrainingPS", {
            "Lookup": (pb.ShardLookupRequest(table="ids", keys=mine.tobytes(), read_only=True), pb.ShardLookupReply),
            "Apply": (pb.ShardApplyRequest(table="ids", keys=mine.tobytes(),
                                           grads=np.ones((3, DIM), np.float32).tobytes(), step=1), pb.ShardApplyReply),
            "Info": (pb.ShardInfoRequest(), pb.ShardInfoReply),
            "Snapshot": (pb.ShardSnapshotRequest(step=1), pb.ShardSnapshotReply),
            "ExchangeDense": (pb.DenseExchange(trainer="t", init=True, tensors=tensors_to_proto(
                {"w": np.ones(2, np.float32)})), pb.DenseMaster),
        })
        assert seen["INVALID_ARGUMENT"] > 40 and seen["OK"] > 20, seen
        s = stub(shard)
        many = np.arange(1, 700_000, dtype=np.uint64)
        many = many[shard_of(many, 2) == 0]                  # ~350k keys: a reply of ~90 MB
        peak = memory_mb(shard.pid, "VmHWM")
        with pytest.raises(grpc.RpcError) as err:
            s.Lookup(pb.ShardLookupRequest(table="ids", keys=many.tobytes(), read_only=True), timeout=60)
        fit = wire.MAX_PAYLOAD_BYTES // (DIM * 4 + 1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"ask for at most {fit} keys per call" in err.value.details()
        assert memory_mb(shard.pid, "VmHWM") - peak < 60
        assert shard.alive() and s.Info(pb.ShardInfoRequest(), timeout=30).shards == 2
