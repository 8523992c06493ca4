"""The frames transport (rpc.frames): requests answered in order on one
connection, a handler's errors as gRPC's codes, a token and TLS as the
gRPC servers check them, and nothing a peer sends stopping the server."""

import shutil
import socket
import struct
import subprocess
import threading

import pytest

from monolith_jax.rpc import frames, wire

TOKEN = "frames-token-for-tests"


def _handlers():
    def echo(payload):
        return payload[::-1]

    def refuse(payload):
        raise wire.RequestError(f"payload {payload!r} is wrong")

    def limit(payload):
        raise wire.LimitError("too much at once")

    def boom(payload):
        raise KeyError("a bug")

    def upstream(payload):
        raise frames.Unavailable("serving PS down")

    return {1: echo, 2: refuse, 3: limit, 4: boom, 5: upstream}


@pytest.fixture
def server():
    s = frames.FramesServer(_handlers(), max_message_bytes=1 << 20)
    yield s
    s.close()


def _raw(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _reply(sock):
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            return None
        head += chunk
    n, status = struct.unpack("<IB", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return status, body


def test_calls_are_answered_with_their_replies_and_errors_as_grpc_codes(server):
    ch = frames.FramesChannel(f"frames://127.0.0.1:{server.port}", wire.Security())
    try:
        assert ch.call(1, b"abc") == b"cba"
        assert ch.call(1, b"") == b""
        big = bytes(range(256)) * 1024    # 256 KiB: sent apart from its header
        assert ch.call(1, big) == big[::-1]
        for method, code, words in [(2, "INVALID_ARGUMENT", "payload b'x' is wrong"),
                                    (3, "RESOURCE_EXHAUSTED", "too much at once"),
                                    (4, "INTERNAL", "KeyError"), (5, "UNAVAILABLE", "serving PS down"),
                                    (9, "UNIMPLEMENTED", "no method 9")]:
            with pytest.raises(frames.CallError) as err:
                ch.call(method, b"x")
            assert err.value.code_name == code and words in err.value.details, err.value
        assert ch.call(1, b"still here") == b"ereh llits"   # the same connection went on
        assert server.stats["connections"] == 1
        # A server-side drop of an idle connection: the next call reconnects once.
        for c in list(server._open):
            c.shutdown(socket.SHUT_RDWR)
        assert ch.call(1, b"again") == b"niaga"
        assert server.stats["requests"] == 5 and server.stats["errors"]["INVALID_ARGUMENT"] == 1
    finally:
        ch.close()


def test_calls_from_threads_on_one_channel_each_get_their_own_reply(server):
    ch = frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security())
    bad = []

    def worker(i):
        for k in range(50):
            msg = f"{i}:{k}".encode()
            if ch.call(1, msg) != msg[::-1]:
                bad.append(msg)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ch.close()
    assert not bad and server.stats["requests"] == 200


def test_garbage_hellos_oversize_and_cut_frames_close_that_connection_only(server):
    ch = frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security())
    try:
        assert ch.call(1, b"ok") == b"ko"
        with _raw(server.port) as s:    # not a frames client at all
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            status, body = _reply(s)
            assert status == frames.INVALID_ARGUMENT and b"not a monolith frames client" in body
            assert _reply(s) is None     # and closed
        with _raw(server.port) as s:    # a frame over the server's limit: refused before it is read
            s.sendall(struct.pack("<4sBH", b"MJFR", 1, 0))
            assert _reply(s) == (frames.OK, b"")
            s.sendall(struct.pack("<IB", (1 << 20) + 1, 1))
            status, body = _reply(s)
            assert status == frames.RESOURCE_EXHAUSTED and b"1,048,577 bytes" in body
            assert _reply(s) is None
        with _raw(server.port) as s:    # a frame that stops half-way, then the peer leaves
            s.sendall(struct.pack("<4sBH", b"MJFR", 1, 0))
            assert _reply(s) == (frames.OK, b"")
            s.sendall(struct.pack("<IB", 100, 1) + b"only part")
        with _raw(server.port) as s:    # a hello cut short
            s.sendall(b"MJ")
        with pytest.raises(frames.CallError) as err:   # the client's own check
            ch.call(1, b"x" * (wire.MAX_MESSAGE_BYTES + 1))
        assert err.value.code_name == "RESOURCE_EXHAUSTED"
        assert ch.call(1, b"served") == b"devres"
        assert frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security()).call(1, b"new") == b"wen"
    finally:
        ch.close()


def test_a_token_is_required_once_set_and_connections_are_bounded():
    server = frames.FramesServer(_handlers(), security=wire.Security(token=TOKEN), max_connections=2)
    try:
        for sec in (wire.Security(), wire.Security(token="wrong-token")):
            with pytest.raises(frames.CallError) as err:
                frames.FramesChannel(f"127.0.0.1:{server.port}", sec).call(1, b"x")
            assert err.value.code_name == "UNAUTHENTICATED"
        assert server.stats["unauthenticated"] == 2
        a = frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(token=TOKEN))
        b = frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(token=TOKEN))
        assert a.call(1, b"a") == b"a" and b.call(1, b"b") == b"b"
        with pytest.raises(frames.CallError) as err:   # a third at once is refused, with why
            frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(token=TOKEN)).call(1, b"c", timeout_s=5)
        assert err.value.code_name == "RESOURCE_EXHAUSTED" and "at most 2 connections" in err.value.details
        a.close()
        c = frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(token=TOKEN))
        for _ in range(100):   # the server notices the closed one shortly
            try:
                assert c.call(1, b"c") == b"c"
                break
            except frames.CallError:
                pass
        else:
            raise AssertionError("a closed connection's place was never freed")
        b.close()
        c.close()
    finally:
        server.close()


def test_binding_beyond_loopback_needs_a_token():
    with pytest.raises(ValueError, match="token"):
        frames.FramesServer(_handlers(), host="0.0.0.0")


def test_an_unreachable_server_is_unavailable_within_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(frames.CallError) as err:
        frames.FramesChannel(f"127.0.0.1:{port}", wire.Security()).call(1, b"x", timeout_s=0.5)
    assert err.value.code_name == "UNAVAILABLE"
    with pytest.raises(ValueError, match="HOST:PORT"):
        frames.FramesChannel("frames://nowhere", wire.Security())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_from_certificate_files(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = frames.FramesServer(_handlers(), security=wire.Security(token=TOKEN, cert=cert.read_bytes(),
                                                                     key=key.read_bytes()))
    try:
        secure = wire.Security(token=TOKEN, ca=cert.read_bytes())
        assert frames.FramesChannel(f"127.0.0.1:{server.port}", secure).call(1, b"tls") == b"slt"
        with pytest.raises(frames.CallError) as err:   # plaintext does not reach it
            frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(token=TOKEN)).call(1, b"x", timeout_s=5)
        assert err.value.code_name in ("UNAVAILABLE", "INVALID_ARGUMENT")
        with pytest.raises(frames.CallError) as err:
            frames.FramesChannel(f"127.0.0.1:{server.port}", wire.Security(ca=cert.read_bytes())).call(1, b"x")
        assert err.value.code_name == "UNAUTHENTICATED"
        assert frames.FramesChannel(f"127.0.0.1:{server.port}", secure).call(1, b"still") == b"llits"
    finally:
        server.close()
