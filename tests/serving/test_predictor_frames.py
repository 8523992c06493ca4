"""The predictor over frames (`--frames-port`): the one-hop predictor
answers Predict and Info on its frames port exactly as on gRPC, refuses
bad requests with the same INVALID_ARGUMENT naming the problem, and goes
on serving after garbage. The shop job (not MovieLens), a real predictor
process."""

import socket
import struct
import time

import numpy as np
import pytest

from monolith_jax.rpc import frames
from monolith_jax.serving.sync import SyncPusher
from tests.jobs.test_shop_job import Server, assert_rows_found, own_predictions, requests_of, trained_export


def _frames_port(server) -> int:
    for line in server.lines:
        if " frames on " in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("the predictor printed no frames port:\n" + "".join(server.lines[-20:]))


def test_frames_answers_as_grpc_and_refuses_bad_requests_naming_them(tmp_path):
    from monolith_jax.serving.export import dense_arrays
    from monolith_jax.serving.predictor import PredictorClient

    _, trainer, model, test_path, cols = trained_export(tmp_path, 4000, 400)
    n = 200
    pred = Server("predictor", "--model", model, "--tables", "local", "--port", 0, "--frames-port", 0)
    try:
        port = _frames_port(pred)
        pusher = SyncPusher(trainer.tables, pred.address, "shop-0",
                            dense_source=lambda: (dense_arrays(trainer.params), 1.0))
        assert pusher.push_once() and pusher.push_dense()
        pusher.stop(final_push=False)
        fast, slow = PredictorClient(f"frames://127.0.0.1:{port}"), PredictorClient(pred.address)
        try:
            for _ in range(600):   # the pushed dense params are polled in
                if fast.info()[1]["dense_version"] > 0:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the predictor never took the pushed dense params")
            assert fast.spec == slow.spec
            # The same answers, for batches of 1 and of many, as the trainer's own.
            for rows in (range(0, 1), range(1, 2), range(2, 102), range(102, n)):
                reqs = requests_of(cols, rows)
                np.testing.assert_array_equal(fast.predict(reqs), slow.predict(reqs))
            got = np.concatenate([fast.predict(requests_of(cols, range(s, min(s + 50, n)))) for s in range(0, n, 50)])
            np.testing.assert_allclose(got, own_predictions(trainer, test_path, n), rtol=1e-4, atol=1e-6)
            assert_rows_found(fast)
            # Bad requests: the gRPC errors' words, as frames' codes.
            ids, dense = fast.encode(requests_of(cols, range(3)))
            name = next(iter(ids))
            lacking = {k: v for k, v in ids.items() if k != name}
            with pytest.raises(frames.CallError) as err:
                fast.predict_arrays(lacking, dense, 3)
            assert err.value.code_name == "INVALID_ARGUMENT" and repr(name) in err.value.details
            with pytest.raises(frames.CallError) as err:
                fast.predict_arrays({**ids, name: (ids[name][0], ids[name][1][:2])}, dense, 3)
            assert err.value.code_name == "INVALID_ARGUMENT" and f"lengths of feature {name!r}" in err.value.details
            channel = frames.FramesChannel(f"127.0.0.1:{port}")
            with pytest.raises(frames.CallError) as err:   # bytes that are no PredictRequest
                channel.call(1, b"\xff\xff\xff\xff")
            assert err.value.code_name == "INVALID_ARGUMENT" and "not a PredictRequest" in err.value.details
            with pytest.raises(frames.CallError) as err:
                channel.call(7, b"")
            assert err.value.code_name == "UNIMPLEMENTED"
            channel.close()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # not a frames client
                s.sendall(b"\x16\x03\x01garbage" * 100)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # a frame over the limit
                s.sendall(struct.pack("<4sBH", b"MJFR", 1, 0) + struct.pack("<IB", 2**32 - 1, 1))
            stats = fast.info()[1]
            assert stats["bad_requests"] == 3, stats
            reqs = requests_of(cols, range(5))
            np.testing.assert_array_equal(fast.predict(reqs), slow.predict(reqs))   # still serving, both ways
        finally:
            fast.close()
            slow.close()
    finally:
        pred.stop()
    assert pred.proc.returncode == 0, "".join(pred.lines[-30:])
