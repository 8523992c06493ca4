"""Predictor latency, one hop against two, in one run: batch-1 p50/p99 while syncs arrive every second.

    python -m experiments.serving.latency [--rounds 5] [--seconds 5]   # ~3 min; MovieLens DeepFM, untrained

Processes: a serving PS (`monolith serving-ps --model`), a predictor
reading it (two hops: client -> predictor -> serving PS), a predictor
holding its tables (`--tables local`, one hop), asked over gRPC and over
frames (`--frames-port`, the same calls without gRPC), and an empty unary RPC
server (bytes in, the same bytes out: Python gRPC's own floor on this
machine). Each serving side gets its own sync load (`sync_load`: the
trainer's `SyncPusher`, every second, MovieLens keys). Every round
measures each of the four for `--seconds` with one client, one request at
a time, in turn; the figures are medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from experiments.serving import run

EMPTY_METHOD = "/monolith.bench.Empty/Echo"


def empty_server(argv=None) -> int:
    """A gRPC server whose one unary method returns its request's bytes."""
    import grpc

    from monolith_jax.rpc.wire import start_server

    handler = grpc.method_handlers_generic_handler("monolith.bench.Empty", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
    server, port = start_server(lambda s: s.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0, 8)
    print(f"empty RPC listening on 127.0.0.1:{port}", flush=True)
    from monolith_jax.rpc.wire import run_until_signalled

    run_until_signalled(server)
    return 0


def empty_loop(port: int, seconds: float) -> dict:
    """Closed loop of empty unary calls (a 64-byte request, as a batch-1 predict's)."""
    from monolith_jax.rpc.wire import channel

    ch = channel(f"127.0.0.1:{port}")
    call = ch.unary_unary(EMPTY_METHOD)
    body = b"x" * 64
    for _ in range(20):
        call(body, timeout=10, wait_for_ready=True)
    lat = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        call(body, timeout=10)
        lat.append(time.perf_counter() - s)
    ch.close()
    return {"requests": len(lat), **{k: v * 1e3 if k != "n" else v for k, v in run.percentiles(lat).items()}}


def export_untrained(directory: str) -> None:
    """The MovieLens DeepFM, untrained, exported (latency does not depend on its values)."""
    from monolith_jax.examples.movielens.loop import movielens_trainer
    from monolith_jax.serving.export import export_model

    export_model(movielens_trainer(0, out=lambda *a, **k: None), directory)


def _port_in(lines: list, marker: str, timeout_s: float = 60.0) -> int:
    """The port of the `marker ... HOST:PORT` line once it is among `lines`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(lines):
            if marker in line:
                return int(line.strip().rsplit(":", 1)[1])
        time.sleep(0.05)
    raise RuntimeError(f"no {marker!r} line within {timeout_s:g} s:\n" + "".join(lines[-20:]))


def compare(ratings, rows_per_sync: int = 1000, seconds: float = 5.0, rounds: int = 5, out=print,
            model_dir: str | None = None) -> dict:
    """Rounds of batch-1 closed loops: two hops, one hop, the empty RPC; syncs arriving on both servers."""
    work = tempfile.mkdtemp(prefix="monolith-latency-")
    if model_dir is None:
        model_dir = os.path.join(work, "model")
        export_untrained(model_dir)
    keys_path = run.save_keys(ratings, work)
    procs = []
    try:
        ps, ps_port = run.start([sys.executable, "-m", "monolith_jax.serving.serving_ps", "--model", model_dir],
                                "listening on")
        procs.append(ps)
        two, two_port = run.start([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", model_dir,
                                   "--serving-ps", f"127.0.0.1:{ps_port}"], "listening on")
        later = []
        one, frames_port = run.start([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", model_dir,
                                      "--tables", "local", "--frames-port", "0"], "frames on", later)
        one_port = _port_in(later, "listening on")
        empty, empty_port = run.start([sys.executable, "-m", "experiments.serving.latency", "--empty-server"],
                                      "listening on")
        procs += [two, one, empty]
        for port in (ps_port, one_port):
            load, _ = run.start([sys.executable, "-m", "experiments.serving.sync_load", "--serving-ps",
                                 f"127.0.0.1:{port}", "--rows", str(rows_per_sync), "--keys", keys_path],
                                "pushing to")
            procs.append(load)
        time.sleep(4)  # the loads' first (full) pushes are in; deltas every second from here on
        batches = run.request_batches(ratings, 1, 64, seed=1)
        per = {"two_hop": [], "one_hop": [], "one_hop_frames": [], "empty_rpc": []}
        for r in range(rounds):
            per["two_hop"].append(run.closed_loop(f"127.0.0.1:{two_port}", batches, seconds))
            per["one_hop"].append(run.closed_loop(f"127.0.0.1:{one_port}", batches, seconds))
            per["one_hop_frames"].append(run.closed_loop(f"frames://127.0.0.1:{frames_port}", batches, seconds))
            per["empty_rpc"].append(empty_loop(empty_port, seconds))
            out(f"  round {r + 1}: " + ", ".join(f"{k} p50 {v[-1]['p50']:.3f} ms p99 {v[-1]['p99']:.3f} ms"
                                                  for k, v in per.items()))
        alive = [p.poll() is None for p in procs[-2:]]
    finally:
        run.stop(*reversed(procs))
    med = {k: {q: float(np.median([x[q] for x in v])) for q in ("p50", "p99")} for k, v in per.items()}
    result = {"rounds": rounds, "seconds": seconds, "rows_per_sync": rows_per_sync, "per_round": per,
              "median": med, "sync_loads_ran": all(alive)}
    out(f"batch 1, syncs of {rows_per_sync:,} rows every 1 s arriving, medians of {rounds} rounds of {seconds:g} s:")
    for k, label in (("two_hop", "two hops (predictor -> serving PS)"), ("one_hop", "one hop (--tables local)"),
                     ("one_hop_frames", "one hop over frames (--frames-port)"),
                     ("empty_rpc", "empty unary RPC (gRPC floor)")):
        out(f"  {label:<36} p50 {med[k]['p50']:.3f} ms  p99 {med[k]['p99']:.3f} ms")
    out(f"  one hop / two hops at p99: {med['one_hop']['p99'] / med['two_hop']['p99']:.2f}x; "
        f"one hop over the empty RPC at p99: +{med['one_hop']['p99'] - med['empty_rpc']['p99']:.3f} ms")
    out(f"  one hop over frames / two hops at p99: {med['one_hop_frames']['p99'] / med['two_hop']['p99']:.2f}x, "
        f"/ one hop over gRPC: {med['one_hop_frames']['p99'] / med['one_hop']['p99']:.2f}x")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--rows", type=int, default=1000, help="touched rows per sync (the live loop's ~950)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--empty-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.empty_server:
        return empty_server()
    from monolith_jax.examples.movielens.data import load_movielens_1m

    r = compare(load_movielens_1m(), args.rows, args.seconds, args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
