"""What a predictor serves for a model with heads (`monolith_jax.heads`).

The export returns each head's raw output (`monolith_jax.serving.export`);
a binary head is served as its probability corrected for the head's own
negative rate,

    score = sigmoid(logit + log(rate))

(the joiner kept only that share of the head's negatives, so the model's
odds are too high by 1/rate; rate 1: not sampled, no change), and a value
head as it is: a value is never corrected. The rates start as the
export's (`spec["heads"]`) and follow the dense syncs: a sync's one
`negative_rate` (> 0) is every binary head's, its `head_negative_rates`
replace those of the heads they name; a sync whose rates do not fit the
heads (a name that is not a head, a rate outside (0, 1], a rate < 1 for a
value head) is refused as a whole, as params that do not fit are.

A `PredictReply` carries one `HeadScores` per head, in the export's
order; its `probabilities` and `logits` stay empty for a model with
heads (there is no one probability to give: a client reading only them
gets nothing rather than one head taken for the model's answer).
"""

from __future__ import annotations

import numpy as np

_F32 = np.dtype(np.float32)


def export_rates(spec_heads: list) -> dict:
    """{binary head: rate} as exported."""
    return {h["name"]: float(h["negative_rate"]) for h in spec_heads if h["kind"] == "binary"}


def synced_rates(spec_heads: list, negative_rate: float, head_rates: dict) -> dict:
    """{binary head: rate} a dense sync sets (see the module docstring);
    ValueError naming what does not fit the heads."""
    from monolith_jax.serving.export import check_rate, resolve_rates

    base = export_rates(spec_heads)
    if negative_rate > 0:
        rate = check_rate(float(negative_rate), "negative_rate")
        base = {name: rate for name in base}
    return resolve_rates([(h["name"], h["kind"]) for h in spec_heads], dict(head_rates), base,
                         "head_negative_rates")


def score(outputs: dict, spec_heads: list, rates: dict, b: int) -> dict:
    """The model's outputs (dict by head, padded batch) -> {head: (scores,
    outputs)} of the first `b` rows, float32."""
    out = {}
    for h in spec_heads:
        raw = np.asarray(outputs[h["name"]])[:b].astype(np.float32)
        if h["kind"] == "binary":
            s = (1.0 / (1.0 + np.exp(-(raw + np.log(rates[h["name"]]))))).astype(np.float32)
        else:
            s = raw
        out[h["name"]] = (s, raw)
    return out


def to_reply(reply, spec_heads: list, scored: dict, rates: dict) -> None:
    """Fills a PredictReply's `heads`."""
    for h in spec_heads:
        s, raw = scored[h["name"]]
        reply.heads.add(name=h["name"], kind=h["kind"], scores=s.tobytes(), outputs=raw.tobytes(),
                        negative_rate=rates.get(h["name"], 0.0))


def from_reply(reply, b: int) -> dict:
    """A PredictReply's heads -> {"scores", "outputs", "negative_rates"},
    each a dict by head name (arrays of `b` float32)."""
    out = {"scores": {}, "outputs": {}, "negative_rates": {}, "kinds": {}}
    for h in reply.heads:
        out["scores"][h.name] = np.frombuffer(h.scores, _F32)
        out["outputs"][h.name] = np.frombuffer(h.outputs, _F32)
        out["negative_rates"][h.name] = float(h.negative_rate)
        out["kinds"][h.name] = h.kind
        if out["scores"][h.name].shape != (b,) or out["outputs"][h.name].shape != (b,):
            raise ValueError(f"the predictor's reply for head {h.name!r} holds {out['scores'][h.name].size} "
                             f"scores for a batch of {b}")
    return out


def describe(spec_heads: list, rates: dict) -> str:
    """One line naming the heads served, for the log."""
    return ", ".join(f"{h['name']} ({h['kind']}" + (f", negative rate {rates[h['name']]:g})" if h["kind"] == "binary"
                                                  else ", served as it is)") for h in spec_heads)
