"""Arrays on the wire: the checks and conversions the gRPC services share.

Arrays travel as bytes fields (little-endian, C order) beside their dtype
and shape; every conversion from a peer's bytes is checked here, and a
mismatch raises `RequestError` naming what was wrong (the services answer
it with INVALID_ARGUMENT).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16), "int32": np.dtype(np.int32)}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
MAX_MESSAGE_BYTES = 64 << 20


def channel(address: str):
    """A client channel to one of the services: large messages, and a
    reconnect within a second of a server coming back (gRPC's default
    backoff grows to two minutes)."""
    import grpc

    return grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000)])


def start_server(add_servicer, host: str, port: int, workers: int):
    """A gRPC server with one servicer, bound and started; returns (server, bound port)."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    add_servicer(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return server, bound


def run_until_signalled(server, grace_s: float = 2.0) -> None:
    """Serves until SIGTERM or SIGINT, then stops `server` (requests in
    flight get `grace_s` to finish). For the services' command lines."""
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(grace_s).wait()


class RequestError(ValueError):
    """A bad request; becomes INVALID_ARGUMENT."""


def dtype(name: str, allowed=FLOAT_DTYPES) -> np.dtype:
    """The numpy dtype of a wire dtype name ('' means float32)."""
    name = name or "float32"
    if name not in allowed:
        raise RequestError(f"dtype must be one of {sorted(allowed)}, got {name!r}")
    return DTYPES[name]


def array(data: bytes, dt: np.dtype, what: str, count: int | None = None) -> np.ndarray:
    """bytes -> 1-d array of `dt`, checking the length (and the count, if given)."""
    if len(data) % dt.itemsize:
        raise RequestError(f"{what}: {len(data)} bytes is not a whole number of {dt.name}")
    a = np.frombuffer(data, dt)
    if count is not None and a.size != count:
        raise RequestError(f"{what}: {a.size} values, expected {count}")
    return a


def tensors_to_proto(named: dict) -> list:
    from monolith_jax.rpc import serving_pb2 as pb

    out = []
    for name, a in named.items():
        a = np.asarray(a)
        if a.dtype.name not in DTYPES:
            raise TypeError(f"dense param {name!r}: dtype {a.dtype} cannot be sent")
        out.append(pb.Tensor(name=name, dtype=a.dtype.name, shape=list(a.shape),
                             data=np.ascontiguousarray(a).tobytes()))
    return out


def tensors_from_proto(tensors) -> dict:
    """Tensor messages -> name -> array, checked: known dtype, sizes that
    match the shapes, finite values, no name twice."""
    out = {}
    for t in tensors:
        if not t.name:
            raise RequestError("a tensor without a name")
        if t.name in out:
            raise RequestError(f"tensor {t.name!r} twice")
        if t.dtype not in DTYPES:
            raise RequestError(f"tensor {t.name!r}: dtype must be one of {sorted(DTYPES)}, got {t.dtype!r}")
        if any(d < 0 for d in t.shape):
            raise RequestError(f"tensor {t.name!r}: negative dimension in shape {list(t.shape)}")
        count = int(np.prod(t.shape, dtype=np.int64))
        a = array(t.data, DTYPES[t.dtype], f"tensor {t.name!r}", count).reshape(tuple(t.shape))
        if a.dtype.kind == "f" or t.dtype == "bfloat16":
            if not np.all(np.isfinite(a.astype(np.float32))):
                raise RequestError(f"tensor {t.name!r} has values that are not finite")
        out[t.name] = a
    return out
