"""Several trainer processes, one model: data-parallel dense steps.

    dp = DataParallel("10.0.0.1:7070", num_processes=2, process_id=0)   # before any other JAX call
    trainer = make_trainer(...)                                         # the same seed in every process
    dp.attach(trainer)        # the same initial dense params everywhere (process 0's)
    trainer.train_step_host(batch)                                      # now an all-reduced step

Synchronous (the default, and what `DataParallel` does): each process
looks up its own batch's rows (tables on the host or on training PS
shards), then all processes run one SPMD program over the concatenated
batch: the dense gradient is the mean over every process's examples (XLA
all-reduces it; gloo on CPU, NCCL on GPUs), the optimizer step is the same
everywhere, so the dense params stay identical, and each process gets its
own rows' gradients back to apply. The result is the step one process
would take on the whole batch, except that an id in two processes' batches
gets two fused sparse updates instead of one with the summed gradient,
unless the tables are on training PS shards: those sum each round's
gradients per id and step it once (`ShardApplyRequest.contributors`).
Every process must call each step with the same batch size (the online
trainer agrees on it, `agree`); a process with no examples takes part with
an all-padding batch. The cost is a barrier per step: the group moves at
its slowest member's pace, and if one process dies the others wait (restart
the group; snapshots make that lossless).

A group of one process (`num_processes=1`) has nobody to all-reduce with:
`attach` puts its trainer on the mesh route over this process's devices
(`Trainer(mesh=)`), params replicated and updated there between steps.

Asynchronous, as Monolith's own parameter servers do it, is
`monolith_jax.distributed.dense_ps` (each trainer steps on its own and
exchanges parameter deltas with a dense shard): no barrier, a dead trainer
holds nobody up, at the price of stale gradients.

Creating a `DataParallel` initializes `jax.distributed` and, on CPU, picks
gloo for cross-process collectives; nothing happens at import.

The coordinator (process 0 runs it) listens where it was asked, and only
there: `coordinator_bind_address` is the coordinator's own address (JAX's
default binds every interface, `[::]`). JAX's coordination service has no
authentication, so a coordinator that is not loopback (trainers on several
machines) must be asked for: `allow_remote=True`, or the environment
variable `MONOLITH_ALLOW_REMOTE_COORDINATOR=1`; put it on a network only
the trainers reach.
"""

from __future__ import annotations

import os

import numpy as np

REMOTE_ENV = "MONOLITH_ALLOW_REMOTE_COORDINATOR"


def coordinator_bind(coordinator: str, allow_remote: bool | None = None) -> str:
    """The address the coordinator listens on: the one asked for. Refuses
    (ValueError) one that is not loopback unless allowed."""
    from monolith_jax.rpc.wire import is_loopback

    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"the coordinator must be HOST:PORT, got {coordinator!r}")
    if allow_remote is None:
        allow_remote = os.environ.get(REMOTE_ENV, "") not in ("", "0")
    if not is_loopback(host) and not allow_remote:
        raise ValueError(f"coordinator {coordinator!r} is not a loopback address; jax.distributed's coordination "
                         f"service has no authentication, so any host that reaches it could join the group. "
                         f"Pass allow_remote=True (or set {REMOTE_ENV}=1) for trainers on several machines, on a "
                         f"network only they reach")
    return coordinator


class DataParallel:
    def __init__(self, coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300,
                 allow_remote: bool | None = None):
        import jax

        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
        bind = coordinator_bind(coordinator, allow_remote)
        # Cross-process collectives on CPU need gloo; GPUs and TPUs ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                                   coordinator_bind_address=bind)
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.num_processes, self.process_id = num_processes, process_id
        self.mesh = jax.make_mesh((jax.device_count(),), ("batch",), devices=jax.devices())
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P("batch"))
        self._steps: dict = {}

    @property
    def chief(self) -> bool:
        return self.process_id == 0

    # ------------------------------------------------------- coordination
    def agree(self, values) -> np.ndarray:
        """Every process's small int vector -> their elementwise max, on all."""
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.asarray(values, np.int64).reshape(-1))
        return np.asarray(got).reshape(self.num_processes, -1).max(axis=0)

    def gather_json(self, value) -> list:
        """Every process's JSON value, in process order, on all."""
        import json

        data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32)
        size = int(self.agree([data.size])[0])
        from jax.experimental import multihost_utils

        padded = np.full(size + 1, -1, np.int32)
        padded[:data.size] = data
        got = np.asarray(multihost_utils.process_allgather(padded)).reshape(self.num_processes, -1)
        return [json.loads(bytes(row[row >= 0].astype(np.uint8)).decode()) for row in got]

    def barrier(self, name: str) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

    def broadcast(self, tree):
        """Process 0's pytree of arrays, on every process (host copies)."""
        import jax
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(jax.device_get(tree)))

    def attach(self, trainer) -> None:
        """Starts `trainer` from process 0's dense params and optimizer state
        and routes its host-tables step through the all-reduced program.

        A group of one process has no one to all-reduce with: its trainer
        takes the mesh route over this process's devices instead
        (`Trainer(mesh=)`, `placement.MeshDense`: params and optimizer state
        replicated on the devices and updated there, never copied through
        the host between steps; the batch split over them; overlapped as
        the trainer's `overlap` says), and `trainer.data_parallel` stays
        None (nothing to agree on). Several processes keep this program,
        which copies each process's params through the host every step
        (its arrays span every process's devices; the trainer's stay its
        own, to score and snapshot)."""
        import jax

        if self.num_processes == 1:
            from monolith_jax.placement import MeshDense

            trainer.mesh_dense = MeshDense(trainer, self.mesh)
            trainer.params = trainer.mesh_dense.place(trainer.params)
            trainer.opt_state = trainer.mesh_dense.place(trainer.opt_state)
            return  # (tables on training PS shards keep one contributor a round)
        trainer.params = jax.device_put(self.broadcast(trainer.params))
        trainer.opt_state = jax.device_put(self.broadcast(trainer.opt_state))
        trainer.data_parallel = self
        # Tables on training PS shards sum the group's gradients per id and
        # step each id once a round, as one process would on the whole batch.
        # int32: JAX without x64 would cut a 64-bit value.
        session = int(self.broadcast(np.random.default_rng().integers(1, 2**31 - 1, dtype=np.int32)))
        for t in trainer.tables.values():
            if hasattr(t, "contributors"):
                t.contributors, t.session = self.num_processes, session

    # --------------------------------------------------------------- step
    def _global(self, tree, sharding):
        import jax

        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)

    def _replicated(self, tree):
        """The dense params as the program's replicated input. With one
        device per process they stay where they are (no host round trip
        each step: they may live on an accelerator)."""
        import jax

        if jax.local_device_count() > 1:
            return self._global(tree, self.replicated)
        here = jax.local_devices()[0]
        return jax.tree.map(lambda a: jax.make_array_from_single_device_arrays(
            np.shape(a), self.replicated, [jax.device_put(a, here)]), tree)

    def _own(self, tree):
        """A replicated result -> this process's copy, on its device."""
        import jax

        if jax.local_device_count() > 1:
            here = jax.local_devices()[0]
            return jax.tree.map(lambda a: jax.device_put(self._local(a), here), tree)
        return jax.tree.map(lambda a: a.addressable_data(0), tree)

    def _local(self, a) -> np.ndarray:
        shards = sorted(a.addressable_shards,
                        key=lambda s: (s.index[0].start or 0) if s.index and isinstance(s.index[0], slice) else 0)
        if len(shards) == 1 or a.sharding.is_fully_replicated:
            return np.asarray(shards[0].data)
        return np.concatenate([np.asarray(s.data) for s in shards])

    def step(self, trainer, rows: dict, batch):
        """One synchronous step: (params, opt_state, loss, row gradients), all local."""
        import jax

        from monolith_jax.features import SparseBatch

        program = self._steps.get(id(trainer))
        if program is None:
            program = jax.jit(trainer._dense_step,
                              out_shardings=(self.replicated, self.replicated, self.replicated, self.split))
            self._steps[id(trainer)] = program
        # The program reads lengths, dense features, labels and weights; the
        # ids stay here (their rows are the `rows` argument).
        local = SparseBatch(ids={}, lengths=batch.lengths, dense=batch.dense, labels=batch.labels,
                            weights=batch.weights, label_mask=batch.label_mask)
        params, opt_state, loss, g_rows = program(
            self._replicated(trainer.params), self._replicated(trainer.opt_state),
            self._global(rows, self.split), self._global(local, self.split))
        return self._own(params), self._own(opt_state), self._local(loss), {k: self._local(v) for k, v in g_rows.items()}
