"""The training PS data plane: one `Step` request per shard per training
step (`proto/training_step.proto`), read and written without protobuf
objects (`monolith_jax.rpc.flat`).

A step's request carries the previous step's summed gradients of the
shard's ids and this step's unique ids of the shard; the shard applies the
gradients first and looks the ids up after, so the lookup sees them. The
shard checks the whole request (table, keys of this shard, a reply that
fits, then the apply's own checks) before it touches a row; a refused
request changes nothing. The apply reads the gradients where gRPC received
them (a numpy view: the client pads its requests so that every array
starts 8-aligned, `PAD`), the lookup writes the rows into the buffer that
becomes the reply.

The client's side of a batch is the engine's, without the GIL and without
a loop over ids in Python (`Split`): one pass groups the batch's unique
ids by shard and gives each id's row among the replies, one sums the
gradients per unique id (and says whether every sum is finite), one
gathers the batch's rows from the replies.
"""

from __future__ import annotations

import numpy as np

from monolith_jax.rpc import wire
from monolith_jax.rpc.flat import Codec

SERVICE = "monolith_jax.v1.TrainingPSData"
STEP = f"/{SERVICE}/Step"
# The field number of a request's padding (`flat.Codec.encode`): each array
# starts 8-aligned in the message, so the shard hands the engine the bytes
# where gRPC received them (an unaligned float32 or uint64 view is a copy).
PAD = 15


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
    """A batch's keys, grouped once by the engine (`group_keys`, one pass
    without the GIL): `grouped` (the unique keys, shard 0's ascending, then
    shard 1's, ...), `keys` (per shard, its part of `grouped`) and
    `rows_index` (each key's place in `grouped`: the shards answer their
    rows in that order)."""

    def __init__(self, keys: np.ndarray, shards: int):
        from monolith_jax.sparse._native import engine

        self._engine = engine()
        self.size = keys.size
        self.grouped, self.bounds, self.rows_index = self._engine.group_keys(keys, shards)
        self.keys = [self.grouped[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def same_keys(self, keys: np.ndarray) -> bool:
        return keys.size == self.size and np.array_equal(self.grouped[self.rows_index], keys)

    def summed(self, grads: np.ndarray) -> tuple[np.ndarray, bool]:
        """(each unique key's gradients summed, grouped x dim float32, in
        `grouped` order; whether every sum is finite): one pass of the
        engine over the batch's gradients."""
        grads = np.ascontiguousarray(grads, np.float32)
        out = np.empty((self.grouped.size, grads.shape[1]), np.float32)
        return out, self._engine.sum_rows(grads, self.rows_index, self.grouped.size, out)

    def parts(self, summed: np.ndarray) -> list:
        """Per shard, its rows of `summed` (views)."""
        return [summed[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def rows(self, values: np.ndarray) -> np.ndarray:
        """The batch's rows from the replies' rows (`grouped` order)."""
        out = np.empty((self.size, values.shape[1]), np.float32)
        self._engine.take_rows(np.ascontiguousarray(values, np.float32), self.rows_index, out)
        return out
