"""Sharded lookup+apply throughput on loopback: 1, 2 and 4 training PS shards
(each its own process) beside the local table, in one run, in rounds.

One step = the host-tables trainer's table work for a batch: `lookup_host`
of a batch's ids (Zipf-distributed, many repeats, as real traffic), then
`apply_gradients_host` of a gradient per id. The local table is the same
engine in the trainer's process; a sharded table adds unique-ing, splitting
by shard, one Step request per shard (the previous step's gradients and
this step's ids) and reassembly.

Each round draws fresh batches and runs them on the local table and on
every shard count, one after the other, so that a round's ratios compare
figures taken under the same load; the figures are medians over rounds.
The tables keep their rows from round to round, as a trainer's do. A
round also splits one shard's time per unique id: the engine's work on the
batch's unique ids (the shard's share, timed on a table in this process),
the client's numpy (sort and split, gradient sums, rows), and the rest
(gRPC, the messages, the shard's checks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def _start_shards(n: int, tables_path: str) -> list:
    procs = []
    for s in range(n):
        proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.distributed.training_ps", "--shard", str(s),
                                 "--shards", str(n), "--tables", tables_path],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"shard {s} did not start: {line!r}")
        procs.append((proc, int(line.rsplit(":", 1)[1])))
    return procs


def _batches(seed: int, steps: int, batch_ids: int, vocab: int, dim: int):
    rng = np.random.default_rng(seed)
    batches = [(rng.zipf(1.2, batch_ids) % vocab + 1).astype(np.uint64) for _ in range(steps)]
    grads = [rng.normal(0, 0.01, (b.size, dim)).astype(np.float32) for b in batches]
    return batches, grads


def _steps(table, batches, grads, first_step: int) -> float:
    t0 = time.perf_counter()
    for k, (b, g) in enumerate(zip(batches, grads)):
        table.lookup_host(b)
        table.apply_gradients_host(b, g, step=first_step + k)
    if hasattr(table, "flush"):
        table.flush()       # the last step's apply is part of the work
    return time.perf_counter() - t0


def _split_times(batches, grads, engine) -> dict:
    """Seconds of the client's numpy and of the engine's work on the unique ids."""
    from monolith_jax.distributed.ps_data import Split

    client = work = 0.0
    for k, (b, g) in enumerate(zip(batches, grads)):
        t0 = time.perf_counter()
        split = Split(b, 1)
        summed = split.summed(g)
        t1 = time.perf_counter()
        rows = engine.lookup_host(split.uniq)
        engine.apply_gradients_host(split.uniq, summed, step=k + 2)
        t2 = time.perf_counter()
        split.rows(rows)
        client += (t1 - t0) + (time.perf_counter() - t2)
        work += t2 - t1
    return {"client_numpy": client, "engine_unique": work}


def throughput(shard_counts=(1, 2, 4), dim: int = 64, batch_ids: int = 32_768, steps: int = 40, rounds: int = 5,
               vocab: int = 2_000_000, out=print) -> dict:
    import monolith_jax as mj
    from monolith_jax.distributed.training_ps import ShardedTable
    from monolith_jax.sparse.config import config_to_dict

    config = mj.TableConfig("ids", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05))
    local, engine = mj.EmbeddingTable(config), mj.EmbeddingTable(config)
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tables.json")
        with open(path, "w") as f:
            json.dump([config_to_dict(config)], f)
        procs = {n: _start_shards(n, path) for n in shard_counts}
        try:
            tables = {n: ShardedTable(config, [f"127.0.0.1:{p}" for _, p in procs[n]]) for n in shard_counts}
            warm_b, warm_g = _batches(10_000, 3, batch_ids, vocab, dim)   # connections up, code paths warm
            for t in [local, engine, *tables.values()]:
                _steps(t, warm_b, warm_g, 1)
            for r in range(rounds):
                batches, grads = _batches(r, steps, batch_ids, vocab, dim)
                ids = sum(b.size for b in batches)
                uniq = sum(np.unique(b).size for b in batches)
                first = 2 + r * steps
                row = {"ids": ids, "unique_ids": uniq, "local_s": _steps(local, batches, grads, first)}
                for n in shard_counts:
                    row[f"shards_{n}_s"] = _steps(tables[n], batches, grads, first)
                row.update(_split_times(batches, grads, engine))
                per_round.append(row)
                out(f"  round {r + 1}/{rounds}: local {ids / row['local_s']:,.0f} ids/s; " + "; ".join(
                    f"{n} shard{'s' if n > 1 else ''} {row['local_s'] / row[f'shards_{n}_s']:.2f}x"
                    for n in shard_counts))
            for t in tables.values():
                t.close()
        finally:
            for n in shard_counts:
                for proc, _ in procs[n]:
                    proc.terminate()
                    proc.wait(10)
    med = lambda xs: float(np.median(xs))   # noqa: E731
    results = {"dim": dim, "batch_ids": batch_ids, "steps": steps, "rounds": rounds, "per_round": per_round}
    results["local"] = {"ids_per_s": med([r["ids"] / r["local_s"] for r in per_round]),
                        "unique_ids_per_s": med([r["unique_ids"] / r["local_s"] for r in per_round]),
                        "unique_share": med([r["unique_ids"] / r["ids"] for r in per_round])}
    out(f"medians of {rounds} rounds:")
    out(f"  local table:  {results['local']['ids_per_s']:>12,.0f} ids/s "
        f"({results['local']['unique_ids_per_s']:,.0f} unique ids/s)")
    for n in shard_counts:
        k = f"shards_{n}_s"
        r = {"ids_per_s": med([x["ids"] / x[k] for x in per_round]),
             "unique_ids_per_s": med([x["unique_ids"] / x[k] for x in per_round]),
             "vs_local": med([x["local_s"] / x[k] for x in per_round]),
             "us_per_unique_id": med([1e6 * x[k] / x["unique_ids"] for x in per_round]),
             # Per unique id a step moves: its key out twice (lookup, apply), its row back and its gradient out.
             "bytes_per_unique_id": 2 * 8 + 2 * 4 * dim}
        if n > 1 and 1 in shard_counts:
            r["per_id_vs_1_shard"] = med([x[k] / x["shards_1_s"] for x in per_round])
        results[f"shards_{n}"] = r
        more = f", time per id {r['per_id_vs_1_shard']:.2f}x one shard's" if "per_id_vs_1_shard" in r else ""
        out(f"  {n} shard{'s' if n > 1 else ' '}:     {r['ids_per_s']:>12,.0f} ids/s ({r['unique_ids_per_s']:,.0f} "
            f"unique ids/s, {r['us_per_unique_id']:.2f} us each)  = {r['vs_local']:.2f}x the local table{more}")
    if 1 in shard_counts:
        us = lambda key: med([1e6 * x[key] / x["unique_ids"] for x in per_round])   # noqa: E731
        total, engine_us, client_us = us("shards_1_s"), us("engine_unique"), us("client_numpy")
        results["split_1_shard_us_per_unique_id"] = s = {
            "total": total, "engine_unique_ids": engine_us, "client_numpy": client_us,
            "grpc_messages_checks": total - engine_us - client_us, "local_table": us("local_s")}
        out(f"  one shard's {total:.2f} us per unique id: engine on the unique ids {s['engine_unique_ids']:.2f}, "
            f"client numpy (sort/split, gradient sums, rows) {s['client_numpy']:.2f}, gRPC + messages + the "
            f"shard's checks {s['grpc_messages_checks']:.2f} (the local table: {s['local_table']:.2f} for all of it)")
    return results


def estimate(results: dict, rows: float = 1e10, dim: int = 64, machine_gib: float = 128.0,
             target_ids_per_s: float = 20e6) -> dict:
    """Machines for a table of `rows` rows of `dim` from the measured figures."""
    row_bytes = 8 + 4 * dim * 2 + 16 + 8     # key, values + Adagrad slots, row metadata, index overhead
    table_bytes = rows * row_bytes
    per_machine = machine_gib * 2**30 * 0.7  # 70% of memory for rows
    machines_memory = int(np.ceil(table_bytes / per_machine))
    # One shard's measured rate (it shares this machine's cores with the
    # client, so a shard on its own machine does at least this).
    per_shard = results["shards_1"]["unique_ids_per_s"]
    return {"rows": rows, "dim": dim, "row_bytes": row_bytes, "table_tib": table_bytes / 2**40,
            "machines_for_memory": machines_memory, "unique_ids_per_s_per_shard_measured": per_shard,
            "shards_for_target": int(np.ceil(target_ids_per_s / per_shard)), "target_unique_ids_per_s": target_ids_per_s}
