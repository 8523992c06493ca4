"""Training metrics as TensorBoard event files (through tensorboardX, no
TensorFlow): `Trainer(tensorboard_dir=...)`, `monolith train --tensorboard DIR`.

Every record the trainer logs (the same ones as its metrics JSONL: `train`
every log interval, `epoch`, `validation`, `fit`, and `online` from the
online trainer's progress) becomes scalars tagged `<event>/<field>`
(`train/loss`, `online/running_auc`, `validation/auc`, ...) at the
trainer's step. Then `tensorboard --logdir DIR` shows them.
"""

from __future__ import annotations

import math
import numbers


def scalars(record: dict, prefix: str = "") -> dict:
    """{tag: float} of a record's numeric fields (nested dicts become
    `a/b`); `event`, `step`, `time` and non-numbers are left out."""
    out = {}
    for key, value in record.items():
        if key in ("event", "step", "time"):
            continue
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, tag + "/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isinf(value):
                out[tag] = value
    return out


class EventWriter:
    """Writes trainer records as TensorBoard scalars into `directory`."""

    def __init__(self, directory: str, flush_secs: float = 5.0):
        from tensorboardX import SummaryWriter

        self.directory = directory
        self._writer = SummaryWriter(logdir=directory, flush_secs=flush_secs)

    def write(self, record: dict, step: int) -> None:
        event = record.get("event", "train")
        for tag, value in scalars(record).items():
            self._writer.add_scalar(f"{event}/{tag}", value, global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
