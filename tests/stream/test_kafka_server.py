"""`monolith kafka`: a cluster a shell can start, with the stream's topics,
that stops cleanly on SIGTERM (embedded) and with its parent (tansu)."""

import os
import signal
import subprocess
import sys

import pytest

from monolith_jax.stream import kafka as K
from tests.stream.kafka_util import producer, read_topic

MONOLITH = os.path.join(os.path.dirname(sys.executable), "monolith")


def start(*args):
    proc = subprocess.Popen([MONOLITH, "kafka", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for _ in range(200):
        line = proc.stdout.readline()
        if not line or line.startswith("kafka listening on "):
            break
    assert line.startswith("kafka listening on 127.0.0.1:"), line
    return proc, line.split()[-1]


@pytest.mark.parametrize("broker", ["embedded", "tansu"])
def test_a_cluster_from_the_shell_serves_the_streams_topics_until_stopped(broker):
    proc, bootstrap = start("--broker", broker, "--watch-stdin")
    try:
        K.check_reachable(bootstrap)
        assert K.is_embedded(bootstrap) == (broker == "embedded")
        meta = producer(bootstrap).list_topics(timeout=10).topics
        assert all(len(meta[t].partitions) == K.EMBEDDED_PARTITIONS for t in K.TOPICS.values())
        prod = producer(bootstrap)
        prod.produce("features", b"hello", b"k")
        assert prod.flush(10) == 0
        assert [m.value() for m in read_topic(bootstrap, "features")] == [b"hello"]
        if broker == "embedded":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.stdin.close()   # the parent is gone: it stops by itself
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "kafka stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_shell_cluster_takes_its_tansu_broker_with_it():
    import time

    proc, bootstrap = start("--broker", "tansu")
    (broker,) = _children(proc.pid)
    with open(f"/proc/{broker}/cmdline", "rb") as f:
        assert b"tansu" in f.read()        # the shim became the broker itself
    K.check_reachable(bootstrap)
    proc.kill()                           # no handler runs: only the kernel can stop the broker now
    proc.wait(10)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{broker}") and time.monotonic() < deadline:
        with open(f"/proc/{broker}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":   # exited, waiting to be reaped by init
                break
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{broker}"), "the tansu broker outlived its SIGKILLed parent"
