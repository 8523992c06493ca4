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
round also splits one shard's time per unique id: the shard's Step
handlers (its checks, the engine's apply and lookup: the shard's own
metrics), the client's side (split, sums, rows: the engine's passes, timed
alone on the same batches, beside numpy's), and the rest (gRPC, the
messages, thread hand-offs). The previous data plane (`previous.py`: the
same Step requests, the client's side in numpy) runs beside them on a
shard of its own, as the baseline of the change; it goes first every
other round.
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


def _start_shards(n: int, tables_path: str, metrics: bool = False) -> list:
    """[(process, port, metrics port or None)]."""
    procs = []
    for s in range(n):
        proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.distributed.training_ps", "--shard", str(s),
                                 "--shards", str(n), "--tables", tables_path] + (["--metrics-port", "0"] if metrics else []),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
        line, metrics_port = proc.stdout.readline(), None
        if " metrics on http://" in line:
            metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
            line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"shard {s} did not start: {line!r}")
        procs.append((proc, int(line.rsplit(":", 1)[1]), metrics_port))
    return procs


def _start_echo(dim: int) -> tuple:
    """The gRPC-alone server (echo.py): (process, port, None)."""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.scale_out.echo", "--dim", str(dim)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise RuntimeError(f"the echo server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1]), None


def _handler_seconds(metrics_port: int) -> float:
    """Seconds the shard has spent inside Step handlers (checks, apply, lookup): its metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "monolith_rpc_seconds_sum" and s.labels.get("method") == "TrainingPSData/Step")


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


def _cpu_s(pids) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])    # utime, stime
    return total / tick


def _timed(row: dict, key: str, table, procs: list, batches, grads, first_step: int) -> None:
    """Runs the steps on `table`: wall seconds in row[key], and the CPU
    seconds of this process and of the shards' processes in row[key + "_cpu"]
    (what the work costs whatever else the machine runs)."""
    pids = [p.pid for p, *_ in procs]
    c0, s0 = time.process_time(), _cpu_s(pids)
    row[key] = _steps(table, batches, grads, first_step)
    row[key + "_cpu"] = (time.process_time() - c0, _cpu_s(pids) - s0)


def _client_side(split_class, batches, grads, dim: int) -> float:
    """Seconds of the client's side of one shard's steps (split, sums and
    their finiteness, rows), alone."""
    t0 = time.perf_counter()
    for b, g in zip(batches, grads):
        split = split_class(b, 1)
        split.rows(np.zeros((split.grouped.size, dim), np.float32))
        split.same_keys(b)
        split.summed(g)
    return time.perf_counter() - t0


def throughput(shard_counts=(1, 2, 4), dim: int = 64, batch_ids: int = 32_768, steps: int = 40, rounds: int = 5,
               vocab: int = 2_000_000, previous: bool = True, out=print) -> dict:
    import monolith_jax as mj
    from experiments.scale_out.echo import EchoClient
    from experiments.scale_out.previous import NumpySplit, PreviousShardedTable
    from monolith_jax.distributed.ps_data import Split
    from monolith_jax.distributed.training_ps import ShardedTable
    from monolith_jax.sparse.config import config_to_dict

    config = mj.TableConfig("ids", dim, mj.Normal(0, 0.01), mj.Adagrad(0.05))
    local = mj.EmbeddingTable(config)
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tables.json")
        with open(path, "w") as f:
            json.dump([config_to_dict(config)], f)
        procs = {n: _start_shards(n, path, metrics=n == 1) for n in shard_counts}
        previous = previous and 1 in shard_counts
        if previous:
            procs["previous"] = _start_shards(1, path)
        procs["echo"] = [_start_echo(dim)]
        try:
            tables = {n: ShardedTable(config, [f"127.0.0.1:{p[1]}" for p in procs[n]]) for n in shard_counts}
            if previous:
                tables["previous"] = PreviousShardedTable(config, [f"127.0.0.1:{procs['previous'][0][1]}"])
            tables["echo"] = EchoClient(f"127.0.0.1:{procs['echo'][0][1]}", dim)
            warm_b, warm_g = _batches(10_000, 3, batch_ids, vocab, dim)   # connections up, code paths warm
            for t in [local, *tables.values()]:
                _steps(t, warm_b, warm_g, 1)
            for r in range(rounds):
                batches, grads = _batches(r, steps, batch_ids, vocab, dim)
                ids = sum(b.size for b in batches)
                uniq = sum(np.unique(b).size for b in batches)
                first = 2 + r * steps
                row = {"ids": ids, "unique_ids": uniq}
                _timed(row, "local_s", local, [], batches, grads, first)
                if previous and r % 2:      # every other round the previous plane goes first
                    _timed(row, "previous_1_s", tables["previous"], procs["previous"], batches, grads, first)
                for n in shard_counts:
                    handler = _handler_seconds(procs[n][0][2]) if n == 1 else 0.0
                    _timed(row, f"shards_{n}_s", tables[n], procs[n], batches, grads, first)
                    if n == 1:
                        row["shard_handlers_s"] = _handler_seconds(procs[n][0][2]) - handler
                if previous and not r % 2:
                    _timed(row, "previous_1_s", tables["previous"], procs["previous"], batches, grads, first)
                tables["echo"].prepare(batches)
                _timed(row, "echo_s", tables["echo"], procs["echo"], batches, grads, first)
                row["client_s"] = _client_side(Split, batches, grads, dim)
                row["client_numpy_s"] = _client_side(NumpySplit, batches, grads, dim)
                per_round.append(row)
                out(f"  round {r + 1}/{rounds}: local {ids / row['local_s']:,.0f} ids/s; " + "; ".join(
                    f"{n} shard{'s' if n > 1 else ''} {row['local_s'] / row[f'shards_{n}_s']:.2f}x"
                    for n in shard_counts) + (f"; 1 shard, previous plane {row['local_s'] / row['previous_1_s']:.2f}x"
                                              if previous else ""))
            for t in tables.values():
                t.close()
        finally:
            for n in procs:
                for proc, *_ in procs[n]:
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
    # Under load the shards' processes win CPU share from other work that the one process of the local table
    # does not, which flatters the ratios; the quietest round (the fastest local table) is the fairer one.
    q = max(per_round, key=lambda x: x["ids"] / x["local_s"])
    results["quietest_round"] = {"local_ids_per_s": q["ids"] / q["local_s"],
                                 **{f"shards_{n}_vs_local": q["local_s"] / q[f"shards_{n}_s"] for n in shard_counts}}
    if previous:
        results["quietest_round"]["previous_1_vs_local"] = q["local_s"] / q["previous_1_s"]
    out(f"  quietest round (local table {q['ids'] / q['local_s']:,.0f} ids/s): " + "; ".join(
        f"{n} shard{'s' if n > 1 else ''} {q['local_s'] / q[f'shards_{n}_s']:.2f}x" for n in shard_counts) +
        (f"; 1 shard, previous plane {q['local_s'] / q['previous_1_s']:.2f}x" if previous else ""))
    if previous:
        results["previous_1_shard"] = r = {
            "ids_per_s": med([x["ids"] / x["previous_1_s"] for x in per_round]),
            "vs_local": med([x["local_s"] / x["previous_1_s"] for x in per_round]),
            "us_per_unique_id": med([1e6 * x["previous_1_s"] / x["unique_ids"] for x in per_round]),
            "step_plane_speedup": med([x["previous_1_s"] / x["shards_1_s"] for x in per_round])}
        out(f"  1 shard, the previous plane (the client's split, sums and rows in numpy): "
            f"{r['ids_per_s']:,.0f} ids/s ({r['us_per_unique_id']:.2f} us per unique id) = {r['vs_local']:.2f}x the "
            f"local table; this plane runs at {r['step_plane_speedup']:.2f}x its speed")
    cpu = lambda key, i: med([1e6 * (x[key + "_cpu"][i] if i < 2 else sum(x[key + "_cpu"])) / x["unique_ids"]
                              for x in per_round])   # noqa: E731
    planes = [("local_s", "local table")] + \
        [(f"shards_{n}_s", f"{n} shard{'s' if n > 1 else ''}") for n in shard_counts] + \
        ([("previous_1_s", "1 shard, previous plane")] if previous else [])
    results["cpu_us_per_unique_id"] = {k: {"client": cpu(k, 0), "shards": cpu(k, 1), "total": cpu(k, 2)}
                                       for k, _ in planes}
    out("  CPU per unique id (this process + the shards' processes, whatever else runs): " + "; ".join(
        f"{label} {cpu(k, 2):.2f} us" + (f" ({cpu(k, 0):.2f} + {cpu(k, 1):.2f})" if k != "local_s" else "")
        for k, label in planes))
    if 1 in shard_counts:
        us = lambda key: med([1e6 * x[key] / x["unique_ids"] for x in per_round])   # noqa: E731
        total, shard_us, client_us = us("shards_1_s"), us("shard_handlers_s"), us("client_s")
        results["split_1_shard_us_per_unique_id"] = s = {
            "total": total, "shard_handler": shard_us, "client_side": client_us,
            "client_side_numpy": us("client_numpy_s"), "grpc_alone": us("echo_s"),
            "grpc_and_messages": total - shard_us - client_us, "local_table": us("local_s")}
        out(f"  one shard's {total:.2f} us per unique id: the shard's Step handler (checks, engine apply and lookup) "
            f"{shard_us:.2f}, the client's split, sums and rows {client_us:.2f} (numpy's: "
            f"{s['client_side_numpy']:.2f}), the rest (gRPC, messages, threads) {s['grpc_and_messages']:.2f}; "
            f"the local table: {s['local_table']:.2f} for all of it")
        out(f"  gRPC alone (the same requests to a Step server that does no table work, replies of the same size): "
            f"{s['grpc_alone']:.2f} us per unique id, CPU {cpu('echo_s', 2):.2f} us ({cpu('echo_s', 0):.2f} client + "
            f"{cpu('echo_s', 1):.2f} server)")
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
