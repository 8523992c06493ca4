"""Training metrics as TensorBoard event files: the records of the metrics
JSONL become `<event>/<field>` scalars at the trainer's step, in files
TensorBoard reads (TFRecord framing with masked CRC-32C, Event protos)."""

import glob
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from monolith_jax.tensorboard import scalars
from tests.test_models_training import _small_batches, _small_trainer


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(folder) -> dict:
    """{tag: [(step, value)]} of every event file in `folder`, each record's
    framing and checksums verified as TensorBoard's reader does."""
    out: dict = {}
    files = glob.glob(f"{folder}/events.out.tfevents.*")
    assert files, f"no event file in {folder}"
    for path in files:
        data = open(path, "rb").read()
        at = 0
        while at < len(data):
            header = data[at:at + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[at + 8:at + 12])[0] == _masked(header)
            body = data[at + 12:at + 12 + n]
            assert struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == _masked(body)
            at += 16 + n
            event = event_pb2.Event.FromString(body)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_fit_writes_its_records_as_scalars_at_their_steps(tmp_path):
    batches, val = _small_batches(2000), _small_batches(1000, seed=1)
    tr = _small_trainer(log_every=2, out=lambda *a, **k: None, tensorboard_dir=str(tmp_path / "tb"),
                        metrics_path=str(tmp_path / "m.jsonl"))
    summary = tr.fit(batches, epochs=2, validation=val)
    tr.close()
    events = read_events(tmp_path / "tb")
    steps = [s for s, _ in events["train/loss"]]
    assert steps == sorted(steps) and steps[0] >= 1 and steps[-1] <= 16 and len(steps) >= 4
    assert all(np.isfinite(v) for _, v in events["train/loss"])
    aucs = [v for _, v in events["epoch/validation/auc"]]
    np.testing.assert_allclose(aucs, [e["validation"]["auc"] for e in summary["epochs"]], rtol=1e-6)
    assert [s for s, _ in events["epoch/validation/auc"]] == [8, 16]
    assert events["fit/examples"] == [(16, 4000.0)]


def test_only_numbers_become_scalars():
    record = {"event": "online", "step": 3, "time": 1.0, "examples": 5, "running_auc": float("nan"),
              "ok": True, "name": "x", "inf": float("inf"), "validation": {"auc": 0.7, "n": 2}}
    got = scalars(record)
    assert set(got) == {"examples", "running_auc", "validation/auc", "validation/n"}
    assert got["examples"] == 5.0 and np.isnan(got["running_auc"])
