"""A training PS shard's state, in process: synchronous rounds step each id
once with the group's summed gradient, snapshots restore, the dense master
of asynchronous trainers, and shard-aware full pushes at the serving PS."""

import json

import jax
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.distributed.dense_ps import AsyncDense, DenseMaster
from monolith_jax.serving.serving_ps import ServingTables
from monolith_jax.distributed.training_ps import ShardState, shard_of
from monolith_jax.rpc.wire import RequestError, tensors_from_proto, tensors_to_proto

DIM = 4


def config():
    return mj.TableConfig("ids", DIM, mj.Normal(0, 0.1), mj.Adagrad(0.1))


def apply(state, keys, grads, round_, contributors, session=1, step=3):
    return state.apply(pb.ShardApplyRequest(table="ids", keys=np.asarray(keys, np.uint64).tobytes(),
                                            grads=np.asarray(grads, np.float32).tobytes(), step=step, round=round_,
                                            contributors=contributors, session=session))


def test_a_round_steps_each_id_once_with_the_summed_gradient():
    state = ShardState(0, 1, [config()])
    ref = mj.EmbeddingTable(config())
    keys = np.arange(1, 9, dtype=np.uint64)
    state.tables["ids"].lookup_host(keys)
    ref.lookup_host(keys)
    rng = np.random.default_rng(0)
    g1, g2 = rng.standard_normal((4, DIM)), rng.standard_normal((4, DIM))
    before = state.tables["ids"].find(keys)[0]
    # Trainer A's part (ids 1-4) waits for trainer B's (ids 3-6).
    assert apply(state, keys[:4], g1, 1, 2) == (0, 0)
    np.testing.assert_array_equal(state.tables["ids"].find(keys)[0], before)
    assert apply(state, keys[2:6], g2, 1, 2)[0] == 6
    summed = np.zeros((6, DIM), np.float32)
    summed[:4] += g1
    summed[2:6] += g2
    ref.apply_gradients_host(keys[:6], summed, step=3)
    np.testing.assert_allclose(state.tables["ids"].find(keys)[0], ref.find(keys)[0], rtol=1e-6)


def test_rounds_left_incomplete_are_applied_with_what_arrived():
    state = ShardState(0, 1, [config()])
    ref = mj.EmbeddingTable(config())
    keys = np.arange(1, 5, dtype=np.uint64)
    g = np.ones((4, DIM), np.float32)
    apply(state, keys, g, 7, 2, session=1)        # its partner never came (a trainer restarted)
    apply(state, keys, g, 1, 2, session=2)
    apply(state, keys, g, 1, 2, session=2)        # the new session's first round completes
    ref.apply_gradients_host(keys, g, step=3)
    ref.apply_gradients_host(keys, 2 * g, step=3)
    np.testing.assert_allclose(state.tables["ids"].find(keys)[0], ref.find(keys)[0], rtol=1e-6)
    assert not state._rounds


def test_shard_snapshot_restores_and_the_serving_ps_loads_every_shard(tmp_path):
    keys = np.arange(1, 2001, dtype=np.uint64)
    states = [ShardState(s, 2, [config()], snapshot_dir=str(tmp_path)) for s in range(2)]
    for s, st in enumerate(states):
        mine = keys[shard_of(keys, 2) == s]
        st.tables["ids"].lookup_host(mine)
        st.tables["ids"].apply_gradients_host(mine, np.ones((mine.size, DIM), np.float32), step=1)
        assert st.snapshot(4)[0] and not st.snapshot(4)[0]   # a step is saved once
        st.snapshots.close()
    again = ShardState(1, 2, [config()], snapshot_dir=str(tmp_path))
    assert again.restored == 4
    k1, v1 = states[1].tables["ids"].export()
    got, found = again.tables["ids"].find(k1)
    assert found.all() and len(again.tables["ids"]) == k1.size
    np.testing.assert_array_equal(got, v1)
    again.snapshots.close()
    serving = ServingTables({"ids": DIM})
    assert serving.load_snapshot(str(tmp_path)) == 4
    values, found = serving.tables["ids"].find(keys)
    assert found.all()


def test_dense_master_adds_the_trainers_deltas():
    master = DenseMaster()
    init = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    with pytest.raises(RequestError, match="init"):
        master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto(init)))
    first = master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto(init), init=True))
    other = {k: v + 5 for k, v in init.items()}
    second = master.exchange(pb.DenseExchange(trainer="b", tensors=tensors_to_proto(other), init=True))
    assert tensors_from_proto(second.tensors)["w"][0, 0] == 1.0 == tensors_from_proto(first.tensors)["w"][0, 0]
    delta = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, -1.0, np.float32)}
    master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto(delta)))
    got = tensors_from_proto(master.exchange(pb.DenseExchange(trainer="b", tensors=tensors_to_proto(delta))).tensors)
    np.testing.assert_allclose(got["w"], 2.0)
    np.testing.assert_allclose(got["b"], -2.0)
    assert master.version == 2
    with pytest.raises(RequestError, match="shape"):
        master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto(
            {"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)})))
    with pytest.raises(RequestError, match="do not match"):
        master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto({"w": np.ones((2, 3), np.float32)})))


def test_async_trainers_exchange_deltas_through_a_shard(tmp_path):
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.sparse.config import config_to_dict
    from tests.serving.test_predictor import make_batch
    from tests.distributed.test_training_ps import start_shard

    trainers = [movielens_trainer(seed=s, dim=4, hidden=(8,), out=lambda *a, **k: None) for s in range(2)]
    path = tmp_path / "tables.json"
    path.write_text(json.dumps([config_to_dict(t.config) for t in trainers[0].tables.values()]))
    proc, port = start_shard(0, 1, path)
    try:
        clients = [AsyncDense(f"127.0.0.1:{port}", f"t{i}") for i in range(2)]
        for t, c in zip(trainers, clients):
            c.start(t)   # the first trainer's params become the master; the second takes them
        start = [np.asarray(v) for v in jax.tree.leaves(trainers[0].params)]
        for a, b in zip(jax.tree.leaves(trainers[0].params), jax.tree.leaves(trainers[1].params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        rng = np.random.default_rng(0)
        deltas = [np.zeros_like(x) for x in start]
        for step in range(3):
            for t, c in zip(trainers, clients):
                before = [np.asarray(v) for v in jax.tree.leaves(t.params)]
                t.train_step_host(make_batch(t, rng), stamp=step)
                deltas = [d + np.asarray(v) - b for d, v, b in zip(deltas, jax.tree.leaves(t.params), before)]
                c.after_step(t)
        # The last to exchange holds the master: the start plus every delta.
        for v, s0, d in zip(jax.tree.leaves(trainers[1].params), start, deltas):
            np.testing.assert_allclose(np.asarray(v), s0 + d, rtol=1e-5, atol=1e-6)
        assert clients[1].version == 6 and clients[0].exchanges == clients[1].exchanges == 3
        for c in clients:
            c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_shards_full_push_replaces_only_its_own_keys():
    serving = ServingTables({"ids": DIM})
    keys = np.arange(1, 1001, dtype=np.uint64)
    owner = shard_of(keys, 2)

    def push(shard, ks, value, seq):
        rows = pb.TableRows(table="ids", dim=DIM, dtype="float32", keys=ks.tobytes(),
                            values=np.full((ks.size, DIM), value, np.float32).tobytes())
        serving.push(pb.PushRequest(trainer=f"training-ps-{shard}-of-2", sequence=seq, full=True, last=True,
                                    tables=[rows], shard=shard, shards=2))

    push(0, keys[owner == 0], 1.0, 1)
    push(1, keys[owner == 1], 2.0, 1)
    # Shard 0 restarted from an older snapshot: its copy has fewer rows.
    push(0, keys[owner == 0][:100], 3.0, 1)
    values, found = serving.tables["ids"].find(keys)
    assert found[owner == 1].all() and np.all(values[owner == 1] == 2.0)
    assert found[owner == 0].sum() == 100 and np.all(values[owner == 0][:100] == 3.0)
    with pytest.raises(RequestError, match="shard 2 of 2"):
        serving.push(pb.PushRequest(trainer="x", sequence=1, full=True, last=True, shard=2, shards=2))


def test_a_refused_contribution_never_costs_another_trainer_its_update():
    state = ShardState(0, 1, [config()])
    ref = mj.EmbeddingTable(config())
    keys = np.arange(1, 9, dtype=np.uint64)
    state.tables["ids"].lookup_host(keys)
    ref.lookup_host(keys)
    rng = np.random.default_rng(1)
    ga, gb = rng.standard_normal((4, DIM)).astype(np.float32), rng.standard_normal((4, DIM)).astype(np.float32)
    assert apply(state, keys[:4], ga, 1, 2) == (0, 0)        # trainer A: OK, waits for B
    for bad, expect in [(dict(step=2**31), r"step must be in \[0, 2\^31\)"),
                        (dict(grads=np.full((4, DIM), np.nan, np.float32)), "not all finite"),
                        (dict(contributors=3), "has 2 contributors, this request says 3"),
                        (dict(grads=np.ones((3, DIM), np.float32)), "expected 16"),
                        (dict(keys=np.array([1, 2], np.uint64), grads=np.ones((2, DIM)), table="nope"),
                         "unknown table")]:
        args = dict(keys=keys[2:6], grads=gb, contributors=2, step=3, table="ids", **{})
        args.update(bad)
        with pytest.raises(RequestError, match=expect):
            state.apply(pb.ShardApplyRequest(table=args["table"], keys=np.asarray(args["keys"], np.uint64).tobytes(),
                                             grads=np.asarray(args["grads"], np.float32).tobytes(),
                                             step=args["step"], round=1, contributors=args["contributors"],
                                             session=1))
        assert len(state._rounds) == 1                          # A's contribution still waits
    assert apply(state, keys[2:6], gb, 1, 2)[0] == 6             # B, corrected: the round completes
    summed = np.zeros((6, DIM), np.float32)
    summed[:4] += ga
    summed[2:6] += gb
    ref.apply_gradients_host(keys[:6], summed, step=3)
    np.testing.assert_allclose(state.tables["ids"].find(keys)[0], ref.find(keys)[0], rtol=1e-6)
    assert not state._rounds


def test_open_rounds_are_bounded_and_rounds_that_cannot_complete_are_applied_with_what_arrived():
    from monolith_jax.distributed.training_ps import RoundLimits
    from monolith_jax.rpc.wire import LimitError

    keys = np.arange(1, 5, dtype=np.uint64)
    g = np.ones((4, DIM), np.float32)
    # One session moving on: each newer round makes the older one unable to complete.
    state = ShardState(0, 1, [config()])
    ref = mj.EmbeddingTable(config())
    for r in range(1, 31):
        apply(state, keys, g, r, 2)
        assert len(state._rounds) == 1
    for _ in range(29):
        ref.apply_gradients_host(keys, g, step=3)
    np.testing.assert_allclose(state.tables["ids"].find(keys)[0], ref.find(keys)[0], rtol=1e-6)
    assert state.refusals == {"superseded_round_applied": 29}
    # Many sessions: the oldest other sessions' rounds make room.
    state = ShardState(0, 1, [config()], limits=RoundLimits(max_open_rounds=4, max_round_bytes=1 << 20))
    for session in range(1, 31):
        apply(state, keys, g, 1, 2, session=session)
        assert len(state._rounds) <= 4
    assert state.refusals == {"round_applied_for_room": 26} and state.open_rounds()[0] == 4
    # Bytes: one contribution over the limit is refused naming it, and changes nothing.
    big = np.arange(1, 50_001, dtype=np.uint64)
    with pytest.raises(LimitError, match="--max-round-bytes"):
        apply(state, big, np.ones((big.size, DIM), np.float32), 1, 2, session=99)
    assert state.open_rounds()[0] == 4 and len(state.tables["ids"]) == 4
    # Age: a round with no contribution for --stale-round-s is applied when the next comes.
    state = ShardState(0, 1, [config()], limits=RoundLimits(stale_round_s=0))
    apply(state, keys, g, 1, 2, session=1)
    apply(state, keys[:1], g[:1], 1, 3, session=2)
    assert state.refusals == {"stale_round_applied": 1} and list(state._rounds) == [("ids", 2, 1)]


def test_dense_master_refuses_a_delta_that_would_overflow_and_keeps_its_copy():
    master = DenseMaster()
    init = {"w": np.full(3, 3e38, np.float32)}
    master.exchange(pb.DenseExchange(trainer="a", tensors=tensors_to_proto(init), init=True))
    reply = master.exchange(pb.DenseExchange(trainer="b", tensors=tensors_to_proto({"w": np.full(3, 1e38, np.float32)})))
    assert "not finite" in reply.refused and reply.version == 0
    np.testing.assert_array_equal(tensors_from_proto(reply.tensors)["w"], init["w"])
    assert master.refused_counts() == {"dense_delta_not_finite": 1}
    ok = master.exchange(pb.DenseExchange(trainer="b", tensors=tensors_to_proto({"w": np.full(3, -1e38, np.float32)})))
    assert not ok.refused and ok.version == 1
    with pytest.raises(RequestError, match="not finite"):   # a delta that is not finite itself
        master.exchange(pb.DenseExchange(trainer="b", tensors=tensors_to_proto({"w": np.full(3, np.inf, np.float32)})))
