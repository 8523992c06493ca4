"""The `monolith` command: one subcommand per process, each with --help
showing every option with its help and default; the package names no data
set outside its example job."""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from monolith_jax.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parent.parent
MONOLITH = os.path.join(os.path.dirname(sys.executable), "monolith")


def run(*args, timeout=120):
    return subprocess.run([MONOLITH, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_console_script_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for name in ("train", "join", "replay", "serving-ps", "predictor", "training-ps", "cluster", "demo"):
        assert name in COMMANDS and re.search(rf"^\s+{name}\s", out.stdout, re.M), name
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown subcommand 'frobnicate'" in bad.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    import argparse
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            module.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
    parser = captured["parser"]
    assert parser.prog == f"monolith {name}"
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"monolith {name} {action.option_strings[0]} has no help text"
    assert run(name, "--help").returncode == 0


def test_train_needs_a_job_and_names_what_is_wrong():
    out = run("train", "--job", "no_such_module:job", "--data", "x.csv")
    assert out.returncode == 2 and "cannot import module 'no_such_module'" in out.stderr
    out = run("train", "--data", "x.csv")
    assert out.returncode == 2 and "--job" in out.stderr
    out = run("train", "--job", "tests.jobs.shop:job", "--bootstrap", "127.0.0.1:9", "--ps", "127.0.0.1:9",
              "--host-devices", "2")
    assert out.returncode == 2 and "--host-devices splits one process's dense step" in out.stderr
    out = run("train", "--job", "tests.jobs.shop:job", "--data", "x.csv", "--host-devices", "0")
    assert out.returncode == 2 and "--host-devices must be >= 1" in out.stderr


def test_train_on_a_broker_that_does_not_answer_fails_clearly_and_soon():
    t0 = time.monotonic()
    out = run("train", "--job", "tests.jobs.shop:job", "--bootstrap", "127.0.0.1:9", "--no-warmup", timeout=90)
    assert out.returncode != 0
    assert "no Kafka broker answers at '127.0.0.1:9'" in out.stderr
    assert out.stderr.count("\n") < 10, out.stderr  # one message, not a line per failed connect
    assert time.monotonic() - t0 < 60


def test_the_package_names_no_data_set_outside_its_example_job():
    package = ROOT / "monolith_jax"
    hits = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix in (".py", ".proto", ".md", ".json")
            and "movielens" in p.read_text(encoding="utf-8", errors="replace").lower()]
    assert hits and all(h.startswith("examples/movielens/") for h in hits), hits
