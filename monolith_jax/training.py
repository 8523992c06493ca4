"""`Trainer`: the jitted training step, one pass over files, evaluation.

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
"""

from __future__ import annotations

import json
import sys
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from monolith_jax.embedding import EmbeddingCollection, SparseFeatures
from monolith_jax.features import DenseFeature, SparseBatch, SparseFeature
from monolith_jax.metrics import auc, log_loss
from monolith_jax.sparse import Keys, TableConfig


def calibration(labels, probs, weights=None) -> float:
    """Mean predicted probability over the observed rate (1.0 is calibrated)."""
    w = np.ones_like(labels) if weights is None else weights
    return float(np.sum(probs * w) / max(np.sum(labels * w), 1e-12))


class Trainer:
    def __init__(self, model: nnx.Module, tables: Sequence[TableConfig], features: Sequence[SparseFeature],
                 dense_features: Sequence[DenseFeature] = (), optimizer: optax.GradientTransformation | None = None,
                 sparse_loss: str = "sum", metrics_path: str | None = None, log_every: int = 100,
                 out=print):
        if sparse_loss not in ("sum", "mean"):
            raise ValueError("sparse_loss must be 'sum' or 'mean'")
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
        self.data_parallel = None  # a distributed.DataParallel: the host-tables step all-reduces
        self.out = out
        self._metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
        self._train = jax.jit(self._train_step)
        self._dense = jax.jit(self._dense_step)
        self._logits = jax.jit(self._forward)

    @property
    def tables(self):
        return self.collection.tables

    def model(self) -> nnx.Module:
        """The model with the current dense parameters."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    # ------------------------------------------------------------ programs
    def _forward(self, params, table_rows, batch: SparseBatch):
        fields = self.pooling(self.collection.split(table_rows), batch.lengths)
        return nnx.merge(self.graphdef, params, self.rest)(fields, batch.dense)

    def _train_step(self, params, opt_state, batch: SparseBatch, step):
        rows = self.collection.lookup(batch)
        n = jnp.maximum(batch.weights.sum(), 1.0)

        def loss_fn(params, rows):
            logits = self._forward(params, rows, batch)
            return jnp.sum(batch.weights * optax.sigmoid_binary_cross_entropy(logits, batch.labels)) / n, logits

        (loss, logits), (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, rows)
        if self.sparse_loss == "sum":
            g_rows = jax.tree.map(lambda g: g * n, g_rows)
        updates, opt_state = self.tx.update(g_params, opt_state, params)
        params = optax.apply_updates(params, updates)
        tokens = self.collection.apply(batch, g_rows, step)
        return params, opt_state, loss, logits, tokens

    def _dense_step(self, params, opt_state, rows, batch: SparseBatch):
        """The host-tables step's program: rows in, the dense update and the
        rows' gradients out (no table call inside, so it runs on any device)."""
        n = jnp.maximum(batch.weights.sum(), 1.0)

        def loss_fn(params, rows):
            logits = self._forward(params, rows, batch)
            return jnp.sum(batch.weights * optax.sigmoid_binary_cross_entropy(logits, batch.labels)) / n

        loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        if self.sparse_loss == "sum":
            g_rows = jax.tree.map(lambda g: g * n, g_rows)
        updates, opt_state = self.tx.update(g_params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, g_rows

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
        keys = {name: Keys(coll._table_words(batch, name)).to_numpy()
                for name in coll.tables if coll.by_table[name]}
        rows = {name: coll.tables[name].lookup_host(k) for name, k in keys.items()}
        if self.data_parallel is not None:
            self.params, self.opt_state, loss, g_rows = self.data_parallel.step(self, rows, batch)
        else:
            self.params, self.opt_state, loss, g_rows = self._dense(self.params, self.opt_state, rows, batch)
        for name, g in g_rows.items():
            coll.tables[name].apply_gradients_host(keys[name], np.asarray(g), step=stamp)
        self.step_count += 1
        self.examples += int(np.sum(batch.weights))
        return loss

    def train_step(self, batch: SparseBatch, stamp: int | None = None) -> float:
        """One step; returns the batch's mean loss (before the update).
        stamp: the rows' `last_update` (event time in seconds for online
        training, so that expiry works in event time); default the step."""
        stamp = self.step_count if stamp is None else stamp
        self.params, self.opt_state, loss, _, _ = self._train(self.params, self.opt_state, batch, stamp)
        self.step_count += 1
        self.examples += int(np.sum(batch.weights))
        return loss

    def fit(self, batches: Iterable[SparseBatch], max_steps: int | None = None) -> dict:
        """One pass over `batches`, logging examples/s and loss as it goes."""
        t0 = time.perf_counter()
        seen, losses, last_log, last_t = 0, [], 0, t0
        for k, batch in enumerate(batches):
            if max_steps is not None and k >= max_steps:
                break
            losses.append(self.train_step(batch))
            seen += int(np.sum(batch.weights))
            if self.log_every and (k + 1) % self.log_every == 0:
                loss = float(np.mean(jax.device_get(losses[-self.log_every:])))
                now = time.perf_counter()
                rate = (seen - last_log) / (now - last_t)
                self._log({"event": "train", "step": self.step_count, "examples": self.examples, "loss": loss,
                           "examples_per_s": rate})
                self.out(f"\rstep {self.step_count:>7}  {seen:>10,} examples  {rate:>9,.0f} ex/s  loss {loss:.4f}",
                         **({"end": "", "flush": True} if self.out is print and sys.stdout.isatty() else {}))
                last_log, last_t = seen, now
        jax.block_until_ready(self.params)
        seconds = time.perf_counter() - t0
        summary = {"event": "fit", "steps": len(losses), "examples": seen, "seconds": seconds,
                   "examples_per_s": seen / max(seconds, 1e-9),
                   "loss": float(np.mean(jax.device_get(losses))) if losses else float("nan")}
        self._log(summary)
        return summary

    def predict(self, batch: SparseBatch) -> np.ndarray:
        """Probabilities, from rows read without creating any."""
        rows = self.collection.find_host(batch)
        return np.asarray(jax.nn.sigmoid(self._logits(self.params, rows, batch)))

    def evaluate(self, batches: Iterable[SparseBatch]) -> dict:
        labels, probs, weights = [], [], []
        for batch in batches:
            probs.append(self.predict(batch))
            labels.append(np.asarray(batch.labels))
            weights.append(np.asarray(batch.weights))
        y, p, w = (np.concatenate(a) for a in (labels, probs, weights))
        real = w > 0
        result = {"event": "eval", "step": self.step_count, "examples": int(real.sum()),
                  "auc": auc(y[real], p[real]), "logloss": log_loss(y[real], p[real]),
                  "calibration": calibration(y[real], p[real])}
        self._log(result)
        return result

    def _log(self, record: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps({"time": time.time(), **record}) + "\n")
            self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
