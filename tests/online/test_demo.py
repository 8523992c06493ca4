"""`monolith demo` on a job that is not MovieLens: the whole loop (replay,
joiner, online trainer with snapshots, sync, serving PS, predictor, a
client), a SIGKILL of the trainer and its resume; every joined example is
trained exactly once, probes see their trained rows served, and the
frozen copy is scored beside the online model."""

import json
import os
import subprocess
import sys

from tests.jobs import shop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_demo_runs_the_whole_loop_and_resumes_a_killed_trainer(tmp_path):
    log = tmp_path / "log.parquet"
    shop.make_log(str(log), n=13_000, part=0)   # --limit plays the first 12,000
    monolith = os.path.join(os.path.dirname(sys.executable), "monolith")
    done = subprocess.run([monolith, "demo", "--job", "tests.jobs.shop:job", "--data", str(log), "--limit", "12000", "--rate", "800",
                           "--seconds", "60", "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    joined = s["joined"]["positives"] + s["joined"]["negatives"]
    assert s["replayed"]["features"] == 12_000 and joined == 12_000 + s["probes"]
    assert s["killed"] and s["trained"] == joined  # SIGKILLed, resumed, nothing lost or trained twice
    assert s["freshness_s"]["n"] >= 3 and s["missed_probes"] == 0
    assert s["predictions"] > 1000 and s["auc_requests"] > 500
    assert 0.5 < s["auc_online"] < 1 and 0.5 < s["auc_frozen"] < 1
    assert s["png"] and os.path.exists(s["png"])
    assert "every example trained once" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
