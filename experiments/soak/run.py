"""Soak test of the online path under faults.

    python -m experiments.soak.run --job MODULE:NAME --minutes 10 [--seed S] [--out DIR]

Processes (each its own, started here, on loopback only):

    Kafka (librdkafka's built-in cluster, experiments.soak.kafka_server)
    joiner      monolith join --job J --negative-rate 1.0 (every valid request: exactly one example)
    trainer     monolith train --job J --snapshot-dir --snapshot-every-s 2 --serving-ps --export
    serving PS  monolith serving-ps --model --snapshot-dir (same port after a restart)
    predictor   monolith predictor --model --serving-ps

This process produces valid requests of the job (a features record, and a
positive action for some) at a steady rate and, at seeded random intervals
within bounds, injects faults: malformed messages (random bytes, truncated
protobuf, JSON nested past any parser's depth, empty values), oversize ones
(over 1 MB, which the embedded cluster's topics take; and just under the
producer's 1 MB limit), event times far in the future and negative,
duplicates (a features message sent twice, a positive action sent twice),
a large valid record that still fits an example, and a record lacking one
sparse feature. It SIGKILLs the joiner, the trainer or the serving PS at
seeded random intervals (`--kill-every 40 90`, or a fixed `--kill-at
S:NAME ...` plan; the trainer's first kill waits for its first snapshot)
and restarts the process at once with the same command.
A watcher reads the dead-letter and the examples topics as they fill.

At the end it stops producing, waits (bounded) until the joiner and the
trainer have consumed everything, checks that every process is up, stops
the trainer (SIGTERM: last snapshot, last push), compares a sample of the
trainer's final snapshot rows with the serving PS's, stops everything, and
prints one JSON line and a short table. Exit code 0 only if: examples
trained == valid requests, every injected bad message is accounted for
(in the dead letters, or in the joiner's or trainer's duplicate counters),
the serving PS holds the trainer's rows, and every process was up at the
end (no process exited unless killed here, the stream drained in time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time

import numpy as np

from experiments.soak.checks import group_lag, predict_check, rpc_up, serving_rows, trainer_idle
from experiments.soak.children import Child, has_snapshot, monolith, sample_rss
from experiments.soak.config import FAULTS, KILLABLE, Config
from experiments.soak.report import K_TOPIC, account, table, verdict
from experiments.soak.traffic import Traffic, Watcher
from monolith_jax.online.demo import free_port


def soak(cfg: Config, out=None) -> dict:
    """Runs the soak; returns its result with `checks` and `ok` (also
    written to `<run>/summary.json`). Progress lines go to `out`
    (default: standard error)."""
    from monolith_jax.job import load_job

    if out is None:
        out = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    job = load_job(cfg.job)
    run_dir = os.path.abspath(cfg.out or tempfile.mkdtemp(prefix="monolith-soak-"))
    os.makedirs(run_dir, exist_ok=True)
    snaps, model = os.path.join(run_dir, "snapshots"), os.path.join(run_dir, "model")
    summary_path = os.path.join(run_dir, "trainer.json")
    if os.path.exists(summary_path):
        os.remove(summary_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.compile_cache:   # a restarted trainer or predictor loads its programs instead of compiling them
        env.update({"JAX_COMPILATION_CACHE_DIR": os.path.join(run_dir, "jax-cache"),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    tag = f"soak-{os.getpid()}-{int(time.time())}"
    children: dict = {}
    t_start = time.monotonic()
    res: dict = {"job": cfg.job, "minutes": cfg.minutes, "seed": cfg.seed, "rate": cfg.rate, "run_dir": run_dir,
                 "faults": list(cfg.faults)}
    traffic = watcher = None
    joiner_stats: dict = {}    # life -> its last stats line
    trainer_stats: dict = {}   # life -> [(monotonic time, progress line)]
    kills_log: list = []

    def on_joiner(life, line):
        if line.startswith("joiner {") or line.startswith("joiner done {"):
            joiner_stats[life] = json.loads(line[line.index("{"):])

    def on_trainer(life, line):
        if line.startswith("trainer {"):
            trainer_stats.setdefault(life, []).append((time.monotonic(), json.loads(line[len("trainer "):])))

    def check_children(at: float) -> None:
        for name, child in list(children.items()):
            if not child.check():
                out(f"  {at:5.0f} s  {name} EXITED by itself (code {child.exits[-1][1]})"
                    + ("; started again" if child.restartable else ""))

    try:
        kafka = children["kafka"] = Child("kafka", [sys.executable, "-m", "experiments.soak.kafka_server",
                                                    "--watch-stdin"], run_dir, env, stdin_pipe=True,
                                          restartable=False)
        bootstrap = kafka.wait_for("kafka listening on ", 60).split(" listening on ")[1].strip()
        out(f"soak: job {cfg.job}, {cfg.minutes:g} min of traffic at {cfg.rate:g} requests/s, seed {cfg.seed}; "
            f"Kafka (embedded, own process) at {bootstrap}; run folder {run_dir}")
        watcher = Watcher(bootstrap, tag + "-watcher")
        watcher.start()
        children["joiner"] = Child("joiner", monolith(
            "join", "--bootstrap", bootstrap, "--group", tag + "-joiner", "--job", cfg.job,
            "--negative-rate", "1.0", "--window", cfg.window_s, "--lateness", cfg.lateness_s,
            "--emit-positives", "on_action", "--idle-flush", cfg.idle_flush_s, "--report-every", "1",
            "--seed", cfg.seed), run_dir, env, on_joiner)
        ps_address, pred_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        children["trainer"] = Child("trainer", monolith(
            "train", "--job", cfg.job, "--bootstrap", bootstrap, "--group", tag + "-trainer", "--seed", cfg.seed,
            "--snapshot-dir", snaps, "--snapshot-every-s", "2", "--serving-ps", ps_address, "--sync-interval", "1",
            "--dense-sync-interval", "5", "--export", model, "--max-wait", "0.2", "--summary", summary_path),
            run_dir, env, on_trainer)
        traffic = Traffic(job, bootstrap, cfg, np.random.default_rng([cfg.seed, 1]))
        traffic.start()   # the stream starts now; the trainer catches up once compiled
        t_traffic = time.monotonic()
        deadline = time.monotonic() + cfg.start_timeout_s
        while not os.path.exists(os.path.join(model, "spec.json")):
            if time.monotonic() > deadline or not children["trainer"].up:
                raise RuntimeError("the trainer did not export its model; see " + children["trainer"].log_path)
            time.sleep(0.2)
        children["serving-ps"] = Child("serving-ps", monolith(
            "serving-ps", "--model", model, "--snapshot-dir", snaps, "--port", ps_address.rsplit(":", 1)[1]),
            run_dir, env)
        children["serving-ps"].wait_for(" listening on ", cfg.start_timeout_s)
        children["predictor"] = Child("predictor", monolith(
            "predictor", "--model", model, "--serving-ps", ps_address, "--port", pred_address.rsplit(":", 1)[1]),
            run_dir, env)
        children["predictor"].wait_for(" listening on ", cfg.start_timeout_s)
        out(f"  {time.monotonic() - t_traffic:5.0f} s  all up: joiner, trainer, serving PS at {ps_address}, "
            f"predictor at {pred_address}")

        # ---- traffic, faults and kills
        kill_rng = np.random.default_rng([cfg.seed, 2])
        plan = sorted((float(s), n) for s, n in cfg.kill_at) if cfg.kill_at is not None else None
        next_kill = None if plan is not None else float(kill_rng.uniform(*cfg.kill_every_s))
        length = cfg.minutes * 60.0
        last_report = time.monotonic()
        rss: dict = {}
        pending_victim = None
        while True:
            now = time.monotonic()
            at = now - t_traffic
            if at >= length:
                break
            victim = None
            if plan:
                if at >= plan[0][0]:
                    victim = plan[0][1]
            elif next_kill is not None and at >= next_kill:
                victim = pending_victim or KILLABLE[int(kill_rng.integers(0, len(KILLABLE)))]
            if victim == "trainer" and not has_snapshot(snaps):
                pending_victim = victim   # the trainer's first kill waits for its first snapshot
                victim = None
            elif victim is not None:
                pending_victim = None
                if plan:
                    plan.pop(0)
                else:
                    next_kill = at + float(kill_rng.uniform(*cfg.kill_every_s))
            if victim is not None:
                children[victim].kill()
                kills_log.append((round(at, 1), victim))
                out(f"  {at:5.0f} s  SIGKILL {victim}; started again")
            check_children(at)
            if now - last_report >= 15:
                last_report = now
                sample_rss(children, rss)
                life = max(trainer_stats) if trainer_stats else None
                out(f"  {at:5.0f} s  sent {traffic.valid:,} valid requests, {sum(traffic.injected.values()):,} "
                    f"faults; trainer at {trainer_stats[life][-1][1]['examples'] if life else 0:,} examples; "
                    f"{len(watcher.dead):,} dead letters")
            time.sleep(0.2)

        # ---- the end: no more traffic; drain, check, stop
        traffic.finish()
        at = time.monotonic() - t_traffic
        out(f"  {at:5.0f} s  traffic stopped: {traffic.valid:,} valid requests, "
            f"{sum(traffic.injected.values()):,} faults; waiting for the joiner and the trainer to drain")
        t_drain = time.monotonic()
        drained, stable, joiner_done = False, 0, None
        while time.monotonic() - t_drain < cfg.drain_timeout_s:
            check_children(time.monotonic() - t_traffic)
            lags = (group_lag(bootstrap, tag + "-joiner", [K_TOPIC["features"], K_TOPIC["actions"]]),
                    group_lag(bootstrap, tag + "-trainer", [K_TOPIC["examples"]]))
            stable = stable + 1 if lags[0] == 0 else 0
            if stable >= 3 and joiner_done is None and watcher.caught_up():
                joiner_done = time.monotonic()   # every input decided, every example in the topic read
            if joiner_done is not None and (lags[1] == 0 or trainer_idle(trainer_stats, joiner_done)):
                drained = True
                break
            time.sleep(1.0)
        res["drained"] = drained
        res["drain_s"] = round(time.monotonic() - t_drain, 1)
        out(f"  {time.monotonic() - t_traffic:5.0f} s  " + (f"drained in {res['drain_s']:.0f} s" if drained else
            f"NOT drained within {cfg.drain_timeout_s:.0f} s (lags {lags})") + "; stopping")
        up = {name: child.up for name, child in children.items()}
        up["serving-ps"] = up["serving-ps"] and rpc_up("serving-ps", ps_address)
        up["predictor"] = up["predictor"] and rpc_up("predictor", pred_address)
        res["up_at_end"] = up
        sample_rss(children, rss)
        res["rss_mb"] = rss
        recent = [f for _, f, _ in list(traffic.recent)[-32:]]
        res["trainer_exit"] = children["trainer"].stop(signal.SIGTERM, cfg.stop_timeout_s)
        trainer = None
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                trainer = json.load(f)
        res["serving_rows"] = serving_rows(snaps, ps_address, cfg.sample_rows, np.random.default_rng([cfg.seed, 3]))
        res["predict"] = predict_check(job, pred_address, recent) if recent else {"ok": False, "why": "no requests"}
        res["joiner_exit"] = children["joiner"].stop(signal.SIGTERM, cfg.stop_timeout_s)
        watcher.caught_up()   # the last dead letters, if any
        for name in ("predictor", "serving-ps"):
            res[f"{name}_exit"] = children[name].stop(signal.SIGTERM, 30)
        res.update(account(traffic, watcher, trainer, joiner_stats, children, kills_log))
    except BaseException as err:
        res["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        if traffic is not None:
            traffic.finish()
        if watcher is not None:
            watcher.close()
        for name in reversed(list(children)):
            children[name].stop(signal.SIGTERM, 15)
        res["seconds"] = round(time.monotonic() - t_start, 1)
        verdict(res)
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def parse_kill_at(specs) -> list | None:
    """`--kill-at` values -> a plan; no flag: None (random kills), the flag alone: no kills."""
    if specs is None:
        return None
    plan = []
    for spec in specs:
        at, _, name = spec.partition(":")
        if name not in KILLABLE:
            raise SystemExit(f"--kill-at takes SECONDS:NAME with NAME one of {KILLABLE}, got {spec!r}")
        plan.append((float(at), name))
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.soak.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Config(job="")
    p.add_argument("--job", required=True, help="MODULE:NAME of the job")
    p.add_argument("--minutes", type=float, default=d.minutes, help="minutes of traffic")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the traffic, the faults and the kills")
    p.add_argument("--out", default=None, help="run folder (default: a new temporary one)")
    p.add_argument("--rate", type=float, default=d.rate, help="valid requests per second")
    p.add_argument("--positive-share", type=float, default=d.positive_share, help="requests with a positive action")
    p.add_argument("--fault-every", type=float, nargs=2, default=d.fault_every_s, metavar=("MIN", "MAX"),
                   help="seconds between faults")
    p.add_argument("--kill-every", type=float, nargs=2, default=d.kill_every_s, metavar=("MIN", "MAX"),
                   help="seconds between SIGKILLs of the joiner, the trainer or the serving PS")
    p.add_argument("--kill-at", nargs="*", default=None, metavar="S:NAME",
                   help="a fixed plan instead (e.g. 20:serving-ps 30:joiner 40:trainer)")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated fault kinds: " + ", ".join(FAULTS))
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds to wait for the drain")
    p.add_argument("--no-compile-cache", action="store_true", help="no JAX compilation cache for the processes")
    args = p.parse_args(argv)
    faults = tuple(k for k in args.faults.split(",") if k)
    unknown = [k for k in faults if k not in FAULTS]
    if unknown:
        p.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    cfg = Config(job=args.job, minutes=args.minutes, seed=args.seed, out=args.out, rate=args.rate,
                 positive_share=args.positive_share, fault_every_s=tuple(args.fault_every),
                 kill_every_s=tuple(args.kill_every), kill_at=parse_kill_at(args.kill_at), faults=faults,
                 drain_timeout_s=args.drain_timeout, compile_cache=not args.no_compile_cache)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stops every process it started on the way out
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)   # Orbax's notes on reading the trainer's snapshots
    res = soak(cfg)
    print(json.dumps(res, default=str), flush=True)
    print(table(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
