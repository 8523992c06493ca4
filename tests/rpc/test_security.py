"""Who may call the servers (rpc.wire): a shared token checked by every
server, TLS from certificate files, loopback unless a token is set; and the
checks every server shares (shapes that overflow, bodies that do not
decode)."""

import os
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

import monolith_jax as mj
from monolith_jax.rpc import serving_pb2 as pb
from monolith_jax.rpc import serving_pb2_grpc as pbg
from monolith_jax.rpc import wire
from monolith_jax.serving.sync import SyncPusher
from tests.rpc.servers import ENV, Server

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def _version(ch):
    return pbg.ServingPSStub(ch).Version(pb.VersionRequest(), timeout=30)


def test_a_server_with_a_token_refuses_clients_without_it_and_serves_those_with_it(token_file):
    with Server("serving-ps", "--table", "ids:4", "--auth-token-file", token_file) as server:
        for ch in (grpc.insecure_channel(server.address),
                   wire.channel(server.address, wire.Security()),
                   wire.channel(server.address, wire.Security(token="wrong-token"))):
            with pytest.raises(grpc.RpcError) as err:
                _version(ch)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            with pytest.raises(grpc.RpcError) as err:   # before the body is even read
                pbg.ServingPSStub(ch).Push(pb.PushRequest(trainer="t", sequence=1, last=True, full=True), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = wire.Security(token=TOKEN)
        assert dict(_version(wire.channel(server.address, good)).rows) == {"ids": 0}
        # The clients send it: given it, or from the environment.
        table = mj.EmbeddingTable(mj.TableConfig("ids", 4, mj.Normal(0, 0.1), mj.SGD(0.1)))
        table.lookup_host(np.arange(1, 11, dtype=np.uint64))
        assert SyncPusher({"ids": table}, server.address, "t0", security=good).push_once()
        os.environ[wire.TOKEN_ENV] = TOKEN
        try:
            assert dict(_version(wire.channel(server.address)).rows) == {"ids": 10}
        finally:
            del os.environ[wire.TOKEN_ENV]
        assert not SyncPusher({"ids": table}, server.address, "t1", timeout_s=5).push_once()


@pytest.mark.parametrize("kind, args", [("serving-ps", ["--table", "ids:4"]),
                                        ("training-ps", ["--shard", "0", "--shards", "1", "--tables", "TABLES"])])
def test_binding_all_interfaces_without_a_token_is_refused_with_why(kind, args, tmp_path):
    tables = tmp_path / "tables.json"
    tables.write_text('[{"name": "ids", "dim": 4}]')
    from tests.rpc.servers import MODULES

    run = subprocess.run([sys.executable, "-m", MODULES[kind], "--host", "0.0.0.0",
                          *[str(tables) if a == "TABLES" else a for a in args]],
                         capture_output=True, text=True, env={k: v for k, v in ENV.items() if not k.startswith("MONOLITH_")},
                         timeout=120)
    assert run.returncode != 0
    assert "refusing to listen on '0.0.0.0': it is not a loopback address and no auth token is set" in run.stderr, \
        run.stderr[-2000:]


def test_check_bind_and_loopback():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"):
        assert wire.is_loopback(host)
        wire.check_bind(host, wire.Security())
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "example.com"):
        assert not wire.is_loopback(host)
        with pytest.raises(ValueError, match="no auth token is set"):
            wire.check_bind(host, wire.Security())
        wire.check_bind(host, wire.Security(token="t"))
    with pytest.raises(ValueError, match="printable ASCII"):
        wire.Security(token="two words")
    with pytest.raises(ValueError, match="both a certificate"):
        wire.Security(cert=b"x")
    assert "s3cret" not in repr(wire.Security(token="s3cret"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_from_certificate_files(tmp_path, token_file):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with Server("serving-ps", "--table", "ids:4", "--auth-token-file", token_file, "--tls-cert", cert,
                "--tls-key", key) as server:
        secure = wire.Security(token=TOKEN, ca=cert.read_bytes())
        assert dict(_version(wire.channel(server.address, secure)).rows) == {"ids": 0}
        with pytest.raises(grpc.RpcError) as err:   # plaintext does not reach it
            _version(wire.channel(server.address, wire.Security(token=TOKEN)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            _version(wire.channel(server.address, wire.Security(ca=cert.read_bytes())))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tensor_shapes_that_overflow_or_do_not_fit_are_request_errors():
    for shape, data, expect in [([2**62, 2**62, 4], b"", "0 values, expected"),
                                ([2**40, 2**40], b"\0" * 8, "2 values, expected"),
                                ([1] * 40, b"\0" * 4, "40 dimensions"),
                                ([-1], b"", "negative dimension")]:
        with pytest.raises(wire.RequestError, match=expect):
            wire.tensors_from_proto([pb.Tensor(name="w", dtype="float32", shape=shape, data=data)])
    with pytest.raises(wire.RequestError, match="at most 256"):
        wire.tensors_from_proto([pb.Tensor(name="w" * 300, dtype="float32", shape=[0], data=b"")])
    assert wire.parse_bytes("64M") == 64 << 20 and wire.parse_bytes("1024") == 1024


def test_a_server_takes_a_bounded_number_of_rpcs_at_once_and_refuses_more_before_reading_them():
    import threading

    from monolith_jax.serving import serving_ps

    state = serving_ps.ServingTables({"ids": 4})
    entered, release = threading.Event(), threading.Event()
    version = state.version

    def slow_version(expire=False):
        entered.set()
        release.wait(60)
        return version(expire)

    state.version = slow_version
    server, port = wire.start_server(lambda s: pbg.add_ServingPSServicer_to_server(serving_ps.make_servicer(state), s),
                                     "127.0.0.1", 0, 4, security=wire.Security(), max_concurrent=1)
    try:
        stub = pbg.ServingPSStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        first = stub.Version.future(pb.VersionRequest(), timeout=60)
        assert entered.wait(60)
        with pytest.raises(grpc.RpcError) as err:
            stub.Push(pb.PushRequest(trainer="t", sequence=1, last=True, tables=[pb.TableRows(
                table="ids", dim=4, keys=np.ones(1000, np.uint64).tobytes(), values=b"\0" * 16000)]), timeout=60)
        assert wire.overloaded(err.value)
        release.set()
        assert dict(first.result().rows) == {"ids": 0}
        stub.Push(pb.PushRequest(trainer="t", sequence=1, last=True), timeout=60)   # taken once there is room
    finally:
        release.set()
        server.stop(0)
