"""Helpers for tests of the servers in their own processes: start one, read
its port (and metrics port), its memory, its Prometheus metrics."""

import os
import subprocess
import sys
import urllib.request

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}
MODULES = {"serving-ps": "monolith_jax.serving.serving_ps", "predictor": "monolith_jax.serving.predictor",
           "training-ps": "monolith_jax.distributed.training_ps"}


class Server:
    """One server process: `port`, `metrics_port` (None without --metrics-port), `pid`."""

    def __init__(self, kind: str, *args, env=None, stderr=None):
        self.proc = subprocess.Popen([sys.executable, "-m", MODULES[kind], *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, text=True,
                                     env={**ENV, **(env or {})})
        self.metrics_port = None
        for _ in range(50):   # a few lines at most before the one with the port
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{kind} did not start (exit {self.proc.wait(30)})")
            if " metrics on http://" in line:
                self.metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
            if " listening on " in line:
                self.port = int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1])
                break
        self.pid = self.proc.pid
        self.address = f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def scrape(port: int) -> dict:
    """GET /metrics -> {(sample name, frozenset of labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
