"""The one place every gRPC server and client of monolith_jax is made.

Arrays on the wire: arrays travel as bytes fields (little-endian, C order)
beside their dtype and shape; every conversion from a peer's bytes is
checked here, and a mismatch raises `RequestError` naming what was wrong
(INVALID_ARGUMENT). A request that would make a server hold or build more
than its limits raises `LimitError` (RESOURCE_EXHAUSTED, naming the limit).

Who may call (`Security`): off by default, and then servers bind loopback
only. A deployment turns it on with one option:

- a shared token: `--auth-token-file FILE` on a server's command line, or
  `MONOLITH_AUTH_TOKEN` / `MONOLITH_AUTH_TOKEN_FILE` in the environment of
  every process (servers and clients alike: the trainer's pusher, the
  predictor's serving-PS client, `ShardedTable`, `AsyncDense`,
  `PredictorClient`). Clients send it as `authorization: Bearer TOKEN`
  metadata; servers compare it in constant time and answer a missing or
  wrong one with UNAUTHENTICATED.
- TLS, when certificate files are given: `--tls-cert/--tls-key` (PEM) make
  a server listen with TLS; `--tls-ca` makes clients verify servers against
  that CA and servers require client certificates signed by it (mutual
  TLS). Environment: `MONOLITH_TLS_CERT`, `MONOLITH_TLS_KEY`,
  `MONOLITH_TLS_CA`. A client given a CA (or a certificate) talks TLS; a
  server's certificate must name the address clients dial (a DNS or IP
  subjectAltName).

A server refuses to bind an address that is not loopback unless a token is
set. Command-line options win over the environment.

Every server also gets, from `start_server`: bodies that do not decode
answered INVALID_ARGUMENT (gRPC's own answer is INTERNAL), exceptions a
servicer did not expect answered INTERNAL with a log line (never UNKNOWN),
and, given a `monolith_jax.rpc.metrics.Metrics`, request counts by method
and status and latency histograms.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import ipaddress
import logging
import os
import time

import ml_dtypes
import numpy as np

log = logging.getLogger("monolith_jax.rpc.wire")

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16), "int32": np.dtype(np.int32)}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_MESSAGE_BYTES = 64 << 20
# What a message may carry besides its arrays' bytes (fields, names, framing):
# senders fill messages to at most MAX_MESSAGE_BYTES - MESSAGE_MARGIN, and a
# server refuses a request whose reply would pass that.
MESSAGE_MARGIN = 1 << 20
MAX_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - MESSAGE_MARGIN
MAX_NAME = 256         # characters of a table, trainer or tensor name
MAX_CONCURRENT_RPCS = 64   # RPCs a server takes at once (queued ones hold their messages)
MAX_DIMS = 32          # of a tensor's shape

TOKEN_ENV, TOKEN_FILE_ENV = "MONOLITH_AUTH_TOKEN", "MONOLITH_AUTH_TOKEN_FILE"
TLS_ENV = {"cert": "MONOLITH_TLS_CERT", "key": "MONOLITH_TLS_KEY", "ca": "MONOLITH_TLS_CA"}
_AUTH_KEY = "authorization"


class RequestError(ValueError):
    """A bad request; becomes INVALID_ARGUMENT."""


class LimitError(Exception):
    """A request past one of a server's limits; becomes RESOURCE_EXHAUSTED.
    The message names the limit (and the option that sets it)."""


# ------------------------------------------------------------------ security
@dataclasses.dataclass(frozen=True)
class Security:
    """Who may call: a shared token and/or TLS material (PEM bytes)."""

    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    def __post_init__(self):
        if self.token is not None:
            if not self.token or not self.token.isascii() or not self.token.isprintable() or " " in self.token:
                raise ValueError("the auth token must be non-empty printable ASCII without spaces")
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")

    @property
    def tls(self) -> bool:
        return self.cert is not None or self.ca is not None

    def __repr__(self) -> str:  # never print the token
        return (f"Security(token={'set' if self.token else None}, tls_cert={self.cert is not None}, "
                f"tls_ca={self.ca is not None})")

    @classmethod
    def from_files(cls, token_file=None, cert=None, key=None, ca=None, token=None) -> "Security":
        if token_file:
            token = _read(token_file, "auth token file").decode("ascii", "replace").strip()
        return cls(token=token or None, cert=_read(cert, "TLS certificate") if cert else None,
                   key=_read(key, "TLS key") if key else None, ca=_read(ca, "TLS CA") if ca else None)

    @classmethod
    def from_env(cls, environ=None) -> "Security":
        env = os.environ if environ is None else environ
        return cls.from_files(token_file=env.get(TOKEN_FILE_ENV) or None, token=env.get(TOKEN_ENV) or None,
                              **{k: env.get(v) or None for k, v in TLS_ENV.items()})


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{what} {path}: {err.strerror or err}") from None


_configured: Security | None = None


def configure(security: Security | None) -> None:
    """Sets what this process's servers and clients use when given nothing
    (a command line calls it with its options); None: the environment."""
    global _configured
    _configured = security


def default_security() -> Security:
    return _configured if _configured is not None else Security.from_env()


def add_server_args(p) -> None:
    """The options every server's command line takes: security and metrics."""
    p.add_argument("--auth-token-file", default=None,
                   help=f"a file holding the shared token clients must send (or env {TOKEN_ENV} / {TOKEN_FILE_ENV}); "
                        "needed to bind an address that is not loopback")
    p.add_argument("--tls-cert", default=None, help=f"PEM certificate: serve TLS (env {TLS_ENV['cert']})")
    p.add_argument("--tls-key", default=None, help=f"PEM key of --tls-cert (env {TLS_ENV['key']})")
    p.add_argument("--tls-ca", default=None,
                   help=f"PEM CA: clients verify servers with it, servers require client certificates it signed "
                        f"(env {TLS_ENV['ca']})")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port, printed); off by default")


def security_from_args(args) -> Security:
    """The options of `add_server_args`, over the environment; configures
    this process's clients with them too. Bad files exit with a message."""
    try:
        env = Security.from_env()
        given = Security.from_files(args.auth_token_file, args.tls_cert, args.tls_key, args.tls_ca)
        sec = Security(token=given.token or env.token,
                       cert=given.cert if given.cert is not None else env.cert,
                       key=given.key if given.key is not None else env.key,
                       ca=given.ca if given.ca is not None else env.ca)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    configure(sec)
    return sec


def parse_bytes(text: str) -> int:
    """'1048576', '64K', '256M', '2G' -> bytes (a command-line type)."""
    import argparse

    t = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a size must not be negative: {text!r}")
    return n


def is_loopback(host: str) -> bool:
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name other than localhost, "", "0.0.0.0", "::": not known to be loopback


def _host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


# ------------------------------------------------------------------ clients
def channel(address: str, security: Security | None = None):
    """A client channel to one of the services: large messages, a reconnect
    within a second of a server coming back (gRPC's default backoff grows to
    two minutes), and the process's token and TLS (or `security`'s)."""
    import grpc

    sec = security if security is not None else default_security()
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    if sec.tls:
        creds = grpc.ssl_channel_credentials(root_certificates=sec.ca, private_key=sec.key,
                                             certificate_chain=sec.cert)
        ch = grpc.secure_channel(address, creds, options=options)
    else:
        ch = grpc.insecure_channel(address, options=options)
    if sec.token:
        ch = grpc.intercept_channel(ch, _token_client(sec.token))
    return ch


def _token_client(token: str):
    """A client interceptor that adds the token to every call's metadata."""
    import collections

    import grpc

    class Details(collections.namedtuple("Details", ("method", "timeout", "metadata", "credentials",
                                                     "wait_for_ready", "compression")), grpc.ClientCallDetails):
        pass

    header = (_AUTH_KEY, f"Bearer {token}")

    class TokenClient(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            metadata = [*(details.metadata or ()), header]
            return continuation(Details(details.method, details.timeout, metadata, details.credentials,
                                        getattr(details, "wait_for_ready", None),
                                        getattr(details, "compression", None)), request)

    return TokenClient()


# ------------------------------------------------------------------ servers
def guard(method):
    """Servicer method decorator: RequestError -> INVALID_ARGUMENT,
    LimitError -> RESOURCE_EXHAUSTED, anything else a servicer did not
    expect -> INTERNAL with a log line; the message is the error's."""

    @functools.wraps(method)
    def guarded(self, request, context):
        import grpc

        try:
            return method(self, request, context)
        except RequestError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except LimitError as err:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Exception as err:
            if _aborted(context):
                raise
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(err).__name__}: {err}")

    return guarded


def _aborted(context) -> bool:
    try:
        return context.code() is not None
    except Exception:
        return False


class _Undecodable:
    def __init__(self, why: str):
        self.why = why


class _Gate:
    """The servers' interceptor: token check, bodies that do not decode,
    the last line of defence against UNKNOWN, and the request metrics."""

    def __init__(self, token: str | None, metrics=None):
        self._expected = f"Bearer {token}".encode() if token else None
        self._metrics = metrics

    def _authorized(self, metadata) -> bool:
        if self._expected is None:
            return True
        got = next((v for k, v in (metadata or ()) if k == _AUTH_KEY), None)
        if got is None:
            return False
        got = got if isinstance(got, bytes) else str(got).encode("utf-8", "replace")
        return hmac.compare_digest(got, self._expected)

    def intercept_service(self, continuation, details):
        import grpc

        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = "/".join(details.method.rsplit("/", 2)[-2:]).rsplit(".", 1)[-1]   # e.g. ServingPS/Push
        authorized = self._authorized(details.invocation_metadata)
        inner, deserialize, metrics = handler.unary_unary, handler.request_deserializer, self._metrics

        def decode(data):
            try:
                return deserialize(data) if deserialize is not None else data
            except Exception as err:
                return _Undecodable(f"{type(err).__name__}: {err}")

        def behavior(request, context):
            t0 = time.perf_counter()
            try:
                if not authorized:
                    context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                  "missing or wrong auth token (clients send the deployment's shared token: "
                                  f"{TOKEN_ENV} or {TOKEN_FILE_ENV})")
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{method}: the request body does not decode ({request.why})")
                return inner(request, context)
            except Exception as err:
                if not _aborted(context):
                    log.exception("%s failed", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"{method}: {type(err).__name__}: {err}")
                raise
            finally:
                if metrics is not None:
                    code = context.code() if _aborted(context) else None
                    metrics.observe(method, code.name if code is not None else "OK", time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=decode if authorized else None,
                                                   response_serializer=handler.response_serializer)


def _server_gate(token, metrics):
    import grpc

    class Gate(_Gate, grpc.ServerInterceptor):
        pass

    return Gate(token, metrics)


def check_bind(host: str, security: Security | None = None) -> Security:
    """Refuses (ValueError, with why) to serve on `host` as configured: an
    address that is not loopback needs a token. Returns the Security used."""
    sec = security if security is not None else default_security()
    if not is_loopback(host) and not sec.token:
        raise ValueError(f"refusing to listen on {host!r}: it is not a loopback address and no auth token is set, "
                         f"so any host that reaches it could read, push or erase rows. Bind 127.0.0.1, or give "
                         f"a token (--auth-token-file FILE, or {TOKEN_ENV} / {TOKEN_FILE_ENV}) and preferably "
                         f"TLS (--tls-cert/--tls-key)")
    if sec.tls and sec.cert is None:
        raise ValueError("a TLS server needs its certificate and key (--tls-cert/--tls-key), not only a CA")
    return sec


def start_server(add_servicer, host: str, port: int, workers: int, security: Security | None = None,
                 metrics=None, max_concurrent: int = MAX_CONCURRENT_RPCS):
    """A gRPC server with one servicer, bound and started; returns (server,
    bound port). Refuses (ValueError) an address that is not loopback
    without a token. At most `max_concurrent` RPCs are taken at once (each
    may hold a message of up to MAX_MESSAGE_BYTES); more are answered
    RESOURCE_EXHAUSTED before their bodies are read (`overloaded(err)`)."""
    from concurrent import futures

    import grpc

    sec = check_bind(host, security)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[_server_gate(sec.token, metrics)], maximum_concurrent_rpcs=max_concurrent,
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    add_servicer(server)
    address = _host_port(host, port)
    try:
        if sec.cert is not None:
            creds = grpc.ssl_server_credentials([(sec.key, sec.cert)], root_certificates=sec.ca,
                                                require_client_auth=sec.ca is not None)
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot bind {address}: {err}") from None
    if not bound:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, bound


def overloaded(err) -> bool:
    """Whether an RpcError is a server's refusal of one RPC more than it
    takes at once (worth trying again), not one of its limits."""
    import grpc

    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in (err.details() or "")


def run_until_signalled(server, grace_s: float = 2.0, exit_after_s: float = 5.0) -> None:
    """Serves until SIGTERM or SIGINT, then stops `server` (requests in
    flight get `grace_s` to finish). For the services' command lines.

    A process told to stop does stop: a handler still running after the
    grace (Python cannot cancel its thread, and the interpreter waits for
    it at exit) would hold the process forever. `exit_after_s` after the
    grace, the stacks of every thread are written to stderr, naming what
    held it, and the process exits with status 1. SIGUSR1 writes the same
    stacks at any time without stopping anything."""
    import faulthandler
    import signal
    import threading

    done = threading.Event()
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack on stderr, the service going on
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    # Python runs a signal's handler on the main thread, between bytecodes.
    # The kernel may deliver SIGTERM to any thread (gRPC's, say): that
    # interrupts only that thread's wait, and a main thread blocked in an
    # untimed wait would never run the handler. It wakes to look instead.
    while not done.wait(0.25):
        pass
    faulthandler.dump_traceback_later(grace_s + exit_after_s, exit=True)  # armed until the process ends
    server.stop(grace_s).wait()


# ------------------------------------------------------------------- arrays
def name(value: str, what: str) -> str:
    """A peer-given name: non-empty, at most MAX_NAME characters."""
    if not value:
        raise RequestError(f"{what} is empty")
    if len(value) > MAX_NAME:
        raise RequestError(f"{what} has {len(value)} characters (at most {MAX_NAME})")
    return value


def dtype(name: str, allowed=FLOAT_DTYPES) -> np.dtype:
    """The numpy dtype of a wire dtype name ('' means float32)."""
    name = name or "float32"
    if name not in allowed:
        raise RequestError(f"dtype must be one of {sorted(allowed)}, got {name[:MAX_NAME]!r}")
    return DTYPES[name]


def array(data: bytes, dt: np.dtype, what: str, count: int | None = None) -> np.ndarray:
    """bytes -> 1-d array of `dt`, checking the length (and the count, if given)."""
    if len(data) % dt.itemsize:
        raise RequestError(f"{what}: {len(data)} bytes is not a whole number of {dt.name}")
    a = np.frombuffer(data, dt)
    if count is not None and a.size != count:
        raise RequestError(f"{what}: {a.size} values, expected {count}")
    return a


def check_reply_bytes(n_bytes: int, what: str, per_item: int, items: str) -> None:
    """Refuses (LimitError) a request whose reply would pass the message
    limit, before the reply is built."""
    if n_bytes > MAX_PAYLOAD_BYTES:
        raise LimitError(f"{what} would answer {n_bytes} bytes, over the {MAX_PAYLOAD_BYTES} byte reply limit "
                         f"(gRPC messages are at most {MAX_MESSAGE_BYTES}): ask for at most "
                         f"{max(MAX_PAYLOAD_BYTES // max(per_item, 1), 1)} {items} per call")


def tensors_to_proto(named: dict) -> list:
    from monolith_jax.rpc import serving_pb2 as pb

    out = []
    for name_, a in named.items():
        a = np.asarray(a)
        if a.dtype.name not in DTYPES:
            raise TypeError(f"dense param {name_!r}: dtype {a.dtype} cannot be sent")
        out.append(pb.Tensor(name=name_, dtype=a.dtype.name, shape=list(a.shape),
                             data=np.ascontiguousarray(a).tobytes()))
    return out


def tensors_from_proto(tensors) -> dict:
    """Tensor messages -> name -> array, checked: known dtype, a shape that
    fits its bytes (no overflow: sizes are Python ints), finite values, no
    name twice."""
    out = {}
    for t in tensors:
        if not t.name:
            raise RequestError("a tensor without a name")
        tname = name(t.name, "a tensor's name")
        if tname in out:
            raise RequestError(f"tensor {tname!r} twice")
        if t.dtype not in DTYPES:
            raise RequestError(f"tensor {tname!r}: dtype must be one of {sorted(DTYPES)}, got {t.dtype[:MAX_NAME]!r}")
        shape = [int(d) for d in t.shape]
        if len(shape) > MAX_DIMS:
            raise RequestError(f"tensor {tname!r}: {len(shape)} dimensions (at most {MAX_DIMS})")
        if any(d < 0 for d in shape):
            raise RequestError(f"tensor {tname!r}: negative dimension in shape {shape}")
        count = 1
        for d in shape:
            count *= d          # a Python int: never wraps
        a = array(t.data, DTYPES[t.dtype], f"tensor {tname!r}", count).reshape(tuple(shape))
        if a.dtype.kind == "f" or t.dtype == "bfloat16":
            if not np.all(np.isfinite(a.astype(np.float32))):
                raise RequestError(f"tensor {tname!r} has values that are not finite")
        out[tname] = a
    return out
