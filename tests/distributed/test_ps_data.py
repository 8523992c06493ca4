"""The training PS data plane: one Step request per shard per training step
(shards in their own processes), every lookup seeing every earlier apply,
calls split to fit, a kept apply sent when no lookup follows, refused
requests changing nothing; the client's split (the engine's) against plain
sums."""

import json
import time

import grpc
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.distributed.ps_data import STEP, Split, shard_of
from monolith_jax.distributed.training_ps import ShardedTable, sum_by_key
from monolith_jax.rpc import serving_pb2 as spb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.rpc import training_step_pb2 as pb
from monolith_jax.sparse.config import config_to_dict
from tests.rpc.fuzz import fuzz
from tests.rpc.servers import Server, metric, scrape

DIM = 8


def config():
    return mj.TableConfig("ids", DIM, mj.Normal(0, 0.1), mj.Adagrad(0.1))


@pytest.fixture
def shards(tmp_path):
    path = tmp_path / "tables.json"
    path.write_text(json.dumps([config_to_dict(config())]))
    servers = [Server("training-ps", "--shard", s, "--shards", 2, "--tables", path, "--metrics-port", 0)
               for s in range(2)]
    yield servers
    for s in servers:
        s.stop()


def requests(server, method):
    return metric(scrape(server.metrics_port), "monolith_rpc_requests_total", method=method, code="OK")


def batch(rng, n=600, vocab=400):
    return (rng.zipf(1.3, n) % vocab + 1).astype(np.uint64), rng.normal(0, 1, (n, DIM)).astype(np.float32)


def test_each_step_is_one_request_per_shard_and_every_lookup_sees_the_previous_apply(shards):
    local, table = mj.EmbeddingTable(config()), ShardedTable(config(), [s.address for s in shards])
    rng = np.random.default_rng(0)
    steps = 8
    for step in range(steps):
        ids, grads = batch(rng)
        np.testing.assert_allclose(table.lookup_host(ids), local.lookup_host(ids), rtol=1e-6, atol=1e-7)
        table.apply_gradients_host(ids, grads, step=step)
        local.apply_gradients_host(ids, grads, step=step)
    assert [requests(s, "TrainingPSData/Step") for s in shards] == [steps, steps]
    assert [requests(s, "TrainingPS/Lookup") + requests(s, "TrainingPS/Apply") for s in shards] == [0, 0]
    # The last step's apply was kept; reading the shards any other way sends it first.
    keys, values = local.export()
    assert len(table) == keys.size
    got, found = table.find(keys)
    assert found.all()
    np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-7)
    # The counts of the applies answered since the previous call: every unique id was updated.
    ids, grads = batch(rng)
    table.lookup_host(ids)
    table.apply_gradients_host(ids, grads, step=steps)
    assert table.flush() == (np.unique(ids).size, 0)
    assert table.lookup_host(np.zeros((0, 3), np.uint64)).shape == (0, 3, DIM)       # no id: no request
    assert [a.shape for a in table.find(np.zeros(0, np.uint64))] == [(0, DIM), (0,)]
    table.close()


def test_calls_are_split_to_fit_and_an_apply_too_big_to_ride_along_goes_first(shards):
    local, table = mj.EmbeddingTable(config()), ShardedTable(config(), [s.address for s in shards])
    table.keys_per_call = 40    # as if rows were large: ~150 unique ids of a shard take several calls
    rng = np.random.default_rng(1)
    for step in range(4):
        ids, grads = batch(rng, n=800)
        np.testing.assert_allclose(table.lookup_host(ids), local.lookup_host(ids), rtol=1e-6, atol=1e-7)
        table.apply_gradients_host(ids, grads, step=step)
        local.apply_gradients_host(ids, grads, step=step)
    keys, values = local.export()
    got, found = table.find(keys)
    assert found.all()
    np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-7)
    table.close()


def test_a_kept_apply_goes_on_its_own_when_no_lookup_follows(shards):
    local = mj.EmbeddingTable(config())
    table = ShardedTable(config(), [s.address for s in shards], flush_after_s=0.2)
    ids, grads = batch(np.random.default_rng(2))
    table.lookup_host(ids)
    local.lookup_host(ids)
    table.apply_gradients_host(ids, grads, step=1)
    local.apply_gradients_host(ids, grads, step=1)
    keys, values = local.export()
    mine = shard_of(keys, 2) == 0
    stub = pbg.TrainingPSStub(grpc.insecure_channel(shards[0].address))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = stub.Lookup(spb.ShardLookupRequest(table="ids", keys=keys[mine].tobytes(), read_only=True), timeout=10)
        got = np.frombuffer(reply.values, np.float32).reshape(-1, DIM)
        if np.allclose(got, values[mine], rtol=1e-6, atol=1e-7):
            break
        time.sleep(0.05)
    np.testing.assert_allclose(got, values[mine], rtol=1e-6, atol=1e-7)
    assert [requests(s, "TrainingPSData/Step") for s in shards] == [2, 2]   # the lookup, then the apply alone
    table.close()


def test_a_refused_step_changes_nothing_and_fuzzed_steps_are_invalid_argument(shards):
    keys = np.arange(1, 400, dtype=np.uint64)
    mine, theirs = keys[shard_of(keys, 2) == 0], keys[shard_of(keys, 2) == 1]
    ch = grpc.insecure_channel(shards[0].address, options=[("grpc.max_send_message_length", 64 << 20)])
    step = ch.unary_unary(STEP, request_serializer=pb.ShardStepRequest.SerializeToString,
                          response_deserializer=pb.ShardStepReply.FromString)
    before = step(pb.ShardStepRequest(table="ids", keys=mine.tobytes()), timeout=10)
    assert before.dim == DIM and len(before.values) == mine.size * DIM * 4 and not before.found
    apply = {"apply": True, "apply_keys": mine.tobytes(), "grads": np.ones((mine.size, DIM), np.float32).tobytes(),
             "step": 1}
    for bad, says in [({"keys": theirs.tobytes()}, "belong to other shards"),
                      ({"keys": mine.tobytes(), "grads": b"\x00" * 12}, "expected"),
                      ({"keys": mine.tobytes(), "step": 2**31}, "step must be in"),
                      ({"table": "nope", "keys": mine.tobytes()}, "unknown table")]:
        with pytest.raises(grpc.RpcError) as err:
            step(pb.ShardStepRequest(**{"table": "ids", **apply, **bad}), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.value.details()
    after = step(pb.ShardStepRequest(table="ids", keys=mine.tobytes(), read_only=True), timeout=10)
    assert after.values == before.values and after.found == b"\x01" * mine.size
    # The apply and the lookup of one request: the lookup sees the apply.
    done = step(pb.ShardStepRequest(table="ids", **apply, keys=mine.tobytes()), timeout=10)
    assert (done.updated, done.skipped) == (mine.size, 0) and done.values != before.values
    # A lookup whose reply would not fit is refused before it is built.
    many = np.arange(1, 700_000, dtype=np.uint64)
    many = many[shard_of(many, 2) == 0]
    with pytest.raises(grpc.RpcError) as err:     # 2.4M keys x 33 bytes of reply
        step(pb.ShardStepRequest(table="ids", keys=np.repeat(many, 7).tobytes(), read_only=True), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "keys per call" in err.value.details()
    seen = fuzz(shards[0].address, "TrainingPSData", {
        "Step": (pb.ShardStepRequest(table="ids", keys=mine[:3].tobytes()), pb.ShardStepReply)}, n=60)
    assert seen["INVALID_ARGUMENT"] > 15 and seen.get("OK", 0) > 3, seen
    assert shards[0].alive() and shards[1].alive()


def test_the_split_of_a_batch_matches_plain_sums_and_lookups():
    rng = np.random.default_rng(3)
    ids, grads = batch(rng, n=5000, vocab=3000)
    ids[:6] = [0, 2**64 - 1, 2**63, 0, 2**64 - 1, 2**63]     # the ends of the key space, repeated
    want_keys, want = sum_by_key(ids, grads)
    for shards in (1, 3):
        split = Split(ids, shards)
        assert np.array_equal(split.grouped[split.rows_index], ids) and split.grouped.size == want_keys.size
        for s, keys in enumerate(split.keys):    # each shard's unique keys, ascending
            assert np.array_equal(keys, want_keys[shard_of(want_keys, shards) == s])
        summed, finite = split.summed(grads)
        assert finite and summed.shape == (want_keys.size, DIM)
        by_key = dict(zip(split.grouped.tolist(), summed))
        np.testing.assert_allclose(np.stack([by_key[k] for k in want_keys.tolist()]), want, rtol=1e-5, atol=1e-5)
        for keys, part in zip(split.keys, split.parts(summed)):
            np.testing.assert_array_equal(part, np.stack([by_key[k] for k in keys.tolist()]).reshape(-1, DIM))
        # Rows as the shards answer them (shard order) land back on the batch's positions.
        answered = rng.normal(size=(split.grouped.size, DIM)).astype(np.float32)
        assert np.array_equal(split.rows(answered), answered[split.rows_index])
        assert split.same_keys(ids.copy()) and not split.same_keys(ids[::-1].copy())
    empty = Split(np.zeros(0, np.uint64), 2)
    assert [k.size for k in empty.keys] == [0, 0] and empty.summed(np.zeros((0, DIM), np.float32))[0].shape == (0, DIM)


def test_a_split_says_when_a_sum_is_not_finite_and_refuses_bad_input():
    rng = np.random.default_rng(4)
    ids, grads = batch(rng, n=3000, vocab=500)
    for bad in (np.nan, np.inf, -np.inf):
        g = grads.copy()
        g[1234, 5] = bad
        assert Split(ids, 2).summed(g)[1] is False
    g = grads.copy()
    g[ids == ids[0], 0] = 3e38      # finite gradients whose sum overflows
    assert (ids == ids[0]).sum() > 1 and Split(ids, 2).summed(g)[1] is False
    from monolith_jax.sparse._native import engine

    with pytest.raises(ValueError, match="shards"):
        Split(ids, 0)
    split = Split(ids, 2)
    out = np.empty((split.grouped.size, DIM), np.float32)
    with pytest.raises(ValueError, match="index outside"):
        engine().sum_rows(grads, np.full(ids.size, split.grouped.size, np.int64), split.grouped.size, out)
    with pytest.raises(ValueError, match="one index per gradient row"):
        engine().sum_rows(grads[:-1], split.rows_index, split.grouped.size, out)
    with pytest.raises(ValueError, match="index outside"):
        engine().take_rows(out, np.r_[split.rows_index[:-1], -1], np.empty((ids.size, DIM), np.float32))
