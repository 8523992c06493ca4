"""The W2 DeepFM step, on the same stream: the in-jit step (tables called
from the XLA program), the host-tables step with overlap, and without; and
the one without overlap with its inputs donated to the program, with its
rows and gradients sent as one buffer each (packed), and with both.
Each arm is a fresh Trainer; rounds interleave the arms so that a noisy
neighbour slows all alike; figures are medians over rounds."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseBatch, SparseFeature
from monolith_jax.models.mlp import MLP
from monolith_jax.sparse import Keys
from monolith_jax.training import Trainer

FIELDS, DENSE, UNIVERSE = 26, 13, 10**6
ARMS = {"in_jit": dict(placement="in_jit"),
        # the host-tables step as this platform's defaults have it (on the CPU: nothing donated, one buffer per table)
        "host_overlap": dict(placement="host", overlap=True),
        "host_plain": dict(placement="host", overlap=False),
        # the plain one with its inputs donated, its transfers packed, and both (the defaults off the CPU)
        "plain_donated": dict(placement="host", overlap=False, donate=True, pack_transfers=False),
        "plain_packed": dict(placement="host", overlap=False, donate=False, pack_transfers=True),
        "plain_both": dict(placement="host", overlap=False, donate=True, pack_transfers=True)}
PHASES = ("decode", "lookup", "dispatch", "wait", "apply")


class W2Model(nnx.Module):
    """FM2(E) + Linear(dense) + MLP([E flattened, dense]) -> 400 -> 400 -> 400 -> 1, ReLU."""

    def __init__(self, dim: int, hidden=(400, 400, 400), *, rngs: nnx.Rngs):
        self.names = [f"f{i}" for i in range(FIELDS)]
        self.mlp = MLP(FIELDS * dim + DENSE, hidden, 1, rngs=rngs)
        self.lin = nnx.Linear(DENSE, 1, rngs=rngs)

    def __call__(self, fields: dict, dense):
        e = jnp.stack([fields[n] for n in self.names], axis=1)  # (B, 26, D)
        s = e.sum(1)
        fm = 0.5 * (s * s - (e * e).sum(1)).sum(1)
        h = jnp.concatenate([e.reshape(e.shape[0], -1), dense], axis=1)
        return self.mlp(h)[:, 0] + self.lin(dense)[:, 0] + fm


def make_trainer(dim: int, hidden=(400, 400, 400), pack_transfers: bool | None = None, **placement) -> Trainer:
    tables = [mj.TableConfig(f"t{i}", dim, initializer=mj.Normal(0.0, 0.01),
                             optimizer=mj.Adagrad(0.05, initial_accumulator_value=0.1)) for i in range(FIELDS)]
    feats = [SparseFeature(f"f{i}", f"t{i}") for i in range(FIELDS)]
    t = Trainer(W2Model(dim, hidden, rngs=nnx.Rngs(0)), tables, feats,
                [DenseFeature(f"d{i}") for i in range(DENSE)], optax.adam(1e-3), sparse_loss="mean",
                log_every=0, out=None, **placement)
    if pack_transfers is not None:  # None: the trainer's default for this platform
        t.pack_transfers = pack_transfers
    return t


def stream(batches: int, batch: int, seed: int = 0) -> list:
    """Raw numpy batches: Zipf(1.1) ranks per feature (each its own universe
    of 10^6, keyed apart), 13 dense floats, labels from a fixed logistic
    teacher."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, DENSE).astype(np.float32)
    out = []
    for _ in range(batches):
        ranks = np.minimum(rng.zipf(1.1, (batch, FIELDS)), UNIVERSE) - 1
        ids = (ranks + np.arange(FIELDS) * UNIVERSE).astype(np.uint64)
        dense = rng.normal(0, 1, (batch, DENSE)).astype(np.float32)
        effect = np.sin(ids[:, :3].astype(np.float64) * 0.618).sum(1)
        p = 1.0 / (1.0 + np.exp(-(dense[:, :4] @ w[:4] + effect)))
        out.append((ids, dense, (rng.random(batch) < p).astype(np.float32)))
    return out


def to_batch(raw) -> SparseBatch:
    """The framework batch from numpy (counted in the step's time: decode)."""
    ids, dense, labels = raw
    b = ids.shape[0]
    ones = np.ones(b, np.int32)
    cols = np.ascontiguousarray(ids.T)
    return SparseBatch(ids={f"f{i}": Keys.from_ids(cols[i].reshape(b, 1)) for i in range(FIELDS)},
                       lengths={f"f{i}": ones for i in range(FIELDS)}, dense=dense, labels=labels,
                       weights=np.ones(b, np.float32))


def _dense_alone(trainer: Trainer, raw, steps: int) -> float:
    """Seconds per dense step alone (rows already on the device): the device's part."""
    batch = to_batch(raw)
    coll = trainer.collection
    rows = jax.device_put({name: np.zeros((batch.weights.shape[0], 1, coll.tables[name].dim), np.float32)
                           for name in coll.tables})
    params, opt = trainer.params, trainer.opt_state
    dense = jax.jit(trainer._dense_step)  # the same program, donating nothing: `rows` serve every step
    jax.block_until_ready(dense(params, opt, rows, batch))
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt, loss, g = dense(params, opt, rows, batch)
    jax.block_until_ready((params, g))
    return (time.perf_counter() - t0) / steps


def run(batch: int = 4096, dim: int = 16, hidden=(400, 400, 400), rounds: int = 5, steps: int = 10,
        warmup: int = 3, out=print) -> dict:
    raw = stream(warmup + rounds * steps, batch)
    trainers = {arm: make_trainer(dim, hidden, **kw) for arm, kw in ARMS.items()}
    for arm, t in trainers.items():  # compile, and fill the tables with the warm-up batches' rows
        t.fit(lambda: (to_batch(r) for r in raw[:warmup]))
    rates = {arm: [] for arm in ARMS}
    phases = {arm: {p: [] for p in PHASES} for arm in ARMS if arm != "in_jit"}
    for r in range(rounds):
        part = raw[warmup + r * steps: warmup + (r + 1) * steps]
        for arm, t in trainers.items():
            t.host_stats.clear()
            t0 = time.perf_counter()
            t.fit(lambda: (to_batch(x) for x in part))
            rates[arm].append(steps * batch / (time.perf_counter() - t0))
            if arm in phases:
                for p in PHASES:
                    phases[arm][p].append(t.host_stats[p + "_s"] / steps)
    dense_s = _dense_alone(trainers["host_plain"], raw[0], steps)
    result = {"batch": batch, "dim": dim, "hidden": list(hidden), "rounds": rounds, "steps_per_round": steps,
              "platform": jax.devices()[0].platform,
              "examples_per_s": {arm: statistics.median(v) for arm, v in rates.items()},
              "examples_per_s_rounds": rates,
              "ms_per_step": {arm: {p: 1e3 * statistics.median(v) for p, v in ph.items()}
                              for arm, ph in phases.items()},
              "dense_step_alone_ms": 1e3 * dense_s,
              # each round's arms ran back to back: their ratio in a round shares its noise
              "vs_in_jit_per_round_median": {arm: statistics.median(a / b for a, b in zip(v, rates["in_jit"]))
                                             for arm, v in rates.items()}}
    base = result["examples_per_s"]["in_jit"]
    out(f"W2 DeepFM step, batch {batch:,}, dim {dim}, MLP {'-'.join(map(str, hidden))}, "
        f"on {result['platform']}; medians of {rounds} rounds x {steps} steps")
    for arm in ARMS:
        v = result["examples_per_s"][arm]
        out(f"  {arm:<15} {v:>9,.0f} examples/s   {v / base:.2f}x the in-jit step "
            f"(median of per-round ratios {result['vs_in_jit_per_round_median'][arm]:.2f}x)")
    out(f"  dense step alone (rows already on the device): {result['dense_step_alone_ms']:.1f} ms")
    for arm, ph in result["ms_per_step"].items():
        out(f"  {arm:<15} ms per step: " + "  ".join(f"{p} {ph[p]:.1f}" for p in PHASES))
    return result
