"""Where an experiment writes its results.

Each experiment's committed results (its `results/` folder) are replaced
only by its default command, `python -m experiments.NAME.main` with no
flags, or by a full-size run given `--out` explicitly. Any other run (a
small variant: `--quick`, `--limit`, fewer seeds, one part alone, ...)
writes to a fresh run folder, `runs/NAME-YYYYmmdd-HHMMSS/` in the current
folder (the repository root, where the documented commands run; git
ignores /runs/ there), or under $MONOLITH_RUNS_DIR when that is set, and
prints where. A small variant given `--out` pointing at the committed
results folder is refused.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

RUNS_ENV = "MONOLITH_RUNS_DIR"
EXPERIMENTS = pathlib.Path(__file__).resolve().parent


def committed(experiment: str) -> pathlib.Path:
    """The experiment's committed results folder."""
    return EXPERIMENTS / experiment / "results"


def runs_root() -> pathlib.Path:
    """Where run folders go: $MONOLITH_RUNS_DIR, else runs/ in the current folder."""
    return pathlib.Path(os.environ.get(RUNS_ENV) or "runs").resolve()


def new_run_folder(experiment: str) -> pathlib.Path:
    """A fresh, empty folder runs/EXPERIMENT-TIMESTAMP[-k]/."""
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    k = 0
    while True:
        folder = root / (f"{experiment}-{stamp}" + (f"-{k}" if k else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            k += 1


def changed(parser: argparse.ArgumentParser, args: argparse.Namespace, ignore=()) -> list:
    """The flags of `args` that differ from the parser's defaults (`out` and `ignore` aside)."""
    defaults = vars(parser.parse_args([]))
    return [name for name, value in defaults.items()
            if name != "out" and name not in ignore and getattr(args, name) != value]


def _same(a, b) -> bool:
    try:
        return pathlib.Path(a).resolve() == pathlib.Path(b).resolve()
    except OSError:
        return False


def output_dir(experiment: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
               full_size_flags=(), out=None) -> pathlib.Path:
    """The folder this run writes to (created). Call it on the parsed flags,
    before changing any. `full_size_flags`: flags that change what a run
    measures but not its size (a run with only those changed is still a
    full run, so an explicit --out may be the committed folder)."""
    target = committed(experiment)
    smaller = changed(parser, args, ignore=full_size_flags)
    if args.out is not None:
        if smaller and _same(args.out, target):
            raise SystemExit(
                f"experiments.{experiment}: --out {args.out} is the committed results folder, and this is not a "
                f"full run ({', '.join('--' + n.replace('_', '-') for n in smaller)} set); the committed results "
                f"are replaced only by a full run. Drop --out to write to a fresh run folder under "
                f"{runs_root()}, or give another folder.")
        folder = pathlib.Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    if not changed(parser, args):
        target.mkdir(parents=True, exist_ok=True)
        return target
    folder = new_run_folder(experiment)
    shown = os.path.relpath(target) if _inside(pathlib.Path.cwd(), target) else str(target)
    (out or (lambda line: print(line, flush=True)))(
        f"[not the default command: writing to the run folder {folder}, not over the committed results in {shown}]")
    return folder


def _inside(folder: pathlib.Path, path: pathlib.Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
