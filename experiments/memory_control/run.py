"""Memory control: rows and bytes held, and prequential AUC, per filter and
expiry setting, beside the baseline (no filter, no expiry) in the same run.

movielens: MovieLens-1M ratings in time order. Each batch of ratings is
  first scored with the current tables (prequential: the model has not seen
  it), then trained on: logit = <user, movie> + user bias + movie bias +
  global bias (each row's last element is its bias), label = rating >= 4,
  fused Adagrad on the rows, SGD on the global bias. Expiry runs every
  batch at the batch's event time (seconds), as a trainer would.
zipf: a stream of ids drawn Zipf(1.05) from 10^7 keys, looked up and updated
  in batches of 65,536 (rows and bytes only; time = batch number).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from monolith_jax.metrics import auc
from monolith_jax.sparse import Adagrad, EmbeddingTable, FrequencyFilter, Keys, Normal, TableConfig

DAY = 86_400


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    threshold: int = 1          # occurrence threshold (1: none)
    expire_after: int = 0       # in the stream's time units (0: never)
    counters: int = 1 << 16     # filter sketch bytes per table

    def table(self, name: str, dim: int, seed: int) -> EmbeddingTable:
        admission = FrequencyFilter(self.threshold, counters=self.counters) if self.threshold > 1 else None
        return EmbeddingTable(TableConfig(
            name, dim, Normal(0.0, 0.05), Adagrad(0.05), seed=seed,
            admission=admission, expire_after=self.expire_after))


MOVIELENS_SETTINGS = (
    Setting("baseline"),
    Setting("threshold 2", threshold=2),
    Setting("threshold 5", threshold=5),
    Setting("threshold 10", threshold=10),
    Setting("expire 7 days", expire_after=7 * DAY),
    Setting("expire 30 days", expire_after=30 * DAY),
    Setting("expire 180 days", expire_after=180 * DAY),
    Setting("threshold 5 + expire 30 days", threshold=5, expire_after=30 * DAY),
)

ZIPF_SETTINGS = (
    Setting("baseline", counters=1 << 22),
    Setting("threshold 2", threshold=2, counters=1 << 22),
    Setting("threshold 5", threshold=5, counters=1 << 22),
    Setting("threshold 10", threshold=10, counters=1 << 22),
    Setting("expire 20 batches", expire_after=20, counters=1 << 22),
    Setting("expire 100 batches", expire_after=100, counters=1 << 22),
    Setting("threshold 5 + expire 100", threshold=5, expire_after=100, counters=1 << 22),
)


def _bytes(*tables) -> int:
    return sum(t.stats()["bytes_total"] for t in tables)


def run_movielens(ratings, settings=MOVIELENS_SETTINGS, batch=1024, dim=16, seed=0, out=print) -> list[dict]:
    n = len(ratings)
    labels = (ratings.rating >= 4).astype(np.float32)
    burn_in = n // 5  # AUC over the last 80% of the stream
    results = []
    for st in settings:
        users, items = st.table("user", dim, seed), st.table("movie", dim, seed + 1)

        @jax.jit
        def step(bias, uk, ik, y, t):
            u, i = users.lookup(uk), items.lookup(ik)

            def loss_fn(bias, u, i):
                # The rows' last element is a per-user / per-movie bias. The
                # loss is summed, so each row's gradient is its examples' own
                # (Adagrad then scales it), as sparse training does.
                logit = jnp.sum(u[:, :-1] * i[:, :-1], axis=-1) + u[:, -1] + i[:, -1] + bias
                losses = jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit)))
                return jnp.sum(losses), logit

            (_, logit), (g_b, g_u, g_i) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(bias, u, i)
            users.apply_gradients(uk, g_u, step=t)
            items.apply_gradients(ik, g_i, step=t)
            return bias - 0.05 * g_b / y.shape[0], logit

        bias = jnp.zeros(())
        scores, peak = [], 0
        t0 = time.perf_counter()
        for s in range(0, n - batch + 1, batch):
            e = s + batch
            now = int(ratings.timestamp[e - 1])
            bias, logit = step(bias, Keys.from_ids(ratings.user_key[s:e]), Keys.from_ids(ratings.item_key[s:e]),
                               labels[s:e], now)
            scores.append(np.asarray(logit))
            if st.expire_after:
                users.expire(now)
                items.expire(now)
            peak = max(peak, len(users) + len(items))
        seconds = time.perf_counter() - t0
        scores = np.concatenate(scores)
        used = scores.size
        r = dict(setting=st.name, rows=len(users) + len(items), peak_rows=peak, bytes=_bytes(users, items),
                 filtered=users.stats()["filtered"] + items.stats()["filtered"],
                 expired=users.stats()["expired"] + items.stats()["expired"],
                 auc=auc(labels[burn_in:used], scores[burn_in:]), seconds=seconds)
        results.append(r)
        out(_line(r, with_auc=True))
    return results


def zipf_stream(batches: int, batch: int, universe: int = 10_000_000, a: float = 1.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = np.arange(universe, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(7)
    out = []
    for _ in range(batches):
        ranks = np.empty(0, np.int64)
        while ranks.size < batch:
            z = rng.zipf(a, size=2 * (batch - ranks.size))
            ranks = np.concatenate([ranks, z[z <= universe][: batch - ranks.size] - 1])
        out.append(keys[ranks])
    return out


def run_zipf(stream, settings=ZIPF_SETTINGS, dim=16, seed=0, out=print) -> list[dict]:
    results = []
    for st in settings:
        table = st.table("ids", dim, seed)
        grads = np.full((stream[0].size, dim), 0.01, np.float32)
        peak = 0
        t0 = time.perf_counter()
        for b, ids in enumerate(stream, start=1):
            table.lookup_host(ids)
            table.apply_gradients_host(ids, grads, step=b)
            if st.expire_after:
                table.expire(b)
            peak = max(peak, len(table))
        s = table.stats()
        r = dict(setting=st.name, rows=s["rows"], peak_rows=peak, bytes=s["bytes_total"],
                 filtered=s["filtered"], expired=s["expired"], auc=float("nan"),
                 seconds=time.perf_counter() - t0)
        results.append(r)
        out(_line(r, with_auc=False))
    return results


def header(with_auc: bool) -> str:
    h = f"{'setting':<30}{'rows':>11}{'peak rows':>11}{'MB held':>9}{'vs base':>9}{'filtered':>12}{'expired':>10}"
    return h + (f"{'AUC':>8}" if with_auc else "") + f"{'s':>7}"


_BASE: dict = {}


def _line(r: dict, with_auc: bool) -> str:
    base = _BASE.setdefault(with_auc, r["bytes"]) if r["setting"] == "baseline" else _BASE.get(with_auc, r["bytes"])
    line = (f"{r['setting']:<30}{r['rows']:>11,}{r['peak_rows']:>11,}{r['bytes'] / 2**20:>9.2f}"
            f"{r['bytes'] / base:>9.2f}{r['filtered']:>12,}{r['expired']:>10,}")
    return line + (f"{r['auc']:>8.4f}" if with_auc else "") + f"{r['seconds']:>7.1f}"
