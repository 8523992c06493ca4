"""The training PS data plane: one `Step` request per shard per training
step (`proto/training_step.proto`), read and written without protobuf
objects (`monolith_jax.rpc.flat`).

A step's request carries the previous step's summed gradients of the
shard's ids and this step's unique ids of the shard; the shard applies the
gradients first and looks the ids up after, so the lookup sees them. The
shard checks the whole request (table, keys of this shard, a reply that
fits, then the apply's own checks) before it touches a row; a refused
request changes nothing. The apply reads the gradients where gRPC received
them (a numpy view), the lookup writes the rows into the buffer that
becomes the reply.

The client's side of a batch is numpy without a loop over ids (`Split`):
one sort gives the unique ids, each id's place among them and the shards'
parts; the summed gradients are one sparse-matrix product; the rows of a
batch one `np.take` from the shards' replies.
"""

from __future__ import annotations

import numpy as np

from monolith_jax.rpc import wire
from monolith_jax.rpc.flat import Codec

SERVICE = "monolith_jax.v1.TrainingPSData"
STEP = f"/{SERVICE}/Step"


def shard_of(keys, shards: int) -> np.ndarray:
    """The shard of each key: splitmix64's finalizer, modulo `shards`."""
    z = np.asarray(keys, np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z % np.uint64(shards)).astype(np.int64)


_codecs: dict = {}


def codecs() -> tuple[Codec, Codec]:
    """(request codec, reply codec) of Step; protobuf's generated module is
    loaded on first use."""
    if not _codecs:
        from monolith_jax.rpc import training_step_pb2 as pb

        _codecs["request"], _codecs["reply"] = Codec(pb.ShardStepRequest.DESCRIPTOR), Codec(pb.ShardStepReply.DESCRIPTOR)
    return _codecs["request"], _codecs["reply"]


# ------------------------------------------------------------------ server
def step(state, req) -> dict:
    """One Step of a shard (`ShardState`): the checks, the apply, the
    lookup. Returns the reply's fields."""
    import types

    t, keys = state.check_lookup(req.table, req.keys)
    updated = skipped = 0
    if req.apply:
        updated, skipped = state.apply(types.SimpleNamespace(
            table=req.table, keys=req.apply_keys, grads=req.grads, step=req.step, round=req.round,
            contributors=req.contributors, session=req.session))
    elif len(req.apply_keys) or len(req.grads):
        raise wire.RequestError("apply_keys or grads given without apply")
    out = np.empty((keys.size, t.dim), np.float32) if not req.read_only else None
    values, found = state.rows(t, keys, req.read_only, out=out)
    return {"values": np.ascontiguousarray(values, np.float32), "dim": t.dim, "updated": updated,
            "skipped": skipped, "found": None if found is None else found.astype(np.uint8)}


def step_handler(state):
    """The gRPC handler of TrainingPSData/Step for `state` (beside the
    TrainingPS servicer on the same server)."""
    import grpc

    request, reply = codecs()

    class Data:
        @wire.guard
        def Step(self, req, context):
            return step(state, req)

    return grpc.method_handlers_generic_handler(SERVICE, {"Step": grpc.unary_unary_rpc_method_handler(
        Data().Step, request_deserializer=request.decode, response_serializer=lambda r: reply.encode(**r))})


# ------------------------------------------------------------------ client
class Split:
    """A batch's keys, sorted once: `uniq` (sorted unique keys), `inverse`
    (each key's index in `uniq`), `parts` (per shard, the indices in `uniq`
    of its keys, ascending) and `keys` (per shard, its unique keys)."""

    def __init__(self, keys: np.ndarray, shards: int):
        self.size = keys.size
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        first = np.empty(sk.size, bool)
        first[:1] = True
        np.not_equal(sk[1:], sk[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        self.uniq = sk[starts]
        self.inverse = np.empty(keys.size, np.int64)
        self.inverse[order] = np.cumsum(first) - 1
        self._order, self._starts = order, starts
        if shards == 1:
            self.parts = [np.arange(self.uniq.size)]
            self.keys = [self.uniq]
            self.rows_index = self.inverse        # where each key's row is among the replies' rows
        else:
            owner = shard_of(self.uniq, shards)
            by_shard = np.argsort(owner, kind="stable")
            bounds = np.cumsum(np.bincount(owner, minlength=shards))[:-1]
            self.parts = np.split(by_shard, bounds)
            self.keys = [self.uniq[p] for p in self.parts]
            place = np.empty(self.uniq.size, np.int64)
            place[by_shard] = np.arange(self.uniq.size)
            self.rows_index = place[self.inverse]

    def same_keys(self, keys: np.ndarray) -> bool:
        return keys.size == self.size and np.array_equal(self.uniq[self.inverse], keys)

    def summed(self, grads: np.ndarray) -> np.ndarray:
        """Each unique key's gradients summed (uniq x dim float32), as one
        product with the 0/1 matrix of unique key by batch position (a
        sorted segment sum in one C pass; np.add.reduceat is ~8x slower on
        rows)."""
        import scipy.sparse

        n, u = self.size, self.uniq.size
        if n == 0:
            return np.zeros((0, grads.shape[1]), np.float32)
        index = np.int32 if n < 2**31 else np.int64    # scipy's own index type: no conversion inside
        m = scipy.sparse.csr_matrix((np.ones(n, np.float32), self._order.astype(index),
                                     np.append(self._starts, n).astype(index)), shape=(u, n))
        return np.ascontiguousarray(m @ grads, np.float32)

    def rows(self, values: np.ndarray) -> np.ndarray:
        """The batch's rows from the replies' rows (shard order, each
        shard's in `parts` order)."""
        return np.take(values, self.rows_index, axis=0)
