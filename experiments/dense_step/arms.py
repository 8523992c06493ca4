"""The steps the dense-step benchmark times, each on the W2 stream
(experiments.placement.run.stream): the project's full step (a Trainer's
in-jit step: 26 collisionless tables called from the XLA program), a
plain-JAX step on static tables (jnp arrays, gather + scatter Adagrad on
the unique rows, the same dense net), and the dense step alone (the
Trainer's dense program on fixed rows: no tables at all). Variants change
one thing each: the products in bf16, the FM term in one pass, the step's
inputs donated, the batch split over two host devices.

Each arm is `step(raw) -> loss`, raw a numpy batch from `stream`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import monolith_jax as mj
from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.models.matmul import bf16_dot, check_matmul
from monolith_jax.models.mlp import MLP
from monolith_jax.training import Trainer
from experiments.placement.run import DENSE, FIELDS, UNIVERSE, to_batch

FM_FORMS = ("two_sums", "one_pass")


def fm_term(e, form: str = "two_sums"):
    """FM2 of e (B, F, D): 1/2 sum_d ((sum_f e)^2 - sum_f e^2).
    two_sums: as written (two (B, D) sums, then their difference summed);
    one_pass: the square of the field sum over D less the squares of all
    F*D entries at once (no (B, D) difference)."""
    s = e.sum(1)
    if form == "one_pass":
        return 0.5 * (jnp.sum(s * s, axis=1) - jnp.sum(e * e, axis=(1, 2)))
    return 0.5 * (s * s - (e * e).sum(1)).sum(1)


class W2Model(nnx.Module):
    """FM2(E) + Linear(dense) + MLP([E flattened, dense]) -> 400 -> 400 -> 400 -> 1, ReLU."""

    def __init__(self, dim: int, hidden=(400, 400, 400), *, matmul: str = "f32", fm: str = "two_sums",
                 rngs: nnx.Rngs):
        if fm not in FM_FORMS:
            raise ValueError(f"fm must be one of {FM_FORMS}, got {fm!r}")
        self.names = [f"f{i}" for i in range(FIELDS)]
        self.mlp = MLP(FIELDS * dim + DENSE, hidden, 1, matmul=matmul, rngs=rngs)
        self.lin = nnx.Linear(DENSE, 1, rngs=rngs)
        self.fm = fm

    def __call__(self, fields: dict, dense):
        e = jnp.stack([fields[n] for n in self.names], axis=1)  # (B, 26, D)
        h = jnp.concatenate([e.reshape(e.shape[0], -1), dense], axis=1)
        return self.mlp(h)[:, 0] + self.lin(dense)[:, 0] + fm_term(e, self.fm)


def make_trainer(dim, hidden, matmul="f32", fm="two_sums", seed=0, **kw) -> Trainer:
    tables = [mj.TableConfig(f"t{i}", dim, initializer=mj.Normal(0.0, 0.01),
                             optimizer=mj.Adagrad(0.05, initial_accumulator_value=0.1)) for i in range(FIELDS)]
    feats = [SparseFeature(f"f{i}", f"t{i}") for i in range(FIELDS)]
    return Trainer(W2Model(dim, hidden, matmul=matmul, fm=fm, rngs=nnx.Rngs(seed)), tables, feats,
                   [DenseFeature(f"d{i}") for i in range(DENSE)], optax.adam(1e-3), sparse_loss="mean",
                   log_every=0, out=None, **kw)


def full_step(dim, hidden, donate=False, **model):
    """The project's step: `Trainer.train_step`, in-jit (26 FFI lookups and
    26 fused applies in the one XLA program). donate: that program takes
    over the params' and optimizer state's buffers (the Trainer's in-jit
    program does not; this arm jits the same function with donation)."""
    t = make_trainer(dim, hidden, placement="in_jit", **model)
    if donate:
        t.params = jax.tree.map(jnp.copy, t.params)
        t._train = jax.jit(t._train_step, donate_argnums=(0, 1))

    def step(raw):
        return t.train_step(to_batch(raw))
    step.trainer = t
    return step


def dense_step(dim, hidden, batch, donate=False, **model):
    """The Trainer's dense program alone on fixed rows (one (B, 1, dim)
    array per table, made once): what the step costs without tables."""
    t = make_trainer(dim, hidden, placement="host", **model)
    program = jax.jit(t._dense_step, donate_argnums=(0, 1) if donate else ())
    rows = jax.device_put({f"t{i}": np.random.default_rng(i).normal(0, 0.01, (batch, 1, dim)).astype(np.float32)
                           for i in range(FIELDS)})
    state = [jax.tree.map(jnp.copy, t.params), t.opt_state]

    def step(raw):
        state[0], state[1], loss, g = program(state[0], state[1], rows, to_batch(raw))
        return loss
    step.state = state
    return step


def mesh_steps(dim, hidden, batch, **model):
    """The full step and the dense step with the batch split over this
    process's devices (`Trainer(mesh=...)`: params replicated, the dense
    gradient all-reduced, tables on the host)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    t = make_trainer(dim, hidden, mesh=mesh, **model)

    def full(raw):
        return t.train_step(to_batch(raw))
    d = make_trainer(dim, hidden, mesh=mesh, **model)
    rows = d.mesh_dense.rows({f"t{i}": np.random.default_rng(i).normal(0, 0.01, (batch, 1, dim)).astype(np.float32)
                              for i in range(FIELDS)})
    state = [d.params, d.opt_state]

    def dense(raw):
        state[0], state[1], loss, g = d.mesh_dense(state[0], state[1], rows, to_batch(raw))
        return loss
    full.trainer = t
    dense.state = state
    return full, dense


def static_step(dim, hidden, rows_per_field=1 << 20, matmul="f32", seed=0):
    """Plain JAX, no framework: 26 static tables of `rows_per_field` rows
    (one jnp array, feature f at rows f*R + id % R: the hashing trick),
    Normal(0, 0.01) rows, Adagrad (lr 0.05, accumulator 0.1) on the unique
    rows of the batch (gather, segment-sum of duplicates, scatter back), the
    same dense net with Adam 1e-3; table and accumulator donated, the whole
    step one jit. The modulo hashing is done in numpy in the timed loop."""
    check_matmul(matmul)
    n_rows = FIELDS * rows_per_field
    model = W2Model(dim, hidden, matmul=matmul, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    adam = optax.adam(1e-3)
    names = model.names

    def loss_fn(params, e, dense, labels):
        fields = {n: e[:, i] for i, n in enumerate(names)}
        logits = nnx.merge(graphdef, params)(fields, dense)
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def program(table, acc, params, opt, idx, dense, labels):
        e = table[idx].reshape(idx.shape[0] // FIELDS, FIELDS, dim)
        loss, (g_params, g_e) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, e, dense, labels)
        n = idx.shape[0]
        u, inv = jnp.unique(idx, return_inverse=True, size=n, fill_value=n_rows)
        gs = jax.ops.segment_sum(g_e.reshape(n, dim), inv.reshape(-1), num_segments=n)
        a = acc.at[u].get(mode="fill", fill_value=1.0) + gs * gs
        w = table.at[u].get(mode="fill", fill_value=0.0) - 0.05 * gs / jnp.sqrt(a)
        updates, opt = adam.update(g_params, opt, params)
        return (table.at[u].set(w, mode="drop"), acc.at[u].set(a, mode="drop"),
                optax.apply_updates(params, updates), opt, loss)

    state = [0.01 * jax.random.normal(jax.random.PRNGKey(1), (n_rows, dim), jnp.float32),
             jnp.full((n_rows, dim), 0.1, jnp.float32), params, adam.init(params)]
    offsets = (np.arange(FIELDS, dtype=np.int64) * rows_per_field)[None, :]

    def step(raw):
        ids, dense, labels = raw
        # the stream keys field f's ids apart (f * UNIVERSE + rank); the table hashes the rank
        idx = ((ids.astype(np.int64) - np.arange(FIELDS) * UNIVERSE) % rows_per_field + offsets)
        *state[:], loss = program(*state, idx.astype(np.int32).reshape(-1), dense, labels)
        return loss
    step.state = state
    return step
