"""The main job: replay -> join -> online training, on MovieLens-1M.

    monolith demo --job monolith_jax.examples.movielens.job:job [--quick] [--bootstrap HOST:PORT]
    python -m monolith_jax.examples.movielens.loop [--quick]          (the same)

The MovieLens job (`job.py`) through the generic demo, as any user's job
runs; `run_loop` is the in-process pipeline (`monolith_jax.online.pipeline`). The helpers
below keep the shapes experiments and tests use: a trainer of the job, a
joiner command with its label rule, and `run_loop` over given ratings.
"""

from __future__ import annotations

import sys

from monolith_jax.examples.movielens import job as J
from monolith_jax.examples.movielens import replay as R


def movielens_tables(seed: int = 0, dim: int = J.DIM) -> list:
    """The MovieLens DeepFM's one table: dim + 1 (the first-order weight), fused Adagrad."""
    return J.tables(seed, dim)


def movielens_trainer(seed: int = 0, dim: int = J.DIM, hidden=(128, 64), metrics_path: str | None = None,
                      out=print, log_every: int = 0):
    """A Trainer of the MovieLens job (DeepFM of width `dim`, hidden layers `hidden`)."""
    import dataclasses

    job = J.job if (dim, tuple(hidden)) == (J.DIM, (128, 64)) else dataclasses.replace(
        J.job, tables=tuple(J.tables(0, dim)), model=lambda rngs: J.model(rngs, dim, hidden))
    return job.make_trainer(seed, metrics_path=metrics_path, log_every=log_every, out=out)


def joiner_command(bootstrap: str, window_s: float, negative_rate: float, group: str,
                   topics: dict | None = None, idle_flush_s: float = 3.0, gate_group: str | None = None,
                   emit_positives: str = "at_window_end", exit_when_idle: bool = True) -> list:
    """The joiner process with the MovieLens job's label rule."""
    from monolith_jax.online.pipeline import joiner_command as command

    return command(bootstrap, group, J.job.labels, topics, window_s, negative_rate, idle_flush_s, gate_group,
                   emit_positives, exit_when_idle)


def run_loop(limit: int | None = None, bootstrap: str | None = None, impressions: float = 1.0,
             negative_rate: float = 0.5, window_s: float = 60.0, batch_size: int = 1024, speed: float = 0.0,
             seed: int = 0, metrics_path: str | None = None, out=print, ratings=None, report_every_s=5.0,
             topics: dict | None = None, trainer=None, on_batch=None, prequential: bool = True) -> dict:
    """The pipeline over MovieLens-1M (or the `ratings` given)."""
    from monolith_jax.examples.movielens.data import load_movielens_1m
    from monolith_jax.online.pipeline import run_pipeline

    ratings = load_movielens_1m() if ratings is None else ratings
    stream = R.MovieLensStream(ratings, impressions, seed=seed, limit=limit)
    return run_pipeline(J.job, stream, bootstrap, batch_size, negative_rate, window_s, speed, seed, metrics_path,
                        out, report_every_s, topics, trainer, on_batch, prequential=prequential,
                        describe=f"replaying {stream.n_ratings:,} ratings and {stream.n_impressions:,} unrated "
                                 f"impressions ({len(stream):,} messages)")


def main(argv=None) -> int:
    from monolith_jax.online import demo

    return demo.main(["--job", "monolith_jax.examples.movielens.job:job", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
