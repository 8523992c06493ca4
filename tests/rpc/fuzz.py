"""A little fuzzing of the servers' requests: random values in every field
of a valid request, and bodies that are not protobuf at all. A server must
answer each with OK, INVALID_ARGUMENT (naming what is wrong) or
RESOURCE_EXHAUSTED (naming a limit), never UNKNOWN or INTERNAL, and go on."""

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor as F

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

_INTS = {F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_INT64: (-2**63, 2**63 - 1),
         F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_UINT64: (0, 2**64 - 1)}


def _pick(rng, options):
    return options[int(rng.integers(0, len(options)))]


def _value(field, rng, depth):
    t = field.type
    if t == F.TYPE_STRING:
        return _pick(rng, ["", "ids", "x" * 300, "\u00e9\u0000/\\", "float32", "bfloat16", "int8", "w",
                           "user", "['w']"])
    if t == F.TYPE_BYTES:
        n = _pick(rng, [0, 1, 7, 8, 9, 16, 64, 1000])
        return rng.bytes(n) if rng.random() < 0.7 else np.ones(n // 8, np.uint64).tobytes()
    if t in _INTS:
        lo, hi = _INTS[t]
        return _pick(rng, [0, 1, 2, 3, lo, hi, hi // 2, max(lo, -1), int(rng.integers(0, 1000))])
    if t == F.TYPE_BOOL:
        return bool(rng.random() < 0.5)
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return _pick(rng, [0.0, -1.0, 0.5, 1.0, float("nan"), float("inf"), 1e30])
    raise TypeError(t)


def mutate(message, rng, depth=0):
    """A copy of `message` with random values in some of its fields."""
    out = type(message)()
    out.CopyFrom(message)
    for field in out.DESCRIPTOR.fields:
        if rng.random() < 0.5:
            continue
        repeated = field.is_repeated
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry or depth > 1:
                continue
            target = getattr(out, field.name)
            if repeated:
                base = list(target) or [type(target.add())()]
                del target[:]
                for _ in range(int(rng.integers(0, 4))):
                    target.add().CopyFrom(mutate(base[int(rng.integers(0, len(base)))], rng, depth + 1))
            continue
        if repeated:
            target = getattr(out, field.name)
            del target[:]
            target.extend(_value(field, rng, depth) for _ in range(int(rng.integers(0, 4))))
        else:
            setattr(out, field.name, _value(field, rng, depth))
    return out


def fuzz(address: str, service: str, cases: dict, n: int = 40, seed: int = 0, metadata=None) -> dict:
    """cases: method -> (valid request, reply class). Sends n mutations of
    each and a few undecodable bodies; asserts every answer is allowed.
    Returns code name -> count."""
    rng = np.random.default_rng(seed)
    seen: dict = {}
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        for method, (valid, reply) in cases.items():
            call = ch.unary_unary(f"/monolith_jax.v1.{service}/{method}",
                                  request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
                                  response_deserializer=reply.FromString)
            bodies = [mutate(valid, rng) for _ in range(n)]
            bodies += [b"\xff\xff\xff", b"\x0a\x05ab", rng.bytes(50), b"\x12\xff\xff\xff\xff\x0f"]
            for body in bodies:
                try:
                    call(body, timeout=60, metadata=metadata)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()
                assert code in ALLOWED, (method, code, details, body)
                if code != grpc.StatusCode.OK:
                    assert details, (method, code, body)
                seen[code.name] = seen.get(code.name, 0) + 1
    return seen
