"""Frames: a minimal request/reply transport over TCP for latency-critical calls.

gRPC's Python server hands every call from its polling thread to a worker
thread, and HTTP/2 frames each message several times over; on a small
machine that costs ~0.4 ms a call before any work is done (an empty unary
RPC on loopback: ~0.5 ms at p50, ~1 ms at p99, where a TCP round trip is
~0.07 / 0.14 ms). Frames carry the same protobuf messages with none of
that: one connection per client, one thread per connection that reads a
request, runs the handler and writes the reply. A client sends one request
at a time on a connection and waits for its reply.

On the wire (little-endian):

- hello, client -> server, once per connection: b"MJFR", version (u8 = 1),
  token length (u16), token (ASCII; empty without one). The server answers
  with a reply frame: status OK and no payload, or UNAUTHENTICATED and the
  connection closed.
- request: payload length (u32), method (u8), payload.
- reply: payload length (u32), status (u8), payload: the reply message's
  bytes for OK, else an UTF-8 message saying what was wrong.

Statuses are gRPC's codes (OK 0, INVALID_ARGUMENT 3, RESOURCE_EXHAUSTED 8,
INTERNAL 13, UNAVAILABLE 14, UNAUTHENTICATED 16, UNIMPLEMENTED 12), so a
frames error reads as the same call's gRPC error would. A handler's
`RequestError` is INVALID_ARGUMENT and `LimitError` RESOURCE_EXHAUSTED
(`monolith_jax.rpc.wire`); anything else it did not expect is INTERNAL with
a log line; the connection goes on. A payload over `MAX_MESSAGE_BYTES`, a
hello that is not one, or a frame that stops half-way closes the
connection (after an answer where one can be given); nothing a peer sends
stops the server. Security is `wire.Security`'s: the same token
(compared in constant time), TLS from the same certificate files, and
loopback only unless a token is set (`wire.check_bind`).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import ssl
import struct
import tempfile
import threading
import time

from monolith_jax.rpc import wire

log = logging.getLogger("monolith_jax.rpc.frames")

MAGIC = b"MJFR"
VERSION = 1
_HELLO = struct.Struct("<4sBH")
_FRAME = struct.Struct("<IB")
OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 0, 3, 8, 12, 13, 14, 16
CODE_NAMES = {OK: "OK", INVALID_ARGUMENT: "INVALID_ARGUMENT", RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
              UNIMPLEMENTED: "UNIMPLEMENTED", INTERNAL: "INTERNAL", UNAVAILABLE: "UNAVAILABLE",
              UNAUTHENTICATED: "UNAUTHENTICATED", 4: "DEADLINE_EXCEEDED"}
MAX_CONNECTIONS = wire.MAX_CONCURRENT_RPCS
HELLO_TIMEOUT_S = 10.0    # a connection that does not say hello in time is closed
FRAME_TIMEOUT_S = 30.0    # once a frame has begun, the rest of it must come within this
SCHEME = "frames://"


class CallError(Exception):
    """A call answered with a status other than OK, or that got no answer."""

    def __init__(self, code: int, details: str):
        super().__init__(f"{CODE_NAMES.get(code, code)}: {details}")
        self.code, self.details = code, details

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))


class Unavailable(Exception):
    """Raised by a handler whose own upstream is unreachable: UNAVAILABLE."""


def _pem_files(*pems: bytes):
    """PEM bytes -> paths of private temporary files (ssl loads chains from files only)."""
    paths = []
    for pem in pems:
        fd, path = tempfile.mkstemp(prefix="monolith-tls-", suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        paths.append(path)
    return paths


def _load_chain(ctx: ssl.SSLContext, sec: wire.Security) -> None:
    cert, key = _pem_files(sec.cert, sec.key)
    try:
        ctx.load_cert_chain(cert, key)
    finally:
        os.unlink(cert)
        os.unlink(key)


def _server_context(sec: wire.Security) -> ssl.SSLContext | None:
    if sec.cert is None:   # as the gRPC servers: TLS when given a certificate
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(ctx, sec)
    if sec.ca is not None:   # mutual TLS, as the gRPC servers do
        ctx.load_verify_locations(cadata=sec.ca.decode("ascii"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(sec: wire.Security) -> ssl.SSLContext | None:
    if not sec.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if sec.ca is not None:
        ctx.load_verify_locations(cadata=sec.ca.decode("ascii"))
    else:
        ctx.load_default_certs()
    if sec.cert is not None:
        _load_chain(ctx, sec)
    return ctx


def _read_exact(sock, n: int, into: bytearray | None = None) -> bytes | bytearray | None:
    """n bytes, or None if the peer closed before the first byte."""
    buf = into if into is not None else bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"the peer closed the connection {got} bytes into a {n}-byte read")
        got += k
    return buf


def _send_frame(sock, status_or_method: int, payload: bytes) -> None:
    head = _FRAME.pack(len(payload), status_or_method)
    if len(payload) < 65536:   # one write (and one segment) for the small messages latency is about
        sock.sendall(head + payload)
    else:                      # no copy of a large one
        sock.sendall(head)
        sock.sendall(payload)


def _finish(conn, drain_bytes: int = 1 << 20, drain_s: float = 1.0) -> None:
    """Ends a connection refused with an answer so that the answer arrives:
    closing with the peer's bytes unread would reset the connection, and a
    reset may discard the answer before the peer reads it."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(drain_s)
        deadline, got = time.monotonic() + drain_s, 0
        while got < drain_bytes and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except (OSError, ssl.SSLError):
        pass


class FramesServer:
    """Serves `handlers` (method number -> callable(bytes) -> bytes) on
    host:port (0: any free port; `port` is the bound one), a thread per
    connection. `close()` stops listening and closes the connections."""

    def __init__(self, handlers: dict, host: str = "127.0.0.1", port: int = 0,
                 security: wire.Security | None = None, max_connections: int = MAX_CONNECTIONS,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES, name: str = "frames"):
        self.security = wire.check_bind(host, security)
        self._ssl = _server_context(self.security)
        self.handlers = dict(handlers)
        self.max_connections = max_connections
        self.max_message_bytes = max_message_bytes
        self.stats = {"connections": 0, "refused_connections": 0, "unauthenticated": 0, "requests": 0,
                      "errors": {name: 0 for code, name in CODE_NAMES.items() if code != OK}, "dropped": 0}
        self._lock = threading.Lock()
        self._open: set = set()
        self._closing = False
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host.strip("[]"), port))
        self._sock.listen(128)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._accepting = threading.Thread(target=self._accept, name=f"monolith-{name}-accept", daemon=True)
        self._accepting.start()

    def _count(self, code: int) -> None:
        with self._lock:
            if code == OK:
                self.stats["requests"] += 1
            else:
                self.stats["errors"][CODE_NAMES.get(code, "INTERNAL")] += 1

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return   # closed
            with self._lock:
                full = len(self._open) >= self.max_connections
                if not full:
                    self._open.add(conn)
                    self.stats["connections"] += 1
                else:
                    self.stats["refused_connections"] += 1
            if full:
                try:
                    conn.settimeout(1.0)
                    _send_frame(conn, RESOURCE_EXHAUSTED,
                                f"this server takes at most {self.max_connections} connections at once".encode())
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="monolith-frames-conn", daemon=True).start()

    def _serve(self, raw) -> None:
        conn = raw
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HELLO_TIMEOUT_S)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)
            if not self._hello(conn):
                _finish(conn)
                return
            header = bytearray(_FRAME.size)
            while not self._closing:
                conn.settimeout(None)    # a client may keep its connection idle
                if _read_exact(conn, _FRAME.size, header) is None:
                    return
                conn.settimeout(FRAME_TIMEOUT_S)
                n, method = _FRAME.unpack(header)
                if n > self.max_message_bytes:
                    self._count(RESOURCE_EXHAUSTED)
                    _send_frame(conn, RESOURCE_EXHAUSTED, f"a request of {n:,} bytes is over this server's "
                                                          f"{self.max_message_bytes:,}".encode())
                    _finish(conn)
                    return
                payload = _read_exact(conn, n) if n else b""
                if payload is None:
                    raise ConnectionError("the peer closed the connection inside a frame")
                status, reply = self._call(method, bytes(payload))
                self._count(status)
                _send_frame(conn, status, reply)
        except (OSError, ConnectionError, ssl.SSLError) as err:
            if not self._closing:
                with self._lock:
                    self.stats["dropped"] += 1
                log.debug("frames connection dropped: %s", err)
        finally:
            with self._lock:
                self._open.discard(raw)
            try:
                conn.close()
            except OSError:
                pass

    def _hello(self, conn) -> bool:
        head = _read_exact(conn, _HELLO.size)
        if head is None:
            return False
        magic, version, n = _HELLO.unpack(head)
        if magic != MAGIC or version != VERSION:
            self._count(INVALID_ARGUMENT)
            _send_frame(conn, INVALID_ARGUMENT, f"not a monolith frames client (hello {bytes(head)!r}; this server "
                                                f"speaks version {VERSION})".encode())
            return False
        token = _read_exact(conn, n) if n else b""
        if token is None:
            return False
        want = self.security.token
        if want and not hmac.compare_digest(token, want.encode("ascii")):
            with self._lock:
                self.stats["unauthenticated"] += 1
            self._count(UNAUTHENTICATED)
            _send_frame(conn, UNAUTHENTICATED, b"missing or wrong auth token")
            return False
        _send_frame(conn, OK, b"")
        return True

    def _call(self, method: int, payload: bytes) -> tuple[int, bytes]:
        handler = self.handlers.get(method)
        if handler is None:
            return UNIMPLEMENTED, f"no method {method} here (methods: {sorted(self.handlers)})".encode()
        try:
            return OK, handler(payload)
        except wire.RequestError as err:
            return INVALID_ARGUMENT, str(err).encode()
        except wire.LimitError as err:
            return RESOURCE_EXHAUSTED, str(err).encode()
        except Unavailable as err:
            return UNAVAILABLE, str(err).encode()
        except Exception as err:
            log.exception("frames method %d failed", method)
            return INTERNAL, f"{type(err).__name__}: {err}".encode()

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._open)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accepting.join(5)


def split_address(address: str) -> tuple[str, int]:
    """"frames://HOST:PORT" or "HOST:PORT" -> (host, port)."""
    rest = address[len(SCHEME):] if address.startswith(SCHEME) else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"a frames address is [frames://]HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class FramesChannel:
    """One connection to a FramesServer, opened on first use and again
    after it breaks; calls are serialized on it. `security`: the
    process's (`wire.default_security()`) when None."""

    def __init__(self, address: str, security: wire.Security | None = None):
        self.host, self.port = split_address(address)
        self.security = security if security is not None else wire.default_security()
        self._ssl = _client_context(self.security)
        self._sock = None
        self._lock = threading.Lock()
        self._header = bytearray(_FRAME.size)

    def _connect(self, deadline: float):
        delay = 0.05
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=max(deadline - time.monotonic(), 0.01))
                break
            except OSError as err:
                if time.monotonic() + delay >= deadline:
                    raise CallError(UNAVAILABLE, f"cannot reach {self.host}:{self.port}: {err}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            token = (self.security.token or "").encode("ascii")
            sock.sendall(_HELLO.pack(MAGIC, VERSION, len(token)) + token)
            status, reply = self._read_reply(sock)
        except (OSError, ConnectionError, ssl.SSLError) as err:   # no TLS where TLS is wanted, say
            sock.close()
            raise CallError(UNAVAILABLE, f"{self.host}:{self.port} refused the connection: {err}") from None
        except BaseException:
            sock.close()
            raise
        if status != OK:
            sock.close()
            raise CallError(status, reply.decode("utf-8", "replace"))
        return sock

    def _read_reply(self, sock) -> tuple[int, bytes]:
        if _read_exact(sock, _FRAME.size, self._header) is None:
            raise ConnectionError("the server closed the connection")
        n, status = _FRAME.unpack(self._header)
        if n > wire.MAX_MESSAGE_BYTES:
            raise CallError(INTERNAL, f"a reply of {n:,} bytes is over {wire.MAX_MESSAGE_BYTES:,}")
        return status, bytes(_read_exact(sock, n)) if n else b""

    def call(self, method: int, payload: bytes, timeout_s: float = 10.0) -> bytes:
        """The reply's bytes; CallError for any other status, or when no
        answer comes within timeout_s (the connection is then dropped).
        A call whose connection broke before its answer is sent once more
        on a new one: for idempotent methods (predictions, reads)."""
        if len(payload) > wire.MAX_MESSAGE_BYTES:
            raise CallError(RESOURCE_EXHAUSTED, f"a request of {len(payload):,} bytes is over "
                                                f"{wire.MAX_MESSAGE_BYTES:,}")
        deadline = time.monotonic() + timeout_s
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect(deadline)
                sock = self._sock
                try:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    _send_frame(sock, method, payload)
                    status, reply = self._read_reply(sock)
                except socket.timeout:
                    self._drop()
                    raise CallError(4, f"no answer from {self.host}:{self.port} within {timeout_s:g} s") from None
                except (OSError, ConnectionError, ssl.SSLError) as err:
                    self._drop()
                    if fresh or attempt:
                        raise CallError(UNAVAILABLE, f"{self.host}:{self.port}: {err}") from None
                    continue   # a connection the server closed while idle: once more, on a new one
                if status != OK:   # (a connection the server closed after it is found broken next time)
                    raise CallError(status, reply.decode("utf-8", "replace"))
                return reply
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()
