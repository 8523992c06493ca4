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

The master never takes what would spoil it: a delta whose sum with the
master copy is not finite (a finite delta can still overflow to inf) is
not applied; the trainer gets the master copy as it was, with `refused`
saying why, and the master counts it (`refused_counts`). Deltas and
initial params that are not finite themselves, or do not match the
master's names and shapes, are INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from monolith_jax.rpc.wire import RequestError, tensors_from_proto, tensors_to_proto

log = logging.getLogger("monolith_jax.distributed.dense_ps")


class DenseMaster:
    """The master dense params on a shard: init once, then deltas added."""

    def __init__(self):
        self.params: dict | None = None
        self.version = 0
        self.refused = 0           # deltas not applied: the result would not be finite
        self._lock = threading.Lock()

    def refused_counts(self) -> dict:
        return {"dense_delta_not_finite": self.refused}

    def exchange(self, req):
        from monolith_jax.rpc import serving_pb2 as pb

        tensors = tensors_from_proto(req.tensors)   # finite, shapes that fit their bytes
        if not tensors:
            raise RequestError("a dense exchange without tensors")
        refused = ""
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
                # Summed into new arrays first: the master changes only if every result is finite.
                with np.errstate(over="ignore", invalid="ignore"):
                    new = {name: self.params[name] + delta.astype(np.float32) for name, delta in tensors.items()}
                bad = [name for name, a in new.items() if not np.all(np.isfinite(a))]
                if bad:
                    self.refused += 1
                    refused = (f"the delta of {req.trainer[:256]!r} would make {len(bad)} master params not "
                               f"finite (e.g. {bad[0]!r}); it was not applied")
                    log.warning("dense master: %s", refused)
                else:
                    self.params = new
                    self.version += 1
            return pb.DenseMaster(tensors=tensors_to_proto(self.params), version=self.version, refused=refused)


class AsyncDense:
    """A trainer's side of asynchronous dense training."""

    def __init__(self, address: str, trainer_id: str = "trainer", every_steps: int = 1, timeout_s: float = 30.0,
                 security=None):
        from monolith_jax.rpc import serving_pb2_grpc as pbg
        from monolith_jax.rpc.wire import channel

        self.trainer_id, self.every_steps, self.timeout_s = trainer_id, max(int(every_steps), 1), timeout_s
        self._channel = channel(address, security)
        self._stub = pbg.TrainingPSStub(self._channel)
        self._base = None    # the params as of the last exchange: name -> array
        self._steps = 0
        self.exchanges = 0
        self.refused = 0     # exchanges whose delta the master did not apply (its reply says why)
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
        with np.errstate(over="ignore", invalid="ignore"):
            delta = {k: now[k] - self._base[k] for k in now}
        if not all(np.all(np.isfinite(d)) for d in delta.values()):
            # This trainer's steps went non-finite: drop them, take the master copy.
            self.refused += 1
            log.warning("trainer %r: dense change since the last exchange is not finite; dropped, taking the "
                        "master copy", self.trainer_id)
            delta = {k: np.zeros_like(d) for k, d in delta.items()}
        reply = self._stub.ExchangeDense(pb.DenseExchange(trainer=self.trainer_id, tensors=tensors_to_proto(delta)),
                                         timeout=self.timeout_s, wait_for_ready=True)
        if reply.refused:   # this trainer's change is dropped; it goes on from the master copy
            self.refused += 1
            log.warning("dense master refused this trainer's delta: %s", reply.refused)
        self._set(trainer, reply)
        self.exchanges += 1

    def close(self) -> None:
        self._channel.close()
