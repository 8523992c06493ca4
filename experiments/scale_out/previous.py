"""The previous data plane, as a baseline measured in the same run: a
lookup and an apply per shard per step (TrainingPS/Lookup and Apply, which
the shards still serve), protobuf messages, gradients summed with
np.add.reduceat. One shard only; the benchmark's own code, not the
package's."""

from __future__ import annotations

import numpy as np


class PreviousShardedTable:
    """lookup_host / apply_gradients_host over one shard, as ShardedTable did them."""

    def __init__(self, config, address: str):
        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.rpc import wire

        self.name, self.dim = config.name, config.dim
        self._channel = wire.channel(address)
        self._stub = pbg.TrainingPSStub(self._channel)

    @staticmethod
    def _split(keys):
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        first = np.r_[True, sk[1:] != sk[:-1]] if sk.size else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        inverse = np.empty(keys.size, np.int64)
        inverse[order] = np.cumsum(first) - 1
        return sk[starts], inverse, order, starts

    def lookup_host(self, ids) -> np.ndarray:
        from monolith_jax.rpc import serving_pb2 as pb

        uniq, inverse, _, _ = self._split(np.asarray(ids, np.uint64))
        reply = self._stub.Lookup(pb.ShardLookupRequest(table=self.name, keys=uniq.tobytes()), timeout=60)
        return np.frombuffer(reply.values, np.float32).reshape(-1, self.dim)[inverse]

    def apply_gradients_host(self, ids, grads, *, step=0):
        from monolith_jax.rpc import serving_pb2 as pb

        grads = np.asarray(grads, np.float32).reshape(-1, self.dim)
        if not np.all(np.isfinite(grads)):
            raise ValueError("gradients are not all finite")
        uniq, _, order, starts = self._split(np.asarray(ids, np.uint64))
        summed = np.add.reduceat(grads[order], starts, axis=0)
        reply = self._stub.Apply(pb.ShardApplyRequest(table=self.name, keys=uniq.tobytes(), grads=summed.tobytes(),
                                                      step=int(step), contributors=1), timeout=60)
        return reply.updated, reply.skipped

    def close(self) -> None:
        self._channel.close()
