"""Small variants write to a run folder, never over the committed results.

Every experiment's committed results (experiments/NAME/results/) are
replaced only by its default command or a full run given --out
(experiments/run_folder.py). Here: the rule itself; each documented
default command choosing the committed folder (stopped right after); the
default commands of table_bench and memory_control run on tiny data (their
committed folder moved under tmp_path); and the small
variants, through `main` on tiny data, of the experiments whose other
tests call their run modules directly (table_bench, memory_control,
collisionless).
The other experiments' tests (online_training, paper_online, scale_out,
serving, snapshots, sync_interval) run their small variant through `main`
themselves. Every such test takes the `runs` fixture (conftest.py), which
checks that every committed result file is byte for byte and mtime for
mtime what it was.
"""

import pathlib

import pytest

from experiments import run_folder

EXPERIMENTS = pathlib.Path(run_folder.__file__).resolve().parent


# ------------------------------------------------------------ the rule itself

def _parser():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--broker", default="embedded")
    p.add_argument("--out", default=None)
    return p


def test_only_the_default_command_or_a_full_run_with_out_writes_the_committed_folder(runs, capsys, tmp_path):
    p = _parser()
    target = run_folder.committed("collisionless")
    assert run_folder.output_dir("collisionless", p, p.parse_args([])) == target
    assert run_folder.output_dir("collisionless", p, p.parse_args(["--seeds", "3"])) == target  # the default value

    first = run_folder.output_dir("collisionless", p, p.parse_args(["--seeds", "1"]))
    second = run_folder.output_dir("collisionless", p, p.parse_args(["--broker", "process"]))
    assert first != second and first.parent == second.parent == runs.root
    assert first.is_dir() and not any(first.iterdir())
    printed = capsys.readouterr().out
    assert str(first) in printed and str(second) in printed

    with pytest.raises(SystemExit, match="not a full run .*--seeds"):
        run_folder.output_dir("collisionless", p, p.parse_args(["--seeds", "1", "--out", str(target) + "/"]))
    # a flag that changes what is measured but not how much: still a full run
    assert run_folder.output_dir("collisionless", p, p.parse_args(["--broker", "process", "--out", str(target)]),
                                 full_size_flags=("broker",)) == pathlib.Path(str(target))
    side = tmp_path / "side"
    assert run_folder.output_dir("collisionless", p, p.parse_args(["--seeds", "1", "--out", str(side)])) == side
    assert side.is_dir()


def test_run_folders_are_git_ignored():
    ignore = (EXPERIMENTS.parent / ".gitignore").read_text().split()
    assert "/runs/" in ignore


class _Chosen(Exception):
    pass


@pytest.mark.parametrize("experiment", ["collisionless", "multi_task", "online_training", "paper_online", "placement", "scale_out",
                                        "serving", "snapshots", "sync_interval"])
def test_each_default_command_writes_the_committed_folder_and_a_variant_a_run_folder(experiment, runs,
                                                                                     monkeypatch):
    """Each main chooses its folder before any work: stopped there, with no flags
    (the documented command in experiments/README.md) and with one; the one flag
    with --out at the committed folder stops with a message."""
    import importlib

    main = importlib.import_module(f"experiments.{experiment}.main")
    chosen = []
    real = run_folder.output_dir

    def stop_after_choosing(*a, **k):
        chosen.append(real(*a, **k))
        raise _Chosen

    monkeypatch.setattr(run_folder, "output_dir", stop_after_choosing)
    parser_flag = {"collisionless": "--seeds=1", "multi_task": "--seeds=1", "online_training": "--rounds=1", "paper_online": "--quick", "placement": "--steps=3",
                   "scale_out": "--steps=5", "serving": "--seconds=10", "snapshots": "--limit=1000",
                   "sync_interval": "--repeats=1"}[experiment]
    for argv in ([], [parser_flag]):
        with pytest.raises(_Chosen):
            main.main(argv)
    assert chosen[0] == run_folder.committed(experiment)
    assert chosen[1].parent == runs.root and chosen[1].name.startswith(experiment + "-")
    # the small variant pointed at the committed folder is refused
    with pytest.raises(SystemExit, match="is the committed results folder"):
        main.main([parser_flag, "--out", str(run_folder.committed(experiment))])


# ------------------------------------------------------------ small variants and default commands on tiny data

@pytest.fixture
def committed_in_tmp(tmp_path, monkeypatch):
    """The default command's committed folder, moved under tmp_path (so that it can run here)."""
    monkeypatch.setattr(run_folder, "committed", lambda experiment: tmp_path / "committed" / experiment / "results")
    return tmp_path / "committed"


def test_table_bench_default_and_tiny_write_nothing(runs, committed_in_tmp, monkeypatch, capsys):
    from experiments.table_bench import bench, main

    (r,) = main.main(["--tiny"])
    assert r["lookup_host"] > 0 and r["apply_host"] > 0
    tiny = dict(universe=20_000, batch=2048, min_resident=5_000, batches=2, dict_batches=1, dims=(8,))
    monkeypatch.setattr(main, "BenchConfig", lambda **k: bench.BenchConfig(**{**tiny, **k}))
    (r,) = main.main([])   # the default command, on a tiny universe
    assert r["lookup_jit"] > 0 and r["payload_per_row"] == 8 * 4 * 2
    assert "bytes/row" in capsys.readouterr().out
    assert runs.folders() == [] and not committed_in_tmp.exists()   # it writes no file at all


def _tiny_memory_control(monkeypatch):
    import monolith_jax.examples.movielens.data as data
    from experiments.memory_control import run
    from tests.experiments.test_memory_control import _tiny_ratings

    monkeypatch.setattr(data, "load_movielens_1m", lambda: _tiny_ratings())
    real_zipf = run.zipf_stream
    monkeypatch.setattr(run, "zipf_stream", lambda batches, batch: real_zipf(min(batches, 4), 4096, universe=200_000))


def test_memory_control_default_and_small_variant_write_nothing(runs, committed_in_tmp, monkeypatch, capsys):
    from experiments.memory_control import main

    _tiny_memory_control(monkeypatch)
    out = main.main([])   # the default command: both data sets (tiny here)
    assert {r["setting"] for r in out["movielens"]} >= {"baseline", "threshold 10"}
    assert {r["setting"] for r in out["zipf"]} >= {"baseline", "threshold 5"}
    out = main.main(["--data", "zipf", "--batches", "20"])   # the docstring's short variant
    assert set(out) == {"zipf"}
    assert "threshold" in capsys.readouterr().out
    assert runs.folders() == [] and not committed_in_tmp.exists()


def _tiny_collisionless(monkeypatch):
    import monolith_jax.examples.movielens.data as data
    from tests.experiments.test_collisionless import _with_side_info
    from tests.experiments.test_memory_control import _tiny_ratings

    monkeypatch.setattr(data, "load_movielens_1m", lambda: _with_side_info(_tiny_ratings(n=3000)))


def test_collisionless_small_variant_writes_a_run_folder(runs, monkeypatch, capsys):
    import json

    from experiments.collisionless import main

    _tiny_collisionless(monkeypatch)
    results, sp = main.main(["--seeds", "1", "--epochs", "1", "--limit", "50000", "--batch", "256",
                             "--speed-steps", "3"])
    assert set(results) == {"collisionless", "hashing, paper's rates", "hashing, 10x fewer buckets"}
    assert sp["collisionless"] > 0
    folder = runs.folder("collisionless", capsys.readouterr().out)
    assert set(json.loads((folder / "auc.json").read_text())) == set(results)
    assert (folder / "figure7.png").stat().st_size > 0
