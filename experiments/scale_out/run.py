"""Sharded lookup+apply throughput on loopback: 1, 2 and 4 training PS shards
(each its own process) beside the local table, in one run.

One step = the host-tables trainer's table work for a batch: `lookup_host`
of a batch's ids (Zipf-distributed, many repeats, as real traffic), then
`apply_gradients_host` of a gradient per id. The local table is the same
engine in the trainer's process; a sharded table adds unique-ing, splitting
by shard, the RPCs (bytes fields) and reassembly.
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


def _steps(table, batches, dim) -> dict:
    rng = np.random.default_rng(1)
    grads = [rng.normal(0, 0.01, (b.size, dim)).astype(np.float32) for b in batches]
    for b, g in zip(batches[:3], grads[:3]):  # warm: rows exist, connections up
        table.lookup_host(b)
        table.apply_gradients_host(b, g, step=1)
    t0 = time.perf_counter()
    for k, (b, g) in enumerate(zip(batches, grads)):
        table.lookup_host(b)
        table.apply_gradients_host(b, g, step=k + 2)
    seconds = time.perf_counter() - t0
    ids = sum(b.size for b in batches)
    uniq = sum(np.unique(b).size for b in batches)
    return {"seconds": seconds, "ids_per_s": ids / seconds, "unique_ids_per_s": uniq / seconds,
            "unique_share": uniq / ids}


def throughput(shard_counts=(1, 2, 4), dim: int = 64, batch_ids: int = 32_768, steps: int = 40,
               vocab: int = 2_000_000, out=print) -> dict:
    import monolith_jax as mj
    from monolith_jax.distributed.training_ps import ShardedTable
    from monolith_jax.sparse.config import config_to_dict

    config = mj.TableConfig("ids", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05))
    rng = np.random.default_rng(0)
    batches = [(rng.zipf(1.2, batch_ids) % vocab + 1).astype(np.uint64) for _ in range(steps)]
    results = {"dim": dim, "batch_ids": batch_ids, "steps": steps}
    local = mj.EmbeddingTable(config)
    results["local"] = r = _steps(local, batches, dim)
    out(f"  local table:  {r['ids_per_s']:>12,.0f} ids/s ({r['unique_ids_per_s']:,.0f} unique ids/s)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tables.json")
        with open(path, "w") as f:
            json.dump([config_to_dict(config)], f)
        for n in shard_counts:
            procs = _start_shards(n, path)
            try:
                table = ShardedTable(config, [f"127.0.0.1:{p}" for _, p in procs])
                r = _steps(table, batches, dim)
                table.close()
            finally:
                for proc, _ in procs:
                    proc.terminate()
                    proc.wait(10)
            r["vs_local"] = r["ids_per_s"] / results["local"]["ids_per_s"]
            # Per unique id each step moves: the key out twice (lookup, apply), the row back and its gradient out.
            r["bytes_per_unique_id"] = 2 * 8 + 2 * 4 * dim
            r["us_per_unique_id"] = 1e6 / r["unique_ids_per_s"]
            results[f"shards_{n}"] = r
            out(f"  {n} shard{'s' if n > 1 else ' '}:     {r['ids_per_s']:>12,.0f} ids/s ({r['unique_ids_per_s']:,.0f} "
                f"unique ids/s, {r['us_per_unique_id']:.2f} us each)  = {r['vs_local']:.2f}x the local table")
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
