"""The arrays of a snapshot: nested dicts of numpy arrays packed for Orbax
(which refuses zero-size arrays) with a spec of every array's dtype, shape
and CRC-32, and unpacked from a restored item against that spec."""

from __future__ import annotations

import os
import zlib

import numpy as np


class CorruptSnapshot(RuntimeError):
    """A snapshot proven damaged: a checksum, dtype or shape that does not
    match, or a missing part of a finished snapshot."""


def _crc(a: np.ndarray) -> int:
    a = np.ascontiguousarray(a)
    return zlib.crc32(memoryview(a.reshape(-1).view(np.uint8))) if a.size else 0


def _crcs(arrays: list) -> list:
    """CRC-32 of each array, the large ones on threads of their own
    (zlib.crc32 releases the GIL)."""
    big = [i for i, a in enumerate(arrays) if a.nbytes >= 1 << 22]
    out = [None if i in big else _crc(a) for i, a in enumerate(arrays)]
    if len(big) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(big), os.cpu_count() or 1)) as pool:
            for i, c in zip(big, pool.map(_crc, [arrays[i] for i in big])):
                out[i] = c
    else:
        for i in big:
            out[i] = _crc(arrays[i])
    return out


def pack(arrays: dict, prefix: str = "") -> tuple[dict, dict]:
    """Nested dict of arrays -> (the non-empty ones, for Orbax, which refuses
    zero-size arrays; spec: path -> dtype, shape, crc32 of every array)."""
    kept, spec = _pack(arrays, prefix)
    paths = list(spec)
    for path, c in zip(paths, _crcs([spec[p].pop("_array") for p in paths])):
        spec[path]["crc32"] = c
    return kept, spec


def _pack(arrays: dict, prefix: str) -> tuple[dict, dict]:
    kept, spec = {}, {}
    for name, a in arrays.items():
        path = f"{prefix}{name}"
        if isinstance(a, dict):
            sub, sub_spec = _pack(a, path + "/")
            if sub:
                kept[name] = sub
            spec.update(sub_spec)
            continue
        a = np.asarray(a)
        spec[path] = {"dtype": a.dtype.name, "shape": list(a.shape), "_array": a}
        if a.size:
            kept[name] = a
    return kept, spec


def unpack(restored: dict, spec: dict, prefix: str) -> dict:
    """The arrays under `prefix` from a restored item, empty ones rebuilt,
    every one checked against the spec (checksums on parallel threads)."""
    out: dict = {}
    found = []
    for path, s in spec.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        node = restored
        for p in parts:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if node is None:
            if int(np.prod(s["shape"])) != 0:
                raise CorruptSnapshot(f"array {path} is missing")
            a = np.zeros(s["shape"], np.dtype(s["dtype"]) if s["dtype"] != "bfloat16" else np.float32)
        else:
            a = np.asarray(node)
        if a.dtype.name != s["dtype"] or list(a.shape) != s["shape"]:
            raise CorruptSnapshot(f"array {path} is {a.dtype.name}{list(a.shape)}, expected {s['dtype']}{s['shape']}")
        found.append((path, a))
        target = out
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = a
    for (path, a), c in zip(found, _crcs([a for _, a in found])):
        if c != spec[path]["crc32"]:
            raise CorruptSnapshot(f"array {path} fails its CRC-32 check")
    return out
