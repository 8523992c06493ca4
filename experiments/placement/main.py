"""Placement of the training step on this machine: the W2 DeepFM step (26
sparse + 13 dense features, batch 4,096, dim 16, MLP 400-400-400) in-jit,
with the tables on the host and the host's work overlapped with the
device, and with the tables on the host without overlap; examples/s side
by side (medians of rounds, the arms interleaved), and the milliseconds
per step of each host phase.

    python -m experiments.placement.main                  # ~2 min; replaces results/
    python -m experiments.placement.main --batch 512 --rounds 2 --steps 3    # seconds, in a run folder
    python -m experiments.placement.accelerator           # on a machine with a GPU (see README)

Any run with flags writes to a fresh run folder (runs/placement-TIMESTAMP/,
printed), not over the committed results/, unless given --out
(experiments/run_folder.py).
"""

import argparse
import json
import os

from experiments import run_folder
from experiments.placement import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[400, 400, 400])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ beside this file for the default command, "
                        "else a fresh run folder)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.batch < 1:
        p.error("--batch, --rounds and --steps must be >= 1")
    out_dir = run_folder.output_dir("placement", p, args)
    lines = []

    def out(line):
        print(line, flush=True)
        lines.append(line)

    r = run.run(args.batch, args.dim, tuple(args.hidden), args.rounds, args.steps, out=out)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(out_dir, "output.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return r


if __name__ == "__main__":
    main()
