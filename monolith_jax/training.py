"""`Trainer`: the jitted training step, `fit` (epochs, validation, progress), evaluation, state copies.

One step, one XLA program on CPU:

    rows   = lookup(ids)                        per table, FFI (C++)
    loss   = model(pool(rows), dense)           Flax NNX, XLA
    g_params, g_rows = grad(loss)
    params = optax update(g_params)             dense: mean gradient
    apply(ids, g_rows)                          per table, fused optimizer (C++)

Sparse rows get each example's own gradient (the loss summed over the
batch, as sparse training does; `sparse_loss="mean"` divides by the batch
instead), dense parameters the batch mean. Evaluation reads rows with a
read-only find on the host, so it creates no rows and counts no admission
sightings; unknown ids read zeros.

A model returns one logit per example: shape (B,), or (B, 1) (read as
(B,)); a model of several objectives returns a dict of them by head name,
and the trainer is given the heads (`heads=`, `monolith_jax.heads`: their
losses, weights, metrics). Any other shape is refused while the first step is traced, naming
the model, so that a (B, 1) against (B,) labels cannot broadcast to a
(B, B) loss and train to nothing.

    trainer.fit(batches, epochs=1, validation=None, max_steps=None)
    state = trainer.state_dict()          # a deep copy: numpy arrays, dicts, ints
    trainer.load_state_dict(state)        # back to it exactly
"""

from __future__ import annotations

import collections.abc
import itertools
import json
import sys
import time
from typing import Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from monolith_jax.embedding import EmbeddingCollection, SparseFeatures
from monolith_jax import heads as _heads
from monolith_jax import placement as _placement
from monolith_jax.features import DenseFeature, SparseBatch, SparseFeature
from monolith_jax.metrics import auc, log_loss
from monolith_jax.sparse import Keys, TableConfig


Batches = Union[Iterable[SparseBatch], Callable[[], Iterable[SparseBatch]]]


def calibration(labels, probs, weights=None) -> float:
    """Mean predicted probability over the observed rate (1.0 is calibrated)."""
    w = np.ones_like(labels) if weights is None else weights
    return float(np.sum(probs * w) / max(np.sum(labels * w), 1e-12))


def _batch_rows(batch: SparseBatch):
    """The batch size B (static; symbolic under `jax.export`)."""
    for a in (batch.labels, batch.dense, *batch.lengths.values()):
        if a is not None:
            return a.shape[0]
    raise ValueError("the batch holds no labels, dense features or lengths to take its size from")


def check_logits(logits, rows, model_name: str):
    """A model's output as (B,) logits: (B,) as it is, (B, 1) squeezed; any
    other shape refused naming the model (shapes are static: this runs when
    the step is traced, so the first step fails, not the thousandth)."""
    shape = getattr(logits, "shape", None)
    if shape is None:
        raise TypeError(f"{model_name} returned {type(logits).__name__}; expected an array of logits of shape "
                        f"({rows},): one per example")
    shape = tuple(shape)
    if len(shape) == 2 and shape[1] == 1 and shape[0] == rows:
        logits = logits[:, 0]
    elif shape != (rows,):
        raise ValueError(f"{model_name} returned logits of shape {shape}; expected ({rows},) (one logit per "
                         f"example) or ({rows}, 1)")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{model_name} returned logits of dtype {logits.dtype}; expected a float dtype")
    return logits


def _is_one_shot(obj) -> bool:
    return isinstance(obj, collections.abc.Iterator)


class _Passes:
    """`batches` / `validation` of `fit`: each `new()` is one pass."""

    def __init__(self, what: str, source, passes: int):
        self.what = what
        if isinstance(source, collections.abc.Iterable):
            if passes > 1 and _is_one_shot(source):
                raise ValueError(
                    f"fit(epochs={passes}): {what} is a one-shot iterator ({type(source).__name__}), which the "
                    f"first epoch would use up; pass a list, or a function of no arguments that returns a "
                    f"new iterable each time, e.g. fit(lambda: iter_batches(...), epochs={passes})")
            self._new = lambda: source
        elif callable(source):
            self._new = source
        else:
            raise TypeError(f"{what} must be an iterable of SparseBatches or a function of no arguments "
                            f"returning one, got {type(source).__name__}")

    def new(self):
        it = self._new()
        if not isinstance(it, collections.abc.Iterable):
            raise TypeError(f"{self.what}() returned {type(it).__name__}, not an iterable of SparseBatches")
        return it


def _path_name(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if len(parts) > 1 and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()   # an nnx Variable's array
    return "/".join(parts)


def _named_leaves(tree) -> dict:
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = _path_name(path)
        named[name if name not in named else jax.tree_util.keystr(path)] = leaf
    return named


def _flat_copy(tree) -> dict:
    """{path name: a numpy copy of the leaf}."""
    return {name: np.array(leaf) for name, leaf in _named_leaves(tree).items()}


def _restored(tree, arrays, what: str):
    """`tree` with its leaves replaced by copies of `arrays` ({path name:
    array}, as `_flat_copy` gives), each checked for name, shape and dtype;
    each lands where the leaf it replaces lives."""
    if not isinstance(arrays, dict):
        raise TypeError(f"state {what!r} must be a dict of arrays, got {type(arrays).__name__}")
    mine = _named_leaves(tree)
    missing, extra = sorted(set(mine) - set(arrays)), sorted(set(arrays) - set(mine))
    if missing or extra:
        raise ValueError(f"state {what!r} does not fit this trainer: missing {missing}, unexpected {extra}")
    leaves = []
    for name, leaf in mine.items():
        a = np.asarray(arrays[name])
        if a.shape != tuple(np.shape(leaf)) or a.dtype != np.dtype(leaf.dtype):
            raise ValueError(f"state {what!r}: {name} is {a.dtype}{a.shape}, this trainer's is "
                             f"{np.dtype(leaf.dtype)}{tuple(np.shape(leaf))}")
        a = np.array(a)  # our own copy: the state given stays the caller's
        sharding = getattr(leaf, "sharding", None)
        leaves.append(jax.device_put(a, sharding) if sharding is not None else jax.device_put(a))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


class _Progress:
    """fit's progress lines: the first step (with its compile time), then
    every `every` steps or `every_s` seconds, whichever comes first. On a
    terminal (`out` is print, stdout a tty) the line updates in place;
    elsewhere each is a plain line."""

    def __init__(self, out, every: int, every_s: float):
        self.active = every > 0         # progress is logged (metrics JSONL) and printed
        self.out = out if self.active else None
        self.every, self.every_s = every, every_s
        self.in_place = out is print and sys.stdout.isatty()
        self._open = 0  # width of the in-place line now shown, 0 if none

    def line(self, text: str, final: bool = False) -> None:
        if self.out is None:
            return
        if self.in_place:
            pad = " " * max(self._open - len(text), 0)
            if final:
                print("\r" + text + pad, flush=True)
                self._open = 0
            else:
                print("\r" + text + pad, end="", flush=True)
                self._open = len(text)
        else:
            self.out(text)

    def close(self) -> None:
        if self.out is not None and self.in_place and self._open:
            print(flush=True)
            self._open = 0


class Trainer:
    def __init__(self, model: nnx.Module, tables: Sequence[TableConfig], features: Sequence[SparseFeature],
                 dense_features: Sequence[DenseFeature] = (), optimizer: optax.GradientTransformation | None = None,
                 sparse_loss: str = "sum", metrics_path: str | None = None, log_every: int = 100,
                 out=print, log_every_s: float = 5.0, tensorboard_dir: str | None = None,
                 heads=None, placement: str = "auto", overlap: bool | None = None, staleness: int = 0, mesh=None,
                 donate: bool | None = None):
        """placement: where the step runs (`monolith_jax.placement`): "auto"
        takes the in-jit step when the dense step runs on the CPU and the
        host-tables step otherwise (GPU, TPU, tables on training PS shards,
        data parallel); "in_jit" or "host" choose. overlap: the
        host-tables step of `fit` and of the online trainer
        (`host_pipeline`) overlaps the host's decode, lookup and apply with
        the device (the same result as without); None: when the dense step
        runs off the CPU (on the CPU the host's work and the step share the
        cores: measured slower, experiments/placement). staleness=1: it also lets
        a row shared by consecutive batches be read one step stale (faster,
        not exact; see `monolith_jax.placement`). mesh: a one-axis
        `jax.sharding.Mesh` of this process's devices: the dense step runs
        data parallel on them (params replicated there, batches split;
        `placement.MeshDense`), with the tables on the host. donate: the
        host-tables step's program takes over the buffers of the dense
        params, the optimizer state and the step's rows (its outputs reuse
        them: no second copy of the model on the device); a reference kept
        to `trainer.params` from before a step is then deleted by the step
        (copy it, or `state_dict()`, to keep it). None: when the dense step
        runs off the CPU (on the CPU it measured no faster,
        experiments/placement). Likewise `pack_transfers`, the rows of all
        tables sent as one buffer and their gradients fetched as one.
        heads: the job's `Head`s (None: one binary head; the model
        returns one logit per example, labels are (B,)). metrics_path: a JSONL file of every logged record; tensorboard_dir:
        the same records as TensorBoard scalars (monolith_jax.tensorboard).
        log_every: `fit` prints and logs its progress at the first step,
        then every `log_every` steps or `log_every_s` seconds, whichever
        comes first; 0 (or out=None) prints nothing. out: where lines go
        (print, or any function of one string)."""
        if sparse_loss not in ("sum", "mean"):
            raise ValueError("sparse_loss must be 'sum' or 'mean'")
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an int >= 0 (0: quiet), got {log_every!r}")
        if not log_every_s > 0:
            raise ValueError(f"log_every_s must be > 0, got {log_every_s!r}")
        self.features = tuple(features)
        self.collection = EmbeddingCollection(tables, features)
        self.pooling = SparseFeatures(features)
        self.dense_features = tuple(dense_features)
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = optimizer or optax.adam(1e-3)
        self.opt_state = self.tx.init(self.params)
        self.sparse_loss = sparse_loss
        self.step_count = 0
        self.examples = 0
        self.log_every = log_every
        self.log_every_s = float(log_every_s)
        self.model_name = type(model).__name__
        self.heads = _heads.check_heads(heads)
        self.data_parallel = None  # a distributed.DataParallel: the host-tables step all-reduces
        self.placement = _placement.check_placement(placement)
        if staleness not in (0, 1):
            raise ValueError(f"staleness must be 0 or 1 (steps a looked-up row may lag), got {staleness!r}")
        self.overlap, self.staleness = overlap, staleness
        self.host_stats: dict = {}  # fit's host-tables step: seconds per phase (monolith_jax.placement.steps)
        self.out = out
        self._metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
        self._events = None
        if tensorboard_dir:
            from monolith_jax.tensorboard import EventWriter

            self._events = EventWriter(tensorboard_dir)
        off_cpu = _placement.dense_platform() != "cpu"
        self.donate = off_cpu if donate is None else bool(donate)
        if self.donate:  # the step takes over its inputs' buffers: not those of the model given
            self.params = jax.tree.map(jnp.copy, self.params)
        # The host-tables step sends a step's rows in one buffer and gets their
        # gradients back in one (`placement.pack_rows`), not one per table: off
        # the CPU (on it, a table's rows pass without a copy; packing is one).
        self.pack_transfers = off_cpu
        self.mesh_dense = None if mesh is None else _placement.MeshDense(self, mesh)
        if self.mesh_dense is not None:
            self.params, self.opt_state = self.mesh_dense.place(self.params), self.mesh_dense.place(self.opt_state)
        self._train = jax.jit(self._train_step)
        donated = (0, 1, 2) if self.donate else ()
        self._dense = jax.jit(self._dense_step, donate_argnums=donated)
        self._dense_packed = jax.jit(self._dense_packed_step, static_argnums=(4,), donate_argnums=donated)
        self._logits = jax.jit(self._forward)
        self._in_flight = None  # the last in-jit step's table-update tokens, until `settle`

    @property
    def tables(self):
        return self.collection.tables

    def model(self) -> nnx.Module:
        """The model with the current dense parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    # ------------------------------------------------------------ programs
    def _forward(self, params, table_rows, batch: SparseBatch):
        """Logits (B,) (a dict of them by head name, for a job with heads):
        the model on pooled rows, its output shape checked."""
        fields = self.pooling(self.collection.split(table_rows), batch.lengths)
        logits = nnx.merge(self.graphdef, params, self.rest)(fields, batch.dense)
        if self.heads is not None:
            return _heads.outputs_by_head(logits, self.heads, _batch_rows(batch), self.model_name)
        return check_logits(logits, _batch_rows(batch), self.model_name)

    def _loss(self, logits, batch: SparseBatch, n):
        """The batch's loss: weighted BCE for one head, the heads' weighted sum otherwise."""
        if self.heads is not None:
            return _heads.total_loss(logits, batch, self.heads, n)
        return jnp.sum(batch.weights * optax.sigmoid_binary_cross_entropy(logits, batch.labels)) / n

    def _train_step(self, params, opt_state, batch: SparseBatch, step):
        rows = self.collection.lookup(batch)
        n = jnp.maximum(batch.weights.sum(), 1.0)

        def loss_fn(params, rows):
            logits = self._forward(params, rows, batch)
            return self._loss(logits, batch, n), logits

        (loss, logits), (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, rows)
        if self.sparse_loss == "sum":
            g_rows = jax.tree.map(lambda g: g * n, g_rows)
        updates, opt_state = self.tx.update(g_params, opt_state, params)
        params = optax.apply_updates(params, updates)
        tokens = self.collection.apply(batch, g_rows, step)
        return params, opt_state, loss, self._scores(logits), tokens

    def _scores(self, logits):
        """What `predict` returns, from logits: probabilities (values of value heads)."""
        if self.heads is not None:
            return _heads.scores(logits, self.heads)
        return jax.nn.sigmoid(logits)

    def _dense_step(self, params, opt_state, rows, batch: SparseBatch):
        """The host-tables step's program: rows in, the dense update and the
        rows' gradients out (no table call inside, so it runs on any device)."""
        n = jnp.maximum(batch.weights.sum(), 1.0)

        def loss_fn(params, rows):
            logits = self._forward(params, rows, batch)
            return self._loss(logits, batch, n)

        loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        if self.sparse_loss == "sum":
            g_rows = jax.tree.map(lambda g: g * n, g_rows)
        updates, opt_state = self.tx.update(g_params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, g_rows

    def _dense_packed_step(self, params, opt_state, flat, batch: SparseBatch, layout):
        """`_dense_step` on the rows packed in one (B, total) buffer
        (`placement.pack_rows`; layout static), the rows' gradients packed
        alike: one transfer each way whatever the number of tables."""
        params, opt_state, loss, g_rows = self._dense_step(params, opt_state, _placement.unpack(flat, layout),
                                                           batch)
        return params, opt_state, loss, _placement.pack(g_rows, layout, jnp)

    # ------------------------------------------------------------- driving
    def train_step_host(self, batch: SparseBatch, stamp: int | None = None) -> float:
        """One step with the tables on the host: rows are looked up from host
        code (`table.lookup_host`), the jitted dense step (on whatever device
        JAX uses) returns their gradients, and the tables apply them
        (`table.apply_gradients_host`). The same update as `train_step`; the
        path for accelerators and for tables in other processes (any object
        with those two methods)."""
        stamp = self.step_count if stamp is None else stamp
        coll = self.collection
        keys = {name: Keys(coll.host_words(batch, name)).to_numpy()
                for name in coll.tables if coll.by_table[name]}
        rows = {name: coll.tables[name].lookup_host(k) for name, k in keys.items()}
        if self.data_parallel is not None:
            self.params, self.opt_state, loss, g_rows = self.data_parallel.step(self, rows, batch)
        elif self.mesh_dense is not None:
            self.params, self.opt_state, loss, g_rows = self.mesh_dense(self.params, self.opt_state, rows, batch)
        else:
            self.params, self.opt_state, loss, g_rows = self._dense(self.params, self.opt_state, rows, batch)
        for name, g in g_rows.items():
            coll.tables[name].apply_gradients_host(keys[name], np.asarray(g), step=stamp)
        self.step_count += 1
        self.examples += int(np.sum(batch.weights))
        return loss

    def step_placement(self) -> str:
        """"in_jit" or "host": the step `train_step` and `fit` take, from
        `placement` and where the dense step runs (decided now: tables may
        be swapped for training PS shards after construction)."""
        from monolith_jax.sparse import EmbeddingTable

        local = all(isinstance(t, EmbeddingTable) for t in self.tables.values())
        return _placement.choose(self.placement, _placement.dense_platform(), local,
                                 self.data_parallel is not None or self.mesh_dense is not None)

    def train_step(self, batch: SparseBatch, stamp: int | None = None, scores: bool = False):
        """One step; returns the batch's mean loss (before the update).
        stamp: the rows' `last_update` (event time in seconds for online
        training, so that expiry works in event time); default the step.
        The in-jit step or the host-tables one, as `step_placement()` says.
        scores: returns (loss, scores) instead: the batch scored by the model
        before this update, as `predict` returns them (prequential scores).
        The in-jit step gives its own forward pass's, at no extra cost: the
        rows as the step reads them, so a row the step creates scores with
        its initial values where `predict` reads zeros. They are the step's
        own outputs, not waited for (`np.asarray` them; a dict by head name
        for a job with heads). The host-tables step scores with `predict`
        first."""
        if self.step_placement() == "host":
            before = self.predict(batch) if scores else None
            loss = self.train_step_host(batch, stamp)
            return (loss, before) if scores else loss
        stamp = self.step_count if stamp is None else stamp
        self.params, self.opt_state, loss, probs, self._in_flight = self._train(self.params, self.opt_state,
                                                                                batch, stamp)
        self.step_count += 1
        self.examples += int(np.sum(batch.weights))
        return (loss, probs) if scores else loss

    def fit(self, batches: Batches, epochs: int = 1, validation: Batches | None = None,
            max_steps: int | None = None) -> dict:
        """Trains `epochs` passes over `batches`, printing and logging its
        progress from the first step.

        batches, validation: an iterable of SparseBatches that can be
        iterated again (a list), or a function of no arguments returning a
        new iterable per pass (`lambda: iter_batches(...)`); a one-shot
        iterator (a generator) serves one epoch only and is refused for
        more. validation: evaluated after every epoch (AUC, log loss,
        calibration), printed and logged as an "epoch" event.
        max_steps: at most this many steps in all (across epochs).

        Returns {"event": "fit", steps, examples, seconds, examples_per_s,
        loss (mean over the steps), epochs: one dict per epoch (epoch,
        steps, examples, seconds, loss, and validation's metrics if
        given)}."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 0):
            raise ValueError(f"max_steps must be an int >= 0 or None, got {max_steps!r}")
        train = _Passes("batches", batches, epochs)
        val = None if validation is None else _Passes("validation", validation, epochs)
        progress = _Progress(self.out, self.log_every, self.log_every_s)
        report_epochs = epochs > 1 or val is not None
        t0 = time.perf_counter()
        steps, seen, loss_sum, history = 0, 0, 0.0, []
        try:
            for epoch in range(epochs):
                if max_steps is not None and steps >= max_steps:
                    break
                source = train.new()
                if max_steps is not None:
                    source = itertools.islice(source, max_steps - steps)
                record = self._epoch(source, progress, steps, f"epoch {epoch + 1}/{epochs}  " if epochs > 1 else "")
                if record["steps"] == 0 and epoch > 0 and history[0]["steps"] > 0:
                    raise ValueError(f"fit: epoch {epoch + 1} got no batches: `batches` gave an exhausted "
                                     f"iterable (a function must return a new iterable on every call)")
                steps += record["steps"]
                seen += record["examples"]
                loss_sum += record.pop("loss_sum")
                record = {"epoch": epoch + 1, **record}
                if val is not None:
                    result = self._evaluate(val.new())
                    record["validation"] = {k: v for k, v in result.items() if k != "event"}
                history.append(record)
                if report_epochs:
                    self._log({"event": "epoch", "epochs": epochs, **record})
                    progress.line(self._epoch_line(record, epochs), final=True)
        finally:
            progress.close()
        jax.block_until_ready(self.params)
        seconds = time.perf_counter() - t0
        summary = {"event": "fit", "steps": steps, "examples": seen, "seconds": seconds,
                   "examples_per_s": seen / max(seconds, 1e-9),
                   "loss": loss_sum / steps if steps else float("nan")}
        self._log(summary)
        return {**summary, "epochs": history}

    def _stepping(self, source):
        """(batch, loss) per batch of `source`, trained by the placed step;
        the host-tables step overlapped with the device where asked (a
        data-parallel step is synchronous: `train_step_host` per batch)."""
        if self.step_placement() == "host" and self.data_parallel is None:
            return _placement.steps(self, source, overlap=self.overlapping(), staleness=self.staleness,
                                    stats=self.host_stats)
        return ((batch, self.train_step(batch)) for batch in source)

    def overlapping(self) -> bool:
        """Whether the host-tables step overlaps the host's work with the
        device: `overlap` if given, else when the dense step runs off the CPU."""
        return self.overlap if self.overlap is not None else _placement.dense_platform() != "cpu"

    def host_pipeline(self, overlap: bool | None = None) -> "_placement.HostPipeline":
        """The host-tables step batch by batch (`placement.HostPipeline`:
        `submit(batch, stamp=)` returns the steps wholly applied, `drain()`
        the rest), overlapped as `overlapping()` says (or `overlap`), with
        this trainer's staleness; its phases add up in `host_stats`. Not for
        a data-parallel trainer (its step is collective: `train_step_host`)."""
        if self.data_parallel is not None:
            raise ValueError("a data-parallel trainer steps in lockstep: train_step_host per batch")
        return _placement.HostPipeline(self, self.overlapping() if overlap is None else overlap, self.staleness,
                                       self.host_stats)

    def _epoch(self, source, progress: _Progress, steps_before: int, prefix: str) -> dict:
        """One pass over `source`: {steps, examples, seconds, loss, loss_sum}."""
        t0 = time.perf_counter()
        steps, seen, loss_sum = 0, 0, 0.0
        window, window_seen, last_t = [], 0, t0
        stepping = self._stepping(source)
        cache = self._compiled_count() if steps_before == 0 else None
        first_t = time.perf_counter()
        for batch, loss in stepping:
            if steps == 0 and steps_before == 0:
                loss = jax.block_until_ready(loss)
                took = time.perf_counter() - first_t
                compiled = cache is not None and self._compiled_count() != cache
                n = int(np.sum(batch.weights))
                steps, seen, loss_sum = 1, n, float(loss)
                what = f"compiled and ran in {took:.2f} s" if compiled else f"ran in {took:.3f} s"
                if progress.active:
                    self._log({"event": "train", "step": self.step_count, "examples": self.examples,
                               "loss": float(loss), "first_step_s": took, "compiled": compiled})
                progress.line(f"{prefix}step {self.step_count:>7}  first step {what}  loss {float(loss):.4f}")
                last_t = time.perf_counter()
                continue
            window.append(loss)
            n = int(np.sum(batch.weights))
            steps += 1
            seen += n
            window_seen += n
            now = time.perf_counter()
            if progress.active and (steps % progress.every == 0 or now - last_t >= progress.every_s):
                losses = jax.device_get(window)
                loss_sum += float(np.sum(losses))
                now = time.perf_counter()
                rate = window_seen / max(now - last_t, 1e-9)
                loss = float(np.mean(losses))
                self._log({"event": "train", "step": self.step_count, "examples": self.examples, "loss": loss,
                           "examples_per_s": rate})
                progress.line(f"{prefix}step {self.step_count:>7}  {seen:>10,} examples  {rate:>9,.0f} ex/s  "
                              f"loss {loss:.4f}")
                window, window_seen, last_t = [], 0, now
        if window:
            loss_sum += float(np.sum(jax.device_get(window)))
        seconds = time.perf_counter() - t0
        return {"steps": steps, "examples": seen, "seconds": seconds, "examples_per_s": seen / max(seconds, 1e-9),
                "loss": loss_sum / steps if steps else float("nan"), "loss_sum": loss_sum, "step": self.step_count}

    def _compiled_count(self):
        """How many programs the training step has compiled (None if JAX does not say)."""
        try:
            if self.mesh_dense is not None:
                return self.mesh_dense.program._cache_size() + self.mesh_dense.packed._cache_size()
            if self.step_placement() == "host":
                return self._dense._cache_size() + self._dense_packed._cache_size()
            return self._train._cache_size()
        except AttributeError:
            return None

    @staticmethod
    def _epoch_line(record: dict, epochs: int) -> str:
        text = (f"epoch {record['epoch']}/{epochs}  {record['steps']} steps  {record['examples']:,} examples  "
                f"loss {record['loss']:.4f}  {record['seconds']:.1f} s")
        v = record.get("validation")
        if v is not None and "heads" in v:
            text += f"  validation: {_heads.describe(v['heads'])}  ({v['examples']:,} examples)"
        elif v is not None:
            text += (f"  validation: auc {v['auc']:.4f}  logloss {v['logloss']:.4f}  "
                     f"calibration {v['calibration']:.3f}  ({v['examples']:,} examples)")
        return text

    def settle(self) -> None:
        """Waits for the in-jit steps dispatched so far, their table updates
        included: JAX runs a step asynchronously, and a host read of the
        tables (`predict`, `state_dict`) must not see rows the step is still
        updating. The host-tables step applies before it returns."""
        if self._in_flight is not None:
            jax.block_until_ready((self._in_flight, self.params))
            self._in_flight = None

    def predict(self, batch: SparseBatch):
        """Probabilities, from rows read without creating any; for a job with
        heads, a dict by head name (probabilities of binary heads, values
        of value heads)."""
        self.settle()
        rows = self.collection.find_host(batch)
        out = self._scores(self._logits(self.params, rows, batch))
        if self.heads is not None:
            return {k: np.asarray(v) for k, v in out.items()}
        return np.asarray(out)

    def evaluate(self, batches: Iterable[SparseBatch]) -> dict:
        """AUC, log loss and calibration over the real (weight > 0) rows,
        read-only (no rows created); logged as an "eval" event. With heads:
        {"heads": {name: metrics}} (RMSE for value heads), and the first
        binary head's AUC, log loss and calibration at the top."""
        result = self._evaluate(batches)
        self._log(result)
        return result

    def _evaluate(self, batches: Iterable[SparseBatch]) -> dict:
        if self.heads is not None:
            return self._evaluate_heads(batches)
        labels, probs, weights = [], [], []
        for batch in batches:
            probs.append(self.predict(batch))
            labels.append(np.asarray(batch.labels))
            weights.append(np.asarray(batch.weights))
        if not probs:
            raise ValueError("evaluate: no batches to evaluate")
        y, p, w = (np.concatenate(a) for a in (labels, probs, weights))
        real = w > 0
        return {"event": "eval", "step": self.step_count, "examples": int(real.sum()),
                "auc": auc(y[real], p[real]), "logloss": log_loss(y[real], p[real]),
                "calibration": calibration(y[real], p[real])}

    def _evaluate_heads(self, batches: Iterable[SparseBatch]) -> dict:
        labels, preds, weights, masks = [], [], [], []
        for batch in batches:
            preds.append(self.predict(batch))
            labels.append(np.asarray(batch.labels).reshape(len(batch.weights), -1))
            weights.append(np.asarray(batch.weights))
            masks.append(np.ones_like(labels[-1]) if batch.label_mask is None else np.asarray(batch.label_mask))
        if not preds:
            raise ValueError("evaluate: no batches to evaluate")
        y, w, m = np.concatenate(labels), np.concatenate(weights), np.concatenate(masks)
        p = {h.name: np.concatenate([b[h.name] for b in preds]) for h in self.heads}
        per_head = _heads.evaluate(self.heads, y, p, w, m)
        result = {"event": "eval", "step": self.step_count, "examples": int((w > 0).sum()), "heads": per_head}
        first = next((per_head[h.name] for h in self.heads if h.binary), None)
        if first is not None:
            result.update(auc=first["auc"], logloss=first["logloss"], calibration=first["calibration"])
        return result

    # --------------------------------------------------------------- state
    def state_dict(self, tables: bool = True) -> dict:
        """A deep copy of the whole training state, in plain values:

            {"params":     {path: np.ndarray},   the dense parameters
             "opt_state":  {path: np.ndarray},   the optax state
             "tables":     {table name: table.dump()},   rows, slots, metadata, filter, clock
             "step_count": int, "examples": int}

        (paths like "deep/layers/0/kernel"). Later training does not change
        it; `load_state_dict` returns this trainer, or a new one built the
        same way, to it exactly. tables=False leaves the tables out (the
        dense part only, e.g. for a serving copy that takes rows
        elsewhere). Nothing here is pickled: arrays, dicts and ints."""
        self.settle()
        state = {"params": _flat_copy(self.params), "opt_state": _flat_copy(self.opt_state),
                 "step_count": int(self.step_count), "examples": int(self.examples)}
        if tables:
            state["tables"] = {name: t.dump() for name, t in self.tables.items()}
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restores a `state_dict()` (of this trainer or of one built the same
        way: same model, tables and optimizer). Every part is checked before
        anything changes (array names, shapes and dtypes; table names and
        row widths), and errors name what does not fit. strict=False: parts
        absent from `state` (and tables it does not name) are left as they
        are."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        parts = ("params", "opt_state", "tables", "step_count", "examples")
        unknown = sorted(set(state) - set(parts))
        if unknown:
            raise ValueError(f"state has unknown parts {unknown}; a state_dict() has {list(parts)}")
        if strict:
            missing = [p for p in parts if p not in state]
            if missing:
                raise ValueError(f"state lacks {missing} (load_state_dict(state, strict=False) restores only "
                                 f"the parts given)")
        params = _restored(self.params, state["params"], "params") if "params" in state else None
        opt_state = _restored(self.opt_state, state["opt_state"], "opt_state") if "opt_state" in state else None
        dumps = state.get("tables", {})
        if not isinstance(dumps, dict):
            raise TypeError(f"state 'tables' must be a dict of table dumps, got {type(dumps).__name__}")
        extra = sorted(set(dumps) - set(self.tables))
        missing = sorted(set(self.tables) - set(dumps)) if strict and "tables" in state else []
        if extra or missing:
            raise ValueError(f"state 'tables' does not fit this trainer's tables {sorted(self.tables)}: "
                             f"missing {missing}, unexpected {extra}")
        for name, dump in dumps.items():
            table = self.tables[name]
            values = np.shape(dump.get("values", ())) if isinstance(dump, dict) else ()
            if not isinstance(dump, dict) or len(values) != 2 or values[1] != table.dim:
                raise ValueError(f"state 'tables'[{name!r}] is not a dump of a table of dim {table.dim} "
                                 f"(values {values})")
        counters = {}
        for key in ("step_count", "examples"):
            if key in state:
                v = state[key]
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                    raise ValueError(f"state {key!r} must be an int >= 0, got {v!r}")
                counters[key] = int(v)
        for name, dump in dumps.items():
            self.tables[name].load(dump)
        if params is not None:
            self.params = params
        if opt_state is not None:
            self.opt_state = opt_state
        for key, v in counters.items():
            setattr(self, key, v)

    def _log(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps({"time": time.time(), **record}) + "\n")
            self._metrics.flush()
        if self._events is not None:
            self._events.write(record, record.get("step", self.step_count))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._events is not None:
            self._events.close()
            self._events = None
