"""Label rules: how the joiner turns the actions after a request into labels.

A job with one objective has one `LabelRule` (a binary label: did an action
of a positive type follow the request). A job with several heads has one
rule per head, by name, and the joiner writes each example's labels as
named `Label`s (messages.py, version 2):

    labels = {
        "click": LabelRule(positive=("click",), window_s=30),
        "buy":   LabelRule(positive=("buy",), given="click", window_s=30),   # ESMM's conversion
        "watch": LabelRule(value_of="watch", default=0.0, window_s=600),     # seconds watched
    }

Per label, counting only the actions within its own `window_s` of the
request's features:

- binary (`positive`, `min_value`): 1 if an action of one of its types with
  value >= `min_value` came, else 0. A 0 is kept with probability
  `negative_rate`, decided by a stable hash of (seed, request id, label
  name); a kept 0 carries that rate as its sample_rate (1s carry 1), a
  sampled-out 0 makes the label undefined;
- value (`value_of`): the value of the earliest action of that type (in
  event time); with none, `default` if given, else undefined;
- `given` (another binary label's name): the label is defined only where
  that label is 1, undefined elsewhere (a conversion needs a click).

An example whose labels are all undefined is dropped (counted as a negative
sampled out).

On the command line (`monolith join --label ...`, repeated, one per label):

    NAME:positive=TYPE[+TYPE...][,min=V][,window=S][,rate=R][,given=LABEL]
    NAME:value=TYPE[,default=V][,window=S][,given=LABEL]

window defaults to 300 s, rate to 1, min to none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """How the joiner labels a request from the actions that follow it.

    positive:       action types that make a binary label 1 (any one of
                    them); default ("click",) unless `value_of` is given
    min_value:      least action value for a positive (e.g. a rating of 4)
    window_s:       event-time seconds after the request that its actions count
    negative_rate:  share of 0s kept (the rest are sampled out; serving
                    corrects the logit by log(rate))
    value_of:       an action type: the label is that action's value
                    (the earliest in the window) instead of 0/1
    default:        a value label's value without such an action (None:
                    the label is undefined there)
    given:          the name of another binary label: this one is defined
                    only where that one is 1 (multi-label jobs)
    """

    positive: tuple | None = None
    min_value: float = -math.inf
    window_s: float = 300.0
    negative_rate: float = 1.0
    value_of: str | None = None
    default: float | None = None
    given: str | None = None

    def __post_init__(self):
        if self.value_of is not None:
            if not isinstance(self.value_of, str) or not self.value_of:
                raise ValueError(f"LabelRule.value_of must name an action type, got {self.value_of!r}")
            if self.positive:
                raise ValueError(f"LabelRule: give positive (a binary label) or value_of (a value label), "
                                 f"not both (got positive={self.positive!r}, value_of={self.value_of!r})")
            if self.negative_rate != 1.0:
                raise ValueError(f"LabelRule(value_of={self.value_of!r}): negative_rate applies to binary "
                                 f"labels only, got {self.negative_rate}")
            if self.min_value != -math.inf:
                raise ValueError(f"LabelRule(value_of={self.value_of!r}): min_value applies to binary labels only")
            if self.default is not None and not math.isfinite(self.default):
                raise ValueError(f"LabelRule.default must be finite, got {self.default}")
            object.__setattr__(self, "positive", ())
        else:
            if self.default is not None:
                raise ValueError("LabelRule.default applies to value labels (value_of=...) only")
            positive = ("click",) if self.positive is None else self.positive
            if isinstance(positive, str):
                positive = (positive,)
            object.__setattr__(self, "positive", tuple(positive))
            if not self.positive or not all(isinstance(t, str) and t for t in self.positive):
                raise ValueError(f"LabelRule.positive must name at least one action type, got {self.positive!r}")
        if not 0.0 < self.negative_rate <= 1.0:
            raise ValueError(f"LabelRule.negative_rate must be in (0, 1], got {self.negative_rate}")
        if not self.window_s > 0:
            raise ValueError(f"LabelRule.window_s must be > 0, got {self.window_s}")
        if self.given is not None and (not isinstance(self.given, str) or not self.given):
            raise ValueError(f"LabelRule.given must name another label, got {self.given!r}")

    @property
    def binary(self) -> bool:
        return self.value_of is None

    @property
    def action_types(self) -> tuple:
        """The action types this rule reads."""
        return self.positive if self.binary else (self.value_of,)


def check_rules(rules: Mapping[str, LabelRule], what: str = "labels") -> dict:
    """The rules by name, checked: names are non-empty strings, each rule a
    LabelRule, and each `given` names another binary label, without cycles."""
    if not isinstance(rules, Mapping) or not rules:
        raise ValueError(f"{what}: give at least one label rule by name")
    rules = dict(rules)
    for name, rule in rules.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: label names must be non-empty strings, got {name!r}")
        if not isinstance(rule, LabelRule):
            raise TypeError(f"{what}: label {name!r} must be a LabelRule, got {type(rule).__name__}")
    for name, rule in rules.items():
        if rule.given is None:
            continue
        if rule.given == name:
            raise ValueError(f"{what}: label {name!r} is given itself")
        if rule.given not in rules:
            raise ValueError(f"{what}: label {name!r} is given {rule.given!r}, which is not among the labels "
                             f"{sorted(rules)}")
        if not rules[rule.given].binary:
            raise ValueError(f"{what}: label {name!r} is given {rule.given!r}, a value label; given must name a "
                             "binary label")
    for name in rules:  # no cycles: each chain of givens ends
        seen, at = [name], rules[name].given
        while at is not None:
            if at in seen:
                raise ValueError(f"{what}: labels given each other in a cycle: {' -> '.join(seen + [at])}")
            seen.append(at)
            at = rules[at].given
    return rules


def parse_label_arg(text: str) -> tuple:
    """`NAME:positive=click+like,window=60,rate=0.5` (see the module
    docstring) -> (name, LabelRule); ValueError naming what is wrong."""
    name, sep, body = str(text).partition(":")
    name = name.strip()
    if not sep or not name or not body.strip():
        raise ValueError(f"--label {text!r}: expected NAME:positive=TYPE[,...] or NAME:value=TYPE[,...]")
    kw: dict = {}
    keys = {"positive": "positive", "value": "value_of", "min": "min_value", "window": "window_s",
            "rate": "negative_rate", "default": "default", "given": "given"}
    for part in body.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in keys or not value:
            raise ValueError(f"--label {text!r}: {part!r} is not one of "
                             f"{', '.join(k + '=...' for k in keys)}")
        if keys[key] in kw:
            raise ValueError(f"--label {text!r}: {key} given twice")
        if key == "positive":
            kw["positive"] = tuple(t.strip() for t in value.split("+"))
        elif key in ("value", "given"):
            kw[keys[key]] = value
        else:
            try:
                kw[keys[key]] = float(value)
            except ValueError:
                raise ValueError(f"--label {text!r}: {key}={value!r} is not a number") from None
    if "positive" not in kw and "value_of" not in kw:
        raise ValueError(f"--label {text!r}: say what makes the label: positive=TYPE or value=TYPE")
    try:
        return name, LabelRule(**kw)
    except ValueError as err:
        raise ValueError(f"--label {text!r}: {err}") from None


def rules_from_args(texts: Sequence[str]) -> dict:
    rules: dict = {}
    for text in texts:
        name, rule = parse_label_arg(text)
        if name in rules:
            raise ValueError(f"--label: label {name!r} defined twice")
        rules[name] = rule
    return check_rules(rules, "--label")


class Labeller:
    """The per-label rules of a multi-label join, on a request's label
    state: a list, per label, of None (nothing yet), the time of its first
    positive action (binary), or (time, value) of its earliest action (value)."""

    def __init__(self, labels: Sequence, seed: int = 0):
        rules = check_rules(dict(labels), "JoinConfig.labels")
        self.names = tuple(rules)
        self.rules = tuple(rules.values())
        self.windows = tuple(int(round(r.window_s * 1000)) for r in self.rules)
        self.window = max(self.windows)
        self.by_type: dict = {}
        for i, r in enumerate(self.rules):
            for t in r.action_types:
                self.by_type.setdefault(t, []).append(i)
        index = {n: i for i, n in enumerate(self.names)}
        self.given = tuple(None if r.given is None else index[r.given] for r in self.rules)
        order: list = []
        while len(order) < len(self.rules):  # givens before the labels given them
            for i, g in enumerate(self.given):
                if i not in order and (g is None or g in order):
                    order.append(i)
        self.order = tuple(order)
        self.early = all(r.binary for r in self.rules)  # value labels wait for the window's end
        self.thresholds = tuple(int(r.negative_rate * 2**32) for r in self.rules)
        self._seed = str(seed).encode() + b"\0"
        self.counters = tuple(f"{n}:{c}" for n, r in zip(self.names, self.rules)
                              for c in (("positives", "negatives", "sampled_out") if r.binary
                                        else ("values", "defaults")) + ("undefined",))

    def new(self) -> list:
        return [None] * len(self.rules)

    def take(self, state: list, tf: int, ta: int, kind: str, value: float) -> str:
        """An action of the request into its state: "used" (it set a
        label), "repeat" (the labels it makes were set already), "late"
        (after every window it counts in) or "other" (no label reads it)."""
        seen = set()
        for i in self.by_type.get(kind, ()):
            rule = self.rules[i]
            if rule.binary and not value >= rule.min_value:
                continue
            if ta - tf > self.windows[i]:
                seen.add("late")
                continue
            old = state[i]
            seen.add("used" if old is None else "repeat")
            if rule.binary:
                if old is None or ta < old:
                    state[i] = ta
            elif old is None or ta < old[0]:
                state[i] = (ta, float(value))
        for outcome in ("used", "repeat", "late"):
            if outcome in seen:
                return outcome
        return "other"

    def complete(self, state: list) -> bool:
        """Whether every label is decided before the window's end: each is
        a binary label that is 1."""
        return self.early and all(s is not None for s in state)

    def closed_outcome(self, positive: frozenset, kind: str, value: float) -> str:
        """An action for a request already emitted: "repeat" if a label it
        makes was set, "late" if one it makes was not, else "other"."""
        outcome = "other"
        for i in self.by_type.get(kind, ()):
            rule = self.rules[i]
            if rule.binary and not value >= rule.min_value:
                continue
            if i in positive:
                return "repeat"
            outcome = "late"
        return outcome

    def finish(self, rid: str, state: list, counts: dict) -> tuple:
        """The labels (name, value, sample_rate, undefined) of a decided
        request, in the rules' order, and whether any binary one is 1."""
        out = [None] * len(self.rules)
        ones = [False] * len(self.rules)
        for i in self.order:
            name, rule, s = self.names[i], self.rules[i], state[i]
            g = self.given[i]
            if g is not None and not ones[g]:
                out[i] = (name, 0.0, 1.0, True)
                counts[f"{name}:undefined"] += 1
            elif rule.binary:
                if s is not None:
                    out[i] = (name, 1.0, 1.0, False)
                    ones[i] = True
                    counts[f"{name}:positives"] += 1
                elif self.thresholds[i] >= 2**32 or self._keep(rid, name) < self.thresholds[i]:
                    out[i] = (name, 0.0, rule.negative_rate, False)
                    counts[f"{name}:negatives"] += 1
                else:
                    out[i] = (name, 0.0, 1.0, True)
                    counts[f"{name}:sampled_out"] += 1
                    counts[f"{name}:undefined"] += 1
            elif s is not None:
                out[i] = (name, s[1], 1.0, False)
                counts[f"{name}:values"] += 1
            elif rule.default is not None:
                out[i] = (name, float(rule.default), 1.0, False)
                counts[f"{name}:defaults"] += 1
            else:
                out[i] = (name, 0.0, 1.0, True)
                counts[f"{name}:undefined"] += 1
        return out, any(ones)

    def positives(self, state: list) -> frozenset:
        return frozenset(i for i, (r, s) in enumerate(zip(self.rules, state)) if r.binary and s is not None)

    def _keep(self, rid: str, name: str) -> int:
        return zlib.crc32(rid.encode() + b"\0" + name.encode(), zlib.crc32(self._seed))

    @staticmethod
    def dumps(state: list) -> str:
        return json.dumps(state)

    @staticmethod
    def loads(text) -> list:
        return [tuple(s) if isinstance(s, list) else s for s in json.loads(text)]
