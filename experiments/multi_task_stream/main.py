"""Two objectives on one stream: a two-head model beside two single-task
models, all trained online from the same examples topic; the predictor's
per-head scores against the trainer's own. The work is in run.py.

    python -m experiments.multi_task_stream.main                    # the shop, 5 seeds of 12,000 requests; results/
    python -m experiments.multi_task_stream.main --world movielens --out experiments/multi_task_stream/results   # MovieLens, 3 x 30,000 ratings
    python -m experiments.multi_task_stream.main --seeds 1 --requests 4000   # ~2 min, into a run folder

Any run with flags writes to a fresh run folder (runs/multi_task_stream-TIMESTAMP/),
not over the committed results/, unless given --out (experiments/run_folder.py).
"""

import argparse
import json
import os
import shutil
import tempfile

import numpy as np

from experiments import run_folder
from experiments.multi_task_stream import run


def _metric(m: dict) -> tuple[str, float]:
    return ("auc", m["auc"]) if "auc" in m else ("rmse", m["rmse"])


def report(rounds: list, out=print) -> None:
    r0 = rounds[0]
    world = run.WORLDS[r0["world"]]
    what = f"{r0['requests']:,} requests" if world.name == "shop" else \
        f"{r0['requests']:,} ratings ({r0['replayed']['features']:,} requests with the impressions)"
    out(f"two-task stream, {world.name}: {what} per seed, {len(rounds)} seed(s); "
        f"replay -> monolith join -> {1 + len(world.singles)} x monolith train on one examples topic")
    out("prequential metrics (each batch scored before it is trained on), per head, mean ± std over seeds:")
    for head in r0["multi"]:
        kind, _ = _metric(r0["multi"][head])
        multi = [_metric(r["multi"][head])[1] for r in rounds]
        out(f"  {head:<8} {kind:<4} {'two heads':<18} {np.mean(multi):.4f} ± {np.std(multi):.4f}   "
            + " ".join(f"{x:.4f}" for x in multi) + f"   ({r0['multi'][head]['examples']:,} examples defined)")
        for name, (h, _) in world.singles.items():
            if h != head:
                continue
            single = [_metric(r["single"][name])[1] for r in rounds]
            out(f"  {head:<8} {kind:<4} {name:<18} {np.mean(single):.4f} ± {np.std(single):.4f}   "
                + " ".join(f"{x:.4f}" for x in single))
            gap = np.asarray(multi) - np.asarray(single)
            line = f"    two heads - {name} = {np.mean(gap):+.4f}"
            if len(gap) >= 3:
                from scipy import stats

                line += f" (paired t-test p = {stats.ttest_rel(multi, single).pvalue:.3g}, {len(gap)} seeds)"
            out(line)
        if head in r0.get("running_mean_rmse", {}):
            base = [r["running_mean_rmse"][head] for r in rounds]
            out(f"  {head:<8} rmse {'mean so far':<18} {np.mean(base):.4f} ± {np.std(base):.4f}   "
                + " ".join(f"{x:.4f}" for x in base) + "   (predicting the mean of the labels seen before)")
    for r in rounds:
        j = r["joined"]
        labels = {k: v for k, v in j.items() if ":" in k and v}
        out(f"  seed {r['seed']}: {j['features']:,} requests joined into {j['positives'] + j['negatives']:,} examples "
            f"({', '.join(f'{k} {v:,}' for k, v in labels.items())}; {j['dead_letters']} dead letters); "
            "trained by " + ", ".join(f"{k} {v:,}" for k, v in r["trained"].items()))
    if "served_vs_own_max_abs_diff" in r0:
        diffs = {h: max(r["served_vs_own_max_abs_diff"][h] for r in rounds) for h in r0["served_vs_own_max_abs_diff"]}
        out("predictor (rows from the serving PS) vs the trainer's own forward pass, per head, max |diff| over "
            f"{len(rounds)} x held-out requests: " + ", ".join(f"{h} {d:.2e}" for h, d in diffs.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=sorted(run.WORLDS), default="shop")
    p.add_argument("--seeds", type=int, default=None, help="default: 5 (shop), 3 (movielens)")
    p.add_argument("--requests", type=int, default=None, help="requests per seed; default: 12,000 (shop), "
                                                              "30,000 ratings and their impressions (movielens)")
    p.add_argument("--out", default=None, help="results folder (default: results/ for the default command)")
    args = p.parse_args(argv)
    out = run_folder.output_dir("multi_task_stream", p, args, full_size_flags=("world",))
    full = {"shop": (5, 12_000), "movielens": (3, 30_000)}[args.world]
    args.seeds = full[0] if args.seeds is None else args.seeds
    args.requests = full[1] if args.requests is None else args.requests
    rounds = []
    for seed in range(args.seeds):
        # Logs, snapshots, exports and process logs of a round stay in a
        # scratch folder (kept only if the round fails); results are the figures.
        work = tempfile.mkdtemp(prefix=f"multi_task_stream-{seed}-")
        rounds.append(run.round_(work, run.WORLDS[args.world], args.requests, seed))
        shutil.rmtree(work, ignore_errors=True)
        with open(os.path.join(out, f"{args.world}-rounds.json"), "w", encoding="utf-8") as f:
            json.dump(rounds, f, indent=1, default=float)
    lines = []
    report(rounds, out=lambda s: (print(s, flush=True), lines.append(s)))
    with open(os.path.join(out, f"{args.world}-report.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
