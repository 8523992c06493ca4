"""The flat codec writes the bytes protobuf writes and reads any encoding
protobuf reads, its bytes fields as views of the message; bad bytes are a
ValueError naming the field."""

import numpy as np
import pytest

from monolith_jax.rpc import training_step_pb2 as pb
from monolith_jax.rpc.flat import Codec, view
from monolith_jax.rpc.wire import RequestError

BYTES = ("apply_keys", "grads", "keys")


def random_request(rng) -> dict:
    pick = lambda *xs: xs[int(rng.integers(0, len(xs)))]   # noqa: E731
    return {"table": pick("", "ids", "\u00e9t\u00e9/\u4e2d", "x" * 300), "apply": bool(rng.random() < 0.5),
            "apply_keys": rng.bytes(int(pick(0, 8, 200))), "grads": rng.bytes(int(pick(0, 4, 1 << 17))),
            "step": int(pick(0, 1, 2**31 - 1, 2**32 - 1)), "round": int(pick(0, 7, 2**63, 2**64 - 1)),
            "contributors": int(pick(0, 2, 4096)), "session": int(rng.integers(0, 2**63)),
            "keys": rng.bytes(int(pick(0, 8, 4096))), "read_only": bool(rng.random() < 0.5)}


def as_plain(ns) -> dict:
    return {k: bytes(v) if k in BYTES else v for k, v in vars(ns).items()}


def test_encode_writes_protobufs_bytes_and_decode_reads_them_back():
    codec = Codec(pb.ShardStepRequest.DESCRIPTOR)
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = random_request(rng)
        wire_form = pb.ShardStepRequest(**values).SerializeToString()
        assert codec.encode(**values) == wire_form
        assert as_plain(codec.decode(wire_form)) == values
    reply = Codec(pb.ShardStepReply.DESCRIPTOR)
    for ints in [{"dim": -5, "updated": -(2**63), "skipped": 2**63 - 1}, {"dim": 2**31 - 1, "updated": 0}]:
        m = pb.ShardStepReply(values=b"\x01" * 9, **ints)
        assert reply.encode(values=b"\x01" * 9, **ints) == m.SerializeToString()
        got = reply.decode(m.SerializeToString())
        assert (got.dim, got.updated, got.skipped, bytes(got.values)) == (m.dim, m.updated, m.skipped, m.values)
    # numpy arrays go in as they are (2-d float32 included), nothing of them copied before the message
    grads = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert codec.encode(grads=grads) == pb.ShardStepRequest(grads=grads.tobytes()).SerializeToString()


def test_decode_reads_any_valid_encoding_as_protobuf_does():
    codec = Codec(pb.ShardStepRequest.DESCRIPTOR)
    rng = np.random.default_rng(1)
    for _ in range(50):
        # Concatenated messages: fields in any order, repeated scalars and bytes (the last wins).
        data = b"".join(pb.ShardStepRequest(**random_request(rng)).SerializeToString() for _ in range(3))
        expect = pb.ShardStepRequest.FromString(data)
        assert as_plain(codec.decode(data)) == {f.name: getattr(expect, f.name) for f in expect.DESCRIPTOR.fields}
    # Unknown fields of every wire type are skipped, as protobuf skips them.
    unknown = b"\x58\x05" + b"\x61" + bytes(8) + b"\x6d" + bytes(4) + b"\x72\x02ab" + b"\x80\x01\x96\x01"
    data = unknown + pb.ShardStepRequest(table="ids", step=3).SerializeToString() + unknown
    expect = pb.ShardStepRequest.FromString(data)
    got = codec.decode(data)
    assert (got.table, got.step) == (expect.table, expect.step) == ("ids", 3)
    # A negative int32 travels as ten bytes; a uint32 field keeps its low 32 bits.
    assert codec.decode(b"\x28" + b"\xff" * 9 + b"\x01").step == pb.ShardStepRequest.FromString(
        b"\x28" + b"\xff" * 9 + b"\x01").step == 2**32 - 1


@pytest.mark.parametrize("data, names", [
    (b"\x0a\x05ab", "table: 5 bytes announced"),                # a length past the end
    (b"\x28\xff\xff", "step: truncated"),                       # a varint cut short
    (b"\x28" + b"\xff" * 11, "step: truncated or overlong"),    # a varint of more than ten bytes
    (b"\x2a\x01\x00", "step: wire type 2"),                     # bytes where a number belongs
    (b"\x4a\x01\x00\x48\x01", "keys: wire type 0"),             # a number where bytes belong
    (b"\x0a\x02\xff\xfe", "table: not valid UTF-8"),
    (b"\x0b", "wire type 3"),                                   # groups are no field of a flat message
    (b"\x00\x00", "field number 0"),
    (b"\x61\x00\x00", "truncated fixed-width"),
])
def test_bad_bytes_are_a_value_error_naming_the_field(data, names):
    with pytest.raises(ValueError, match=names):
        Codec(pb.ShardStepRequest.DESCRIPTOR).decode(data)


def test_views_share_the_messages_memory_and_check_their_length():
    keys = np.array([1, 2**64 - 1, 3], np.uint64)
    message = bytes(8) + keys.tobytes()
    base = np.frombuffer(message, np.uint8).ctypes.data
    v = view(memoryview(message)[8:], np.uint64, "keys", 3)
    assert np.array_equal(v, keys) and v.ctypes.data == base + 8 and not v.flags.writeable
    odd = view(memoryview(b"\x00" + keys.tobytes())[1:], np.uint64, "keys")   # not 8-aligned: copied
    assert np.array_equal(odd, keys) and odd.flags.aligned
    with pytest.raises(RequestError, match="keys: 7 bytes is not a whole number of uint64"):
        view(memoryview(message)[:7], np.uint64, "keys")
    with pytest.raises(RequestError, match="keys: 3 values, expected 4"):
        view(memoryview(message)[8:], np.uint64, "keys", 4)


def test_padding_puts_every_array_at_an_aligned_offset_and_protobuf_reads_the_same_message():
    codec = Codec(pb.ShardStepRequest.DESCRIPTOR)
    rng = np.random.default_rng(2)
    for _ in range(200):
        values = random_request(rng)
        data = codec.encode(pad=15, **values)
        expect = pb.ShardStepRequest(**values)
        read = pb.ShardStepRequest.FromString(data)     # the padding kept as unknown fields
        assert read.ListFields() == expect.ListFields() and len(data) <= expect.ByteSize() + 3 * 9
        assert as_plain(codec.decode(data)) == values
        base = np.frombuffer(data, np.uint8).ctypes.data
        got = codec.decode(data)
        for name in BYTES:
            field = getattr(got, name)
            if len(field):
                assert (np.frombuffer(field, np.uint8).ctypes.data - base) % 8 == 0, name
    with pytest.raises(ValueError, match="got 9"):     # the message's own field
        codec.encode(pad=9, table="ids")
    with pytest.raises(ValueError, match="got 16"):    # a tag of more than one byte
        codec.encode(pad=16, table="ids")


def test_only_flat_messages_have_a_codec():
    from monolith_jax.rpc import serving_pb2

    with pytest.raises(TypeError, match="only singular scalars, strings and bytes"):
        Codec(serving_pb2.PushRequest.DESCRIPTOR)
    with pytest.raises(TypeError, match="no field 'nope'"):
        Codec(pb.ShardStepRequest.DESCRIPTOR).encode(nope=1)
