"""The README's "your own model" walkthrough, run as written: its job file,
its CSV maker, every command (servers in the background as the README
starts them) and the client snippet, from a CSV file to a served
prediction, then online through Kafka."""

import os
import re
import signal
import socket
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Your own model"


def walkthrough(section_title: str = SECTION) -> tuple[list, str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(section_title)
    end = text.find("\n## ", start + len(section_title))
    section = text[start:end if end > 0 else None]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S), section


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_walkthrough_has_a_job_file_commands_and_a_client():
    blocks, section = walkthrough()
    kinds = [k for k, _ in blocks]
    assert kinds.count("bash") >= 2 and kinds.count("python") >= 3
    assert blocks[0][1].startswith("# my_job.py")
    assert "monolith demo --job my_job:job --data clicks.csv" in section


def test_the_walkthrough_runs_from_a_csv_file_to_a_served_prediction(tmp_path):
    from monolith_jax.stream import kafka as K

    blocks, section = walkthrough()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": ""}
    ports = {"50051": str(free_port()), "50052": str(free_port())}
    servers = []
    outputs = []
    with K.EmbeddedKafka() as kafka:
        K.ensure_topics(kafka.bootstrap, {t: 2 for t in K.TOPICS.values()})

        def fill(text):
            for old, new in ports.items():
                text = text.replace(old, new)
            return text.replace("HOST:PORT", kafka.bootstrap)

        def command(line):
            line = fill(line)
            background = line.endswith("&")
            argv = line.rstrip("&").split()
            # Bounds, so that the stream's processes stop by themselves here.
            if argv[:2] == ["monolith", "join"]:
                argv += ["--exit-when-idle", "--idle-flush", "3", "--report-every", "0"]
            if argv[:2] == ["monolith", "train"] and "--bootstrap" in argv:
                argv += ["--idle-timeout", "6", "--no-warmup"]
            if background:
                proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                servers.append(proc)
                deadline = time.monotonic() + 120
                lines = []
                while time.monotonic() < deadline:
                    out = proc.stdout.readline()
                    lines.append(out)
                    if " listening on " in out:
                        return
                    if not out and proc.poll() is not None:
                        break
                raise AssertionError(f"{line} did not start:\n" + "".join(lines[-30:]))
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            outputs.append((line, done.stdout))

        try:
            for kind, body in blocks:
                if kind == "python" and body.startswith("# ") and body.split("\n", 1)[0].endswith(".py"):
                    (tmp_path / body.split("\n", 1)[0][2:].strip()).write_text(body)
                elif kind == "python":
                    done = subprocess.run([sys.executable, "-c", fill(body)], cwd=tmp_path, env=env,
                                          capture_output=True, text=True, timeout=300)
                    assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                    outputs.append((body, done.stdout))
                else:
                    for line in body.replace("\\\n", " ").splitlines():
                        if line.strip():
                            command(line.strip())
            command("monolith demo --job my_job:job --data clicks.csv")
            for kind, body in walkthrough("## Training a model on files, from Python")[0]:
                assert kind == "python"
                done = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env={**env, "PYTHONPATH": "."},
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
                outputs.append((body, done.stdout))
        finally:
            for proc in servers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    assert (tmp_path / "clicks.csv").exists() and (tmp_path / "model" / "spec.json").exists()
    printed = next(out for code, out in outputs if "PredictorClient" in code)
    probs = [float(x) for x in re.findall(r"[0-9.]+(?:e-?\d+)?", printed)]
    assert len(probs) == 2 and all(0.0 < p < 1.0 for p in probs), printed
    trained = next(out for code, out in outputs if code.startswith("monolith train") and "--data" in code)
    assert "trainer done" in trained
    demo = next(out for code, out in outputs if code.startswith("monolith demo"))
    assert "demo done" in demo and "every example trained once" in demo, demo
    aucs = [float(x) for x in outputs[-1][1].split()[-2:]]
    assert all(0.6 < a < 1.0 for a in aucs), outputs[-1][1]
