"""gRPC alone, for the benchmark's split of a shard's time: a server with
the Step method whose handler does no table work, answering each request
with a reply of the size a shard's would have (a row of zeros per key),
and a client that sends it the requests a ShardedTable would send for the
same batches. What a step costs here is what Python gRPC, the flat
messages and the thread hand-offs cost at this traffic, whatever the
engine does.

    python -m experiments.scale_out.echo --dim 64     # prints the port, serves until killed
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def serve(dim: int) -> None:
    import grpc

    from monolith_jax.distributed.ps_data import SERVICE, codecs
    from monolith_jax.rpc import wire

    request, reply = codecs()

    def step(req, context):
        return {"values": bytes(len(req.keys) // 8 * dim * 4), "dim": dim}

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Step": grpc.unary_unary_rpc_method_handler(
        step, request_deserializer=request.decode, response_serializer=lambda r: reply.encode(**r))})
    server, port = wire.start_server(lambda s: s.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0, 8)
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(3600)


class EchoClient:
    """lookup_host / apply_gradients_host that send a ShardedTable's one-shard
    requests to the echo server: this step's unique keys and the previous
    step's summed gradients, padded as the table pads them."""

    def __init__(self, address: str, dim: int):
        from monolith_jax.distributed.ps_data import PAD, STEP, codecs
        from monolith_jax.rpc import wire

        self.dim, self._pad = dim, PAD
        self._request, reply = codecs()
        self._channel = wire.channel(address)
        self._step = self._channel.unary_unary(STEP, request_serializer=None, response_deserializer=reply.decode)
        self._pending, self._prepared = None, {}

    def prepare(self, batches) -> None:
        """The batches' unique keys and gradients, made before the steps are timed."""
        self._prepared = {id(b): np.unique(b) for b in batches}
        self._prepared.update({("grads", id(b)): np.zeros((k.size, self.dim), np.float32)
                               for b, k in zip(batches, list(self._prepared.values()))})

    def lookup_host(self, ids) -> None:
        keys = self._prepared.get(id(ids))
        if keys is None:
            keys = np.unique(np.asarray(ids, np.uint64))
        apply = {}
        if self._pending is not None:
            akeys, agrads = self._pending
            apply = {"apply": True, "apply_keys": akeys, "grads": agrads, "contributors": 1}
        self._pending = None
        r = self._step(self._request.encode(pad=self._pad, table="ids", keys=keys, **apply), timeout=60)
        if len(r.values) != keys.size * self.dim * 4:
            raise RuntimeError("the echo answered the wrong size")
        self._last = keys

    def apply_gradients_host(self, ids, grads, *, step=0) -> None:
        g = self._prepared.get(("grads", id(ids)))
        self._pending = (self._last, g if g is not None else np.zeros((self._last.size, self.dim), np.float32))

    def flush(self) -> None:
        if self._pending is not None:
            akeys, agrads = self._pending
            self._pending = None
            self._step(self._request.encode(pad=self._pad, table="ids", apply=True, apply_keys=akeys, grads=agrads,
                                            contributors=1), timeout=60)

    def close(self) -> None:
        self._channel.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    serve(p.parse_args().dim)
