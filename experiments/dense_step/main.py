"""Where the W2 step's time goes, and what makes the dense step faster:
the project's full step (Trainer, in-jit, 26 collisionless tables), a
plain-JAX static-table step and the dense step alone (no tables), side by
side in one run; then one change at a time (bf16 products, the one-pass
FM, donation, XLA's CPU flags, the batch split over two host devices),
each against the same arm without it in the same round; and the loss
curves of the variants that change numerics.

    python -m experiments.dense_step.main                 # ~14 min at load 9 on 2 cores; replaces results/
    python -m experiments.dense_step.main --configs base --rounds 3    # the in-process arms only, in a run folder
    python -m experiments.dense_step.main --batch 256 --hidden 32 --rounds 2 --steps 2 --static-rows 4096 \\
        --curve-steps 4 --configs base two_devices                        # seconds

Any run with flags writes to a fresh run folder (runs/dense_step-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).
"""

import argparse
import json
import os

from experiments import run_folder
from experiments.dense_step import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=1, help="steps per arm per round (1: arms alternate step by step)")
    p.add_argument("--warmup", type=int, default=3, help="steps per arm before the rounds (compile, first rows)")
    p.add_argument("--static-rows", type=int, default=1 << 20, help="rows per feature of the static tables")
    p.add_argument("--curve-steps", type=int, default=32, help="batches of the loss-curve comparison (0: none)")
    p.add_argument("--configs", nargs="+", default=list(run.CONFIGS), choices=list(run.CONFIGS),
                   help="configurations (worker processes); base first")
    p.add_argument("--arms", nargs="+", default=None, choices=list(run.ARM_KW),
                   help="only these arms, in every configuration that has them (default: all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.batch, args.warmup, args.static_rows) < 1 or args.curve_steps < 0:
        p.error("--batch, --rounds, --steps, --warmup and --static-rows must be >= 1, --curve-steps >= 0")
    if args.configs[0] != "base":
        p.error("--configs: base comes first (every other configuration is measured against it)")
    if args.batch % 2 and any(c.endswith("two_devices") for c in args.configs):
        p.error("--batch: two_devices splits the batch in two; give an even batch")
    size = ["--batch", str(args.batch), "--dim", str(args.dim), "--hidden", *map(str, args.hidden),
            "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--static-rows", str(args.static_rows), "--curve-steps", str(args.curve_steps),
            *(["--arms", *args.arms] if args.arms else [])]
    if args.worker is not None:
        return run.worker(args.worker, args.batch, args.dim, tuple(args.hidden), args.steps, args.rounds,
                          args.warmup, args.static_rows, args.curve_steps, args.arms)
    out_dir = run_folder.output_dir("dense_step", p, args)
    lines = []

    def out(line):
        print(line, flush=True)
        lines.append(line)

    r = run.run(args.configs, size, args.rounds, args.batch, args.steps, args.curve_steps, args.arms, out=out)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(out_dir, "output.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return r


if __name__ == "__main__":
    main()
