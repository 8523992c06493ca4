"""Heads: the objectives one model learns at once (multi-task training).

A job that learns one binary label needs none of this: its model returns
one logit per example and the trainer's loss is binary cross-entropy, as
before. A job with several objectives declares its heads:

    heads = (Head("click"),                                    # binary, BCE on a logit
             Head("like", weight=0.5),
             Head("watch_s", loss="squared", label="watch_time"),  # a value, squared error
             Head("convert", missing="mask"))                  # undefined where the file has no value

and its model returns a dict by head name, one (B,) (or (B, 1)) array per
head. The batch's labels are then float32 (B, H), one column per head in
the heads' order, with an optional `label_mask` (B, H): 0 where a label is
undefined (a conversion exists only for clicked requests, as in ESMM).

The total loss is sum over heads of weight * (sum over examples of
example weight * mask * the head's loss) / (sum of example weights), so
sparse rows get the summed gradient of every head (scaled back to each
example's own gradient under `sparse_loss="sum"`, as for one head), and a
masked head's term counts only the examples where it is defined.

loss: "binary" (sigmoid cross-entropy on a logit; scored as a probability,
evaluated by AUC, log loss and calibration), "squared" (squared error on a
value; scored as it is, evaluated by RMSE), or a function
`loss(output, label) -> per-example loss (B,)` of jax arrays, with `kind`
saying how it is scored and evaluated ("binary": the output is a logit;
"value": the output is the prediction).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

LOSSES = ("binary", "squared")
KINDS = ("binary", "value")
MISSING = ("refuse", "mask")


@dataclasses.dataclass(frozen=True)
class Head:
    """One objective; see the module docstring.

    name:       the model's output key, the metrics' name
    loss:       "binary", "squared", or loss(output, label) -> (B,)
    weight:     its share of the total loss (> 0)
    label:      the label column of training files (default: name)
    threshold:  file labels >= it are 1, others 0 (None: as they are)
    missing:    a missing (null/NaN) file label: "refuse" (an error naming
                the column) or "mask" (the head is undefined there)
    kind:       "binary" or "value"; default from the loss ("value" for a
                function)
    """

    name: str
    loss: str | Callable = "binary"
    weight: float = 1.0
    label: str | None = None
    threshold: float | None = None
    missing: str = "refuse"
    kind: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Head.name must be a non-empty string, got {self.name!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise ValueError(f"head {self.name!r}: loss must be one of {LOSSES} or a function "
                             f"loss(output, label) -> (B,), got {self.loss!r}")
        if not (isinstance(self.weight, (int, float)) and np.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"head {self.name!r}: weight must be a finite number > 0, got {self.weight!r}")
        if self.missing not in MISSING:
            raise ValueError(f"head {self.name!r}: missing must be one of {MISSING}, got {self.missing!r}")
        kind = self.kind if self.kind is not None else (
            "value" if callable(self.loss) or self.loss == "squared" else "binary")
        if kind not in KINDS:
            raise ValueError(f"head {self.name!r}: kind must be one of {KINDS}, got {kind!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "label", self.label if self.label is not None else self.name)

    @property
    def binary(self) -> bool:
        return self.kind == "binary"

    def per_example_loss(self, output, label):
        import jax.numpy as jnp
        import optax

        if self.loss == "binary":
            return optax.sigmoid_binary_cross_entropy(output, label)
        if self.loss == "squared":
            return jnp.square(output - label)
        return self.loss(output, label)


def check_heads(heads: Sequence[Head] | None) -> tuple[Head, ...] | None:
    """A job's heads, checked (None or empty: the single implicit binary head)."""
    if not heads:
        return None
    heads = tuple(heads)
    for h in heads:
        if not isinstance(h, Head):
            raise TypeError(f"heads must be Head objects, got {h!r}")
    names = [h.name for h in heads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"head names used twice: {dup}")
    return heads


def outputs_by_head(out, heads: tuple[Head, ...], rows, model_name: str) -> dict:
    """A model's output as {head name: (B,) array}: a dict with exactly the
    heads' names, or one array for a job of one head; refused otherwise,
    naming what is missing or extra (this runs when the step is traced)."""
    from monolith_jax.training import check_logits

    names = [h.name for h in heads]
    if not isinstance(out, dict):
        if len(heads) == 1:
            return {names[0]: check_logits(out, rows, model_name)}
        raise TypeError(f"{model_name} returned {type(out).__name__}; a job with heads {names} needs a dict "
                        f"of one (B,) array per head")
    missing, extra = [n for n in names if n not in out], sorted(set(out) - set(names))
    if missing or extra:
        raise ValueError(f"{model_name} returned outputs {sorted(out)}; the job's heads are {names}"
                         + (f" (missing {missing})" if missing else "") + (f" (not heads: {extra})" if extra else ""))
    return {n: check_logits(out[n], rows, f"{model_name} (head {n!r})") for n in names}


def label_columns(labels, heads: tuple[Head, ...]):
    """The batch's labels as (B, H), checked against the heads (traced)."""
    shape = tuple(labels.shape)
    if len(heads) == 1 and len(shape) == 1:
        return labels[:, None]
    if len(shape) != 2 or shape[1] != len(heads):
        raise ValueError(f"the batch's labels have shape {shape}; the job's {len(heads)} heads "
                         f"{[h.name for h in heads]} need (B, {len(heads)}), one column per head")
    return labels


def total_loss(outputs: dict, batch, heads: tuple[Head, ...], n):
    """The weighted sum of the heads' losses (see the module docstring)."""
    import jax.numpy as jnp

    labels = label_columns(batch.labels, heads)
    mask = batch.label_mask
    total = 0.0
    for k, h in enumerate(heads):
        w = batch.weights if mask is None else batch.weights * mask[:, k]
        total = total + h.weight * jnp.sum(w * h.per_example_loss(outputs[h.name], labels[:, k])) / n
    return total


def scores(outputs: dict, heads: tuple[Head, ...]) -> dict:
    """What a head serves: a probability for a binary head, the value for a value head."""
    import jax

    return {h.name: jax.nn.sigmoid(outputs[h.name]) if h.binary else outputs[h.name] for h in heads}


def evaluate(heads: tuple[Head, ...], labels: np.ndarray, preds: dict, weights: np.ndarray,
             mask: np.ndarray | None) -> dict:
    """Per-head metrics over the rows with weight > 0 where the head is
    defined: AUC, log loss, calibration (binary), RMSE (value)."""
    from monolith_jax.metrics import auc, log_loss
    from monolith_jax.training import calibration

    labels = labels[:, None] if labels.ndim == 1 else labels
    out = {}
    for k, h in enumerate(heads):
        real = weights > 0
        if mask is not None:
            real &= mask[:, k] > 0
        y, p = labels[real, k], np.asarray(preds[h.name])[real]
        if h.binary:
            out[h.name] = {"examples": int(real.sum()), "auc": auc(y, p),
                           "logloss": log_loss(y, p) if y.size else float("nan"),
                           "calibration": calibration(y, p) if y.size else float("nan")}
        else:
            out[h.name] = {"examples": int(real.sum()),
                           "rmse": float(np.sqrt(np.mean(np.square(p - y)))) if y.size else float("nan")}
    return out


def describe(metrics: dict) -> str:
    """One line of per-head metrics, for the progress display."""
    parts = []
    for name, m in metrics.items():
        if "auc" in m:
            parts.append(f"{name}: auc {m['auc']:.4f} logloss {m['logloss']:.4f}")
        else:
            parts.append(f"{name}: rmse {m['rmse']:.4f}")
    return "  ".join(parts)
