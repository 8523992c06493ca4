"""Probes of the running loop: is the trainer idle, the group drained, a
server up; does the serving PS hold the trainer's rows; does the predictor
score requests."""

from __future__ import annotations

import numpy as np


def trainer_idle(trainer_stats: dict, since: float) -> bool:
    """Whether the trainer's current life has reported since `since`
    (monotonic) the same counts as in its report before: it trained nothing
    in a report interval (5 s) while everything there was had been written.
    (Its committed offsets may stay behind: it commits them with a
    snapshot, and takes one only after a batch.)"""
    if not trainer_stats:
        return False
    reports = trainer_stats[max(trainer_stats)]
    key = lambda s: (s.get("examples"), s.get("duplicates"), s.get("dead_letters"))  # noqa: E731
    return len(reports) >= 2 and reports[-1][0] > since + 0.5 and key(reports[-1][1]) == key(reports[-2][1])


def group_lag(bootstrap: str, group: str, topics: list) -> int | None:
    """Messages of `topics` the consumer group has not committed; None if unknown."""
    from monolith_jax.stream import kafka as K

    gate = K.LagGate(bootstrap, group, topics, 0)
    try:
        return gate.lag()
    except Exception:
        return None
    finally:
        gate.close()


# ------------------------------------------------------------------- checks
def serving_rows(snapshot_dir: str, ps_address: str, sample: int, rng: np.random.Generator) -> dict:
    """A sample of each table's rows in the trainer's newest snapshot, read
    back through the serving PS: found and equal?"""
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.wire import channel
    from monolith_jax.snapshot import Snapshots

    snaps = Snapshots(snapshot_dir, every_s=None, read_only=True)
    try:
        found = snaps.load(tables_only=True)
    finally:
        snaps.close()
    if found is None:
        return {"ok": False, "why": "no snapshot"}
    step, _, tables, meta = found
    ch = channel(ps_address)
    stub = pbg.ServingPSStub(ch)
    out = {"snapshot_step": int(step), "tables": {}}
    try:
        version = stub.Version(pb.VersionRequest(), timeout=10, wait_for_ready=True)
        serving_counts = dict(version.rows)
        ok = True
        for i, name in enumerate(meta["names"]["tables"]):
            dump = tables[f"t{i}"]
            keys, values = np.asarray(dump["keys"], np.uint64), np.asarray(dump["values"], np.float32)
            idx = rng.choice(keys.size, min(sample, keys.size), replace=False) if keys.size else np.zeros(0, int)
            reply = stub.Lookup(pb.LookupRequest(table=name, keys=keys[idx].tobytes(), dtype="float32"), timeout=30)
            got = np.frombuffer(reply.values, np.float32).reshape(idx.size, values.shape[1])
            hit = np.frombuffer(reply.found, np.uint8).astype(bool)
            equal = hit & np.all(got == values[idx], axis=1)
            t = {"trainer_rows": int(keys.size), "serving_rows": int(serving_counts.get(name, -1)),
                 "sampled": int(idx.size), "found": int(hit.sum()), "equal": int(equal.sum()),
                 "max_abs_diff": float(np.max(np.abs(got[hit] - values[idx][hit]))) if hit.any() else 0.0}
            t["ok"] = t["equal"] == t["sampled"] and t["serving_rows"] == t["trainer_rows"]
            ok = ok and t["ok"]
            out["tables"][name] = t
        out["ok"] = ok
    except Exception as err:
        out.update(ok=False, why=f"{type(err).__name__}: {err}")
    finally:
        ch.close()
    return out


def rpc_up(kind: str, address: str) -> bool:
    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.rpc import serving_pb2_grpc as pbg
    from monolith_jax.rpc.wire import channel

    ch = channel(address)
    try:
        if kind == "serving-ps":
            pbg.ServingPSStub(ch).Version(pb.VersionRequest(), timeout=10, wait_for_ready=True)
        else:
            pbg.PredictorStub(ch).Info(pb.InfoRequest(), timeout=10, wait_for_ready=True)
        return True
    except Exception:
        return False
    finally:
        ch.close()


def predict_check(job, address: str, values: list) -> dict:
    """Scores recent valid requests at the predictor."""
    from monolith_jax.online.demo import request_arrays
    from monolith_jax.serving.predictor import PredictorClient

    client = PredictorClient(address, timeout_s=20)
    try:
        ids, dense = request_arrays(job, values)
        out = client.predict_arrays(ids, dense, len(values))
        p = out["probabilities"]
        return {"ok": bool(p.size == len(values) and np.all(np.isfinite(p))), "requests": len(values),
                "unknown_ids": int(np.sum(out["unknown"]))}
    except Exception as err:
        return {"ok": False, "why": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        client.close()


# ---------------------------------------------------------------------- run
