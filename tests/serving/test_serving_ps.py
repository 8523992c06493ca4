"""Serving PS (its own process) and the touched-row sync from a trainer's tables."""

import os
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.serving.serving_ps import serve
from monolith_jax.serving.sync import SyncPusher

DIM = 8


def start_server(port=0, table=f"ids:{DIM}"):
    """A serving PS process; its stderr goes to a temporary file that `stop` shows."""
    import tempfile

    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "monolith_jax.serving.serving_ps", "--port", str(port),
                             "--table", table], stdout=subprocess.PIPE, stderr=err, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    proc.err = err
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc, timeout_s: float = 30.0) -> None:
    """SIGTERM, and a clean exit (0) expected: 1 with thread stacks means
    something held it past the grace; no exit at all, its stacks (SIGUSR1)
    are shown before it is killed."""
    import signal
    import time

    proc.terminate()
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        proc.wait()
        code = None
    proc.err.seek(0)
    err = proc.err.read()
    proc.err.close()
    assert code == 0, f"serving PS exit {code} after SIGTERM; its stderr:\n{err[-6000:]}"


@pytest.fixture
def server():
    proc, port = start_server()
    yield proc, port
    stop(proc)


def lookup(stub, keys, dtype="float32"):
    r = stub.Lookup(pb.LookupRequest(table="ids", keys=np.asarray(keys, np.uint64).tobytes(), dtype=dtype))
    return np.frombuffer(r.values, dtype).reshape(-1, r.dim).astype(np.float32), np.frombuffer(r.found, np.uint8)


def trainer_table():
    return mj.EmbeddingTable(mj.TableConfig("ids", DIM, mj.Normal(0, 0.1), mj.Adagrad(0.1)))


def test_full_copy_then_only_touched_rows(server):
    _, port = server
    table = trainer_table()
    keys = np.arange(1, 20_001, dtype=np.uint64)
    table.lookup_host(keys)                      # 20,000 rows exist
    pusher = SyncPusher({"ids": table}, f"127.0.0.1:{port}", "t0", max_rows_per_message=4096)
    assert pusher.push_once() and pusher.stats["full_copies"] == 1 and pusher.stats["rows"] == 20_000
    stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    values, found = lookup(stub, keys)
    assert found.all() and np.array_equal(values, table.find(keys)[0])

    touched = keys[::10]
    table.apply_gradients_host(touched, np.ones((touched.size, DIM), np.float32), step=1)
    before = dict(pusher.stats)
    assert pusher.push_once()
    sent_rows = pusher.stats["rows"] - before["rows"]
    sent_bytes = pusher.stats["bytes"] - before["bytes"]
    assert sent_rows == touched.size and pusher.stats["full_copies"] == 1
    assert sent_bytes <= 1.2 * touched.size * (8 + DIM * 4), "sync cost is the touched rows, not the table"
    values, _ = lookup(stub, keys)
    assert np.array_equal(values, table.find(keys)[0])
    assert stub.Version(pb.VersionRequest()).applied["t0"] == 2
    pusher.stop()


def test_restarted_server_gets_a_full_copy_then_deltas():
    proc, port = start_server()
    table = trainer_table()
    keys = np.arange(1, 1001, dtype=np.uint64)
    table.lookup_host(keys)
    pusher = SyncPusher({"ids": table}, f"127.0.0.1:{port}", "t0", timeout_s=2)
    assert pusher.push_once()
    stop(proc)
    table.apply_gradients_host(keys[:5], np.ones((5, DIM), np.float32), step=1)
    assert not pusher.push_once() and pusher.stats["failures"] == 1   # down: nothing lost
    proc, port = start_server(port)
    try:
        assert pusher.push_once() and pusher.stats["full_copies"] == 2
        stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        values, found = lookup(stub, keys)
        assert found.all() and np.array_equal(values, table.find(keys)[0])
    finally:
        stop(proc)


def test_failed_delta_push_keeps_its_rows_for_the_next():
    # In-process server stopped and restarted on the same port with its state:
    # the server did not lose anything, so the retry is a delta, not a copy.
    server_, port, state = serve({"ids": DIM})
    table = trainer_table()
    keys = np.arange(1, 101, dtype=np.uint64)
    table.lookup_host(keys)
    pusher = SyncPusher({"ids": table}, f"127.0.0.1:{port}", "t0", timeout_s=1)
    assert pusher.push_once()
    server_.stop(0).wait()
    table.apply_gradients_host(keys[:3], np.ones((3, DIM), np.float32), step=1)
    assert not pusher.push_once()
    table.apply_gradients_host(keys[3:6], np.ones((3, DIM), np.float32), step=2)
    import grpc as g
    from monolith_jax.rpc import serving_pb2_grpc as pbg2
    from monolith_jax.serving.serving_ps import make_servicer
    again = g.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
    pbg2.add_ServingPSServicer_to_server(make_servicer(state), again)
    assert again.add_insecure_port(f"127.0.0.1:{port}") == port
    again.start()
    try:
        rows = pusher.stats["rows"]
        assert pusher.push_once()
        assert pusher.stats["rows"] - rows == 6 and pusher.stats["full_copies"] == 1
        assert np.array_equal(state.lookup("ids", keys)[0], table.find(keys)[0])
    finally:
        again.stop(0)


def test_reader_never_sees_a_torn_row_during_pushes(server):
    _, port = server
    addr = f"127.0.0.1:{port}"
    keys = np.arange(1, 2001, dtype=np.uint64)
    push_stub = pbg.ServingPSStub(grpc.insecure_channel(addr))
    torn, reads = [], [0]
    done = threading.Event()

    def reader():
        stub = pbg.ServingPSStub(grpc.insecure_channel(addr))
        while not done.is_set():
            values, found = lookup(stub, keys)
            rows = values[found.astype(bool)]
            bad = rows[np.any(rows != rows[:, :1], axis=1)]
            if bad.size:
                torn.append(bad[0])
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for seq in range(1, 41):  # every row of push n holds n in all its dims
            values = np.full((keys.size, DIM), float(seq), np.float32)
            push_stub.Push(pb.PushRequest(trainer="w", sequence=seq, last=True, tables=[
                pb.TableRows(table="ids", dim=DIM, dtype="float32", keys=keys.tobytes(), values=values.tobytes())]))
    finally:
        done.set()
        t.join(30)
    assert reads[0] > 5 and not torn


@pytest.mark.parametrize("rows, expect", [
    (dict(table="nope", dim=DIM, dtype="float32", keys=b"", values=b""), "unknown table 'nope'"),
    (dict(table="ids", dim=4, dtype="float32", keys=b"", values=b""), "dim 8, the request says 4"),
    (dict(table="ids", dim=DIM, dtype="int8", keys=b"", values=b""), "dtype must be one of"),
    (dict(table="ids", dim=DIM, dtype="float32", keys=b"123", values=b""), "not a whole number of uint64"),
    (dict(table="ids", dim=DIM, dtype="float32", keys=np.ones(2, np.uint64).tobytes(), values=b"\0" * 8),
     "8 bytes for 2 keys"),
])
def test_bad_pushes_get_invalid_argument_and_change_nothing(server, rows, expect):
    _, port = server
    stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(pb.PushRequest(trainer="t", sequence=1, last=True, tables=[pb.TableRows(**rows)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expect in err.value.details()
    assert dict(stub.Version(pb.VersionRequest()).rows) == {"ids": 0}
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(table="ids", keys=b"12345"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pushes_tick_at_a_fixed_rate_whatever_a_push_takes(monkeypatch):
    """The push thread starts a push every interval_s from the start of the
    last one (a row waits at most the interval for its sync), and after a
    push longer than the interval starts the next one at once, without a
    burst of catch-up pushes. On a clock the test drives: no server, no sleep."""
    import monolith_jax.serving.sync as sync

    clock = {"now": 100.0}
    durations = iter([0.1, 0.1, 0.7, 0.1, 0.1])   # seconds each push takes
    starts = []

    class Clock:
        @staticmethod
        def monotonic():
            return clock["now"]

    class Stop:
        def wait(self, timeout):
            assert timeout >= 0.0
            clock["now"] += timeout
            return len(starts) == 5

    monkeypatch.setattr(sync, "time", Clock)
    pusher = SyncPusher({}, "127.0.0.1:1", interval_s=0.3)
    pusher._stop = Stop()

    def push_once():
        starts.append(round(clock["now"] - 100.0, 6))
        clock["now"] += next(durations)
        return True

    pusher.push_once = push_once
    pusher._run()
    pusher._channel.close()
    # 0.3, 0.6 (each 0.3 after the last start); the third takes 0.7 and ends at
    # 1.6, past its successor's 1.2: that one starts at once, the next 0.3 later.
    assert starts == [0.3, 0.6, 0.9, 1.6, 1.9]
