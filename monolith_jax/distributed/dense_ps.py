"""Asynchronous dense training, as Monolith's own parameter servers do it.

    dense = AsyncDense("127.0.0.1:7001", trainer_id="t1", every_steps=1)
    OnlineTrainer(trainer, bootstrap, dense_exchange=dense)     # no jax.distributed

The master copy of the dense params lives on a training PS shard
(`DenseMaster`, the `ExchangeDense` RPC). Each trainer takes its own
optimizer steps on its own batches; every `every_steps` steps it sends
the change its steps made since its last exchange and replaces its params
with the master copy, which by then holds every trainer's changes. No
trainer ever waits for another.

The trade-off against the synchronous default (`monolith_jax.distributed.data_parallel`):
- asynchronous: no barrier, so a slow or dead trainer holds nobody up and
  trainers may join and leave; but each gradient is computed on params up
  to (trainers - 1) x every_steps exchanges old, each trainer's optimizer
  state (Adam moments) sees only its own gradients, and the result depends
  on timing, so runs do not repeat exactly;
- synchronous: the step of one process on the whole batch, repeatable, the
  optimizer sees the mean gradient; the group moves at the pace of its
  slowest member and stops when one dies (restart it from snapshots).
Monolith chose asynchronous for its scale (hundreds of workers, where
stragglers are certain); at a handful of trainers synchronous is the
better default.
"""

from __future__ import annotations

import threading

import numpy as np

from monolith_jax.rpc.wire import RequestError, tensors_from_proto, tensors_to_proto


class DenseMaster:
    """The master dense params on a shard: init once, then deltas added."""

    def __init__(self):
        self.params: dict | None = None
        self.version = 0
        self._lock = threading.Lock()

    def exchange(self, req):
        from monolith_jax.rpc import serving_pb2 as pb

        tensors = tensors_from_proto(req.tensors)
        with self._lock:
            if req.init:
                if self.params is None:
                    self.params = {k: np.array(v, np.float32) for k, v in tensors.items()}
            elif self.params is None:
                raise RequestError("no dense params here yet: the first exchange must set init")
            else:
                if set(tensors) != set(self.params):
                    raise RequestError(f"delta names {sorted(set(tensors) ^ set(self.params))[:3]}... "
                                       "do not match the master params")
                for name, delta in tensors.items():
                    if delta.shape != self.params[name].shape:
                        raise RequestError(f"delta {name!r} has shape {delta.shape}, "
                                           f"the master {self.params[name].shape}")
                for name, delta in tensors.items():
                    self.params[name] += delta.astype(np.float32)
                self.version += 1
            return pb.DenseMaster(tensors=tensors_to_proto(self.params), version=self.version)


class AsyncDense:
    """A trainer's side of asynchronous dense training."""

    def __init__(self, address: str, trainer_id: str = "trainer", every_steps: int = 1, timeout_s: float = 30.0):
        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.rpc.wire import channel

        self.trainer_id, self.every_steps, self.timeout_s = trainer_id, max(int(every_steps), 1), timeout_s
        self._channel = channel(address)
        self._stub = pbg.TrainingPSStub(self._channel)
        self._base = None    # the params as of the last exchange: name -> array
        self._steps = 0
        self.exchanges = 0
        self.version = 0     # the master's version at the last exchange

    @staticmethod
    def _named(params) -> dict:
        import jax

        return {jax.tree_util.keystr(p): np.asarray(v, np.float32)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}

    def _set(self, trainer, reply) -> None:
        import jax

        got = tensors_from_proto(reply.tensors)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(trainer.params)
        values = [got[jax.tree_util.keystr(p)].astype(np.asarray(v).dtype) for p, v in leaves]
        trainer.params = jax.tree_util.tree_unflatten(treedef, [jax.device_put(v) for v in values])
        self._base = {jax.tree_util.keystr(p): np.asarray(v, np.float32) for (p, _), v in zip(leaves, values)}
        self.version = reply.version

    def start(self, trainer) -> None:
        """Takes the master params (this trainer's own if it is the first)."""
        from monolith_jax.rpc import serving_pb2 as pb

        reply = self._stub.ExchangeDense(pb.DenseExchange(trainer=self.trainer_id, init=True,
                                                          tensors=tensors_to_proto(self._named(trainer.params))),
                                         timeout=self.timeout_s, wait_for_ready=True)
        self._set(trainer, reply)

    def after_step(self, trainer) -> None:
        """Called after each training step: every `every_steps` steps, send
        this trainer's change and take the master copy."""
        from monolith_jax.rpc import serving_pb2 as pb

        if self._base is None:
            self.start(trainer)
            return
        self._steps += 1
        if self._steps % self.every_steps:
            return
        now = self._named(trainer.params)
        delta = {k: now[k] - self._base[k] for k in now}
        reply = self._stub.ExchangeDense(pb.DenseExchange(trainer=self.trainer_id, tensors=tensors_to_proto(delta)),
                                         timeout=self.timeout_s, wait_for_ready=True)
        self._set(trainer, reply)
        self.exchanges += 1

    def close(self) -> None:
        self._channel.close()
