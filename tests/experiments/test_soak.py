"""The soak experiment, short: 45 s of traffic of the shop job
(tests/jobs/shop.py) with faults mixed in, one SIGKILL of the trainer,
the joiner and the serving PS at fixed times (each restarted at once), then
the counts must add up: every valid request trained once, every bad
message dead-lettered or counted, the serving PS holding the trainer's
rows, every process up at the end.

The soak runs as its own process in a session of its own, so that every
process it starts is stopped with it, even when this test fails or times
out.
"""

import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = "tests.jobs.shop:job"
FAULTS = "garbage,truncated,nested_json,empty,oversize,near_limit,future_time,negative_time,dup_features," \
         "dup_action,large_valid,missing_sparse"


def run_soak(out_dir, *args, timeout_s=300):
    cmd = [sys.executable, "-m", "experiments.soak.run", "--job", JOB, "--out", str(out_dir), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:   # timed out, or this test was interrupted: the whole session goes
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        try:   # anything of the session still there (the soak stops its processes; this is the backstop)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, stdout, stderr


def test_a_short_soak_under_faults_and_kills_adds_up(tmp_path):
    rc, stdout, stderr = run_soak(tmp_path / "run", "--minutes", "0.75", "--seed", "1", "--rate", "40",
                                  "--fault-every", "0.3", "1.0", "--faults", FAULTS, "--drain-timeout", "90",
                                  # the serving PS last: it recovers from the snapshot folder and
                                  # the pusher's full copy, not from a restarted trainer's
                                  "--kill-at", "20:trainer", "24:joiner", "38:serving-ps")
    tail = f"\nstdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
    assert os.path.exists(tmp_path / "run" / "summary.json"), tail
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    line = next((line for line in stdout.splitlines() if line.startswith("{")), None)
    assert line is not None and json.loads(line)["valid_requests"] == s["valid_requests"], tail
    assert "error" not in s, s.get("error", "") + tail
    assert rc == (0 if s["ok"] else 1), tail

    # Every process was killed as planned, started again, and up at the end.
    assert s["kills"] == {"joiner": 1, "trainer": 1, "serving-ps": 1}, tail
    assert all(s["up_at_end"].values()) and not s["unexpected_exits"] and s["drained"], tail
    assert s["trainer_exit"] == 0 and s["predict"]["ok"], tail
    assert s["trainer_summary"]["resumed_from"] is not None, tail   # the trainer resumed from its snapshot

    # Every valid request became exactly one trained example.
    valid, trained, dropped = s["valid_requests"], s["examples_trained"], s["duplicates_dropped"]
    assert valid > 1000 and s["valid_undelivered"] == 0, tail
    et = s["examples_topic"]
    assert et["valid_requests_never_emitted"] == 0 and s["trainer_dead_letter_valid_examples"] == 0, tail
    if dropped is None:   # a trainer without deduplication by request id: the joiner's re-emissions train twice
        assert trained >= valid, tail
    else:
        assert trained == valid, tail
        assert dropped == et["extra_emissions"], tail   # the joiner's re-emissions after its SIGKILL, all dropped

    # Every bad message is accounted for.
    injected = s["faults_injected"]
    assert sum(injected.values()) >= 20 and len(injected) >= 6, injected
    assert s["bad_messages_expected_dead"] > 0 and s["bad_messages_unaccounted_n"] == 0, s["bad_messages_unaccounted"]
    assert s["checks"]["bad_messages_accounted"], tail
    assert s["dead_letters_by_source"].get("examples", 0) == 0, s["dead_letters_by_reason"]

    # The serving PS, killed and restarted, holds the trainer's rows.
    rows = s["serving_rows"]
    assert rows["ok"], rows
    for table in rows["tables"].values():
        assert table["sampled"] > 0 and table["equal"] == table["sampled"], rows
        assert table["serving_rows"] == table["trainer_rows"], rows
    if dropped is not None:
        assert s["ok"] and rc == 0, tail
    assert "Traceback" not in stderr, tail
