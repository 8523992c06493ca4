"""Flat protobuf messages (scalars, strings and bytes fields; nothing
nested or repeated) read and written without protobuf objects, for the
data plane's large arrays.

    codec = Codec(pb.ShardStepRequest.DESCRIPTOR)
    data = codec.encode(table="ids", keys=keys_array)      # bytes: the message's wire form
    req = codec.decode(data)        # req.keys: a memoryview into `data`, no copy
    keys = view(req.keys, np.uint64, "keys")               # numpy over those bytes

Decoding a protobuf bytes field copies it into a new Python object, and
setting one copies again; the arrays of a training step are megabytes. The
bytes `encode` writes are exactly what any protobuf library writes for the
same values (fields in number order, defaults left out; with `pad`, unknown
padding fields that put each array at an aligned offset), and `decode`
reads any valid encoding of the message (any field order, unknown fields
skipped, the last of a repeated scalar wins); what it cannot read raises
ValueError naming the field, which the servers answer INVALID_ARGUMENT.
"""

from __future__ import annotations

import types

import numpy as np
from google.protobuf.descriptor import FieldDescriptor as F

_VARINT = {F.TYPE_BOOL: "bool", F.TYPE_INT32: "int32", F.TYPE_INT64: "int64", F.TYPE_UINT32: "uint32",
           F.TYPE_UINT64: "uint64"}
_LENGTH = {F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes"}
_M64 = (1 << 64) - 1


def _varint_bytes(v: int) -> bytes:
    v &= _M64
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _read_varint(mv, pos: int, end: int, what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"{what}: truncated or overlong varint")
        b = mv[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _M64, pos
        shift += 7


def view(data, dtype, what: str, count: int | None = None) -> np.ndarray:
    """A decoded bytes field as a 1-d read-only numpy array of `dtype`
    (copied only when the bytes do not sit at an address the dtype may be
    read from); RequestError when its length does not fit."""
    from monolith_jax.rpc.wire import array

    a = array(data, np.dtype(dtype), what, count)
    return a if a.flags.aligned else a.copy()


class Codec:
    """Encoder and decoder of one flat message type (its descriptor)."""

    def __init__(self, descriptor):
        self.name = descriptor.full_name
        self._by_number, self._order, self.defaults = {}, [], {}
        for f in descriptor.fields:
            kind = _VARINT.get(f.type) or _LENGTH.get(f.type)
            if kind is None or f.is_repeated:
                raise TypeError(f"{self.name}.{f.name}: only singular scalars, strings and bytes are flat")
            self._by_number[f.number] = (f.name, kind)
            self._order.append((f.number, f.name, kind))
            self.defaults[f.name] = {"bool": False, "string": "", "bytes": b""}.get(kind, 0)
        self._order.sort()

    def decode(self, data) -> types.SimpleNamespace:
        """The message's fields by name; bytes fields are memoryviews of `data`."""
        mv = memoryview(data).cast("B")
        out = dict(self.defaults)
        pos, end = 0, len(mv)
        while pos < end:
            tag, pos = _read_varint(mv, pos, end, f"{self.name}: a field tag")
            number, wire_type = tag >> 3, tag & 7
            field = self._by_number.get(number)
            what = f"{self.name}.{field[0] if field else f'field {number}'}"
            if number == 0:
                raise ValueError(f"{self.name}: field number 0")
            if wire_type == 0:
                value, pos = _read_varint(mv, pos, end, what)
            elif wire_type == 2:
                n, pos = _read_varint(mv, pos, end, what + " length")
                if n > end - pos:
                    raise ValueError(f"{what}: {n} bytes announced, {end - pos} left")
                value, pos = mv[pos:pos + n], pos + n
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                if pos > end:
                    raise ValueError(f"{what}: truncated fixed-width value")
                value = None
            else:
                raise ValueError(f"{what}: wire type {wire_type} is not a field of a flat message")
            if field is None:
                continue   # an unknown field, as protobuf skips it
            name, kind = field
            if (wire_type == 2) != (kind in ("string", "bytes")):
                raise ValueError(f"{what}: wire type {wire_type} does not fit a {kind} field")
            if kind == "bytes":
                out[name] = value
            elif kind == "string":
                try:
                    out[name] = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{what}: not valid UTF-8") from None
            elif kind == "bool":
                out[name] = value != 0
            elif kind in ("uint32", "int32"):
                value &= 0xFFFFFFFF
                out[name] = value - (1 << 32) if kind == "int32" and value >= 1 << 31 else value
            else:
                out[name] = value - (1 << 64) if kind == "int64" and value >= 1 << 63 else value
        return types.SimpleNamespace(**out)

    def encode(self, *, pad: int | None = None, **values) -> bytes:
        """The wire form of a message with these field values (bytes fields
        take any C-contiguous buffer: bytes, memoryview, numpy array).

        pad: a field number (1-15) the message does not have. Each bytes
        field whose data would start at an offset that is not a multiple of
        8 then follows an unknown field of that number, sized to make it one
        (every reader skips unknown fields), so that a reader views its
        arrays where they lie instead of copying them to an aligned place."""
        unknown = set(values) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name} has no field {sorted(unknown)[0]!r}")
        if pad is not None and not (1 <= pad <= 15 and pad not in self._by_number):
            raise ValueError(f"{self.name}: padding needs a field number in [1, 15] the message does not have, "
                             f"got {pad}")
        parts, at = [], 0
        for number, name, kind in self._order:
            v = values.get(name)
            if v is None:
                continue
            if kind == "string":
                data = v.encode("utf-8")
                n = len(data)
            elif kind == "bytes":
                data = memoryview(v)
                n = data.nbytes
                if n and (data.ndim != 1 or data.itemsize != 1):
                    data = data.cast("B")
            else:
                if v:
                    parts.append(_varint_bytes(number << 3) + _varint_bytes(int(v)))
                    at += len(parts[-1])
                continue
            if n:
                head = _varint_bytes(number << 3 | 2) + _varint_bytes(n)
                if pad is not None and kind == "bytes" and (at + len(head)) % 8:
                    fill = (-(at + len(head)) - 2) % 8     # the padding field: tag, length, fill bytes
                    parts.append(bytes([pad << 3 | 2, fill]) + bytes(fill))
                    at += 2 + fill
                parts += [head, data]
                at += len(head) + n
        return b"".join(parts)
