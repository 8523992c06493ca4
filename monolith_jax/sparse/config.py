"""Table configuration: initializers, fused optimizers and `TableConfig`.

Each optimizer is a frozen dataclass whose update rule has one C++ kernel
(`ffi/src/optimizers.h`) and one formula, written in its docstring. Rows are
updated once per unique id per batch, with the gradients of duplicate ids
summed first. The formulas match optax's (in float32) where optax has the
rule; `t` is the row's own update count (1 on its first update).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Union

# ---------------------------------------------------------------- initializers


@dataclasses.dataclass(frozen=True)
class Zeros:
    """New rows start at 0."""

    _kind: ClassVar[int] = 0

    def native(self) -> tuple[int, float, float]:
        return (self._kind, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Constant:
    """New rows start at `value`."""

    value: float = 0.0
    _kind: ClassVar[int] = 1

    def native(self) -> tuple[int, float, float]:
        return (self._kind, float(self.value), 0.0)


@dataclasses.dataclass(frozen=True)
class Uniform:
    """New rows drawn from U[low, high)."""

    low: float = -0.05
    high: float = 0.05
    _kind: ClassVar[int] = 2

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got low={self.low}, high={self.high}")

    def native(self) -> tuple[int, float, float]:
        return (self._kind, float(self.low), float(self.high))


@dataclasses.dataclass(frozen=True)
class Normal:
    """New rows drawn from N(mean, stddev^2)."""

    mean: float = 0.0
    stddev: float = 0.01
    _kind: ClassVar[int] = 3

    def __post_init__(self):
        if not self.stddev >= 0:
            raise ValueError(f"stddev must be >= 0, got {self.stddev}")

    def native(self) -> tuple[int, float, float]:
        return (self._kind, float(self.mean), float(self.stddev))


@dataclasses.dataclass(frozen=True)
class TruncatedNormal:
    """N(mean, stddev^2) redrawn until within 2 stddev of the mean (as TF)."""

    mean: float = 0.0
    stddev: float = 0.01
    _kind: ClassVar[int] = 4

    def __post_init__(self):
        if not self.stddev >= 0:
            raise ValueError(f"stddev must be >= 0, got {self.stddev}")

    def native(self) -> tuple[int, float, float]:
        return (self._kind, float(self.mean), float(self.stddev))


Initializer = Union[Zeros, Constant, Uniform, Normal, TruncatedNormal]

# ------------------------------------------------------------------ optimizers


def _check_positive(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: {key} must be a positive finite number, got {v!r}")


def _check_unit(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise ValueError(f"{name}: {key} must be in [0, 1), got {v!r}")


@dataclasses.dataclass(frozen=True)
class SGD:
    """w -= lr * g  (optax.sgd)."""

    learning_rate: float = 0.01
    _kind: ClassVar[int] = 0

    def __post_init__(self):
        _check_positive("SGD", learning_rate=self.learning_rate)

    def hparams(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Momentum:
    """trace = g + momentum * trace;
    w -= lr * (g + momentum * trace if nesterov else trace)  (optax.sgd(momentum=...))."""

    learning_rate: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    _kind: ClassVar[int] = 1

    def __post_init__(self):
        _check_positive("Momentum", learning_rate=self.learning_rate)
        _check_unit("Momentum", momentum=self.momentum)

    def hparams(self) -> dict:
        return {"momentum": self.momentum, "nesterov": bool(self.nesterov)}


@dataclasses.dataclass(frozen=True)
class Adagrad:
    """acc += g^2; w -= lr * g / sqrt(acc + eps)  (optax.adagrad)."""

    learning_rate: float = 0.05
    initial_accumulator_value: float = 0.1
    eps: float = 1e-7
    _kind: ClassVar[int] = 2

    def __post_init__(self):
        _check_positive("Adagrad", learning_rate=self.learning_rate)
        if self.initial_accumulator_value < 0 or self.eps < 0:
            raise ValueError("Adagrad: initial_accumulator_value and eps must be >= 0")

    def hparams(self) -> dict:
        return {"initial_accumulator": self.initial_accumulator_value, "eps": self.eps}


@dataclasses.dataclass(frozen=True)
class RowwiseAdagrad:
    """acc += mean(g^2) (one float per row); w -= lr * g / (sqrt(acc) + eps)
    (FBGEMM's row-wise Adagrad: 1/dim of Adagrad's slot memory)."""

    learning_rate: float = 0.05
    initial_accumulator_value: float = 0.0
    eps: float = 1e-8
    _kind: ClassVar[int] = 3

    def __post_init__(self):
        _check_positive("RowwiseAdagrad", learning_rate=self.learning_rate)
        if self.initial_accumulator_value < 0 or self.eps < 0:
            raise ValueError("RowwiseAdagrad: initial_accumulator_value and eps must be >= 0")

    def hparams(self) -> dict:
        return {"initial_accumulator": self.initial_accumulator_value, "eps": self.eps}


@dataclasses.dataclass(frozen=True)
class Adam:
    """mu = b1 mu + (1-b1) g; nu = b2 nu + (1-b2) g^2;
    w -= lr * (mu / (1-b1^t)) / (sqrt(nu / (1-b2^t) + eps_root) + eps)  (optax.adam).
    t is the row's own update count (a row's moments start at its first update)."""

    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    eps_root: float = 0.0
    _kind: ClassVar[int] = 4

    def __post_init__(self):
        _check_positive(type(self).__name__, learning_rate=self.learning_rate)
        _check_unit(type(self).__name__, b1=self.b1, b2=self.b2)

    def hparams(self) -> dict:
        return {"b1": self.b1, "b2": self.b2, "one_minus_b1": 1.0 - self.b1,
                "one_minus_b2": 1.0 - self.b2, "eps": self.eps, "eps_root": self.eps_root}


@dataclasses.dataclass(frozen=True)
class AMSGrad(Adam):
    """As Adam, with nu_max = max(nu_max, nu / (1-b2^t)) in the denominator
    (optax.amsgrad)."""

    _kind: ClassVar[int] = 5


@dataclasses.dataclass(frozen=True)
class RMSProp:
    """nu = decay nu + (1-decay) g^2; w -= lr * g / sqrt(nu + eps)  (optax.rmsprop),
    nu starting at initial_scale."""

    learning_rate: float = 1e-3
    decay: float = 0.9
    eps: float = 1e-8
    initial_scale: float = 0.0
    _kind: ClassVar[int] = 6

    def __post_init__(self):
        _check_positive("RMSProp", learning_rate=self.learning_rate)
        _check_unit("RMSProp", decay=self.decay)

    def hparams(self) -> dict:
        return {"decay": self.decay, "one_minus_decay": 1.0 - self.decay, "eps": self.eps,
                "initial_accumulator": self.initial_scale}


@dataclasses.dataclass(frozen=True)
class FTRL:
    """FTRL-Proximal as TensorFlow's (lr = alpha, p = learning_rate_power):
    n' = n + g^2; sigma = (n'^-p - n^-p) / lr; z += g - sigma w; n = n';
    w = 0 if |z| <= l1 else (sign(z) l1 - z) / ((beta + n^-p) / lr + 2 l2)."""

    learning_rate: float = 0.05
    learning_rate_power: float = -0.5
    initial_accumulator_value: float = 0.1
    l1: float = 0.0
    l2: float = 0.0
    beta: float = 0.0
    _kind: ClassVar[int] = 7

    def __post_init__(self):
        _check_positive("FTRL", learning_rate=self.learning_rate)
        if self.learning_rate_power > 0:
            raise ValueError("FTRL: learning_rate_power must be <= 0")
        if self.initial_accumulator_value <= 0 and self.learning_rate_power != 0:
            raise ValueError("FTRL: initial_accumulator_value must be > 0")
        if self.l1 < 0 or self.l2 < 0 or self.beta < 0:
            raise ValueError("FTRL: l1, l2 and beta must be >= 0")

    def hparams(self) -> dict:
        return {
            "lr_power": self.learning_rate_power,
            "initial_accumulator": self.initial_accumulator_value,
            "l1": self.l1,
            "l2": self.l2,
            "beta": self.beta,
        }


Optimizer = Union[SGD, Momentum, Adagrad, RowwiseAdagrad, Adam, AMSGrad, RMSProp, FTRL]
OPTIMIZERS = (SGD, Momentum, Adagrad, RowwiseAdagrad, Adam, AMSGrad, RMSProp, FTRL)
INITIALIZERS = (Zeros, Constant, Uniform, Normal, TruncatedNormal)

# --------------------------------------------------------- memory control


@dataclasses.dataclass(frozen=True)
class FrequencyFilter:
    """Admit an id once it has been seen `occurrence_threshold` times (the
    paper's feature filter). Sightings of ids without a row are counted in a
    count-min sketch of `counters` one-byte saturating counters (4 per id,
    conservative update), split over the table's 16 shards: its memory is
    fixed, whatever the number of distinct ids.

    The sketch never undercounts, so an id seen k times is always admitted at
    its k-th sighting. It can overcount: an id seen fewer times is admitted
    early when its 4 counters were all raised by others. With S sightings of
    unadmitted ids over W counters, a counter's excess averages at most
    4S/W, so an id's chance of early admission is at most about
    (4S / (W (k-1)))^4 (Markov's bound on each of its four counters);
    conservative update keeps it well below that. Measured: 200,000 ids seen
    once each with the default 2^22 counters and k = 2 admitted under 0.2% of
    them; with 2^20 counters, 2%. Size `counters` to 10x or more the
    sightings you expect between admissions. Counters saturate at 255 and
    are not decayed: over a long stream the filter admits more.
    """

    occurrence_threshold: int
    counters: int = 1 << 22

    def __post_init__(self):
        if not isinstance(self.occurrence_threshold, int) or not 2 <= self.occurrence_threshold <= 255:
            raise ValueError(f"occurrence_threshold must be an int in [2, 255], got {self.occurrence_threshold!r}")
        if not isinstance(self.counters, int) or self.counters < 1024:
            raise ValueError(f"FrequencyFilter.counters must be an int >= 1024, got {self.counters!r}")

    def native(self) -> dict:
        return {"occurrence_threshold": self.occurrence_threshold, "filter_counters": self.counters}


@dataclasses.dataclass(frozen=True)
class ProbabilisticFilter:
    """Admit an id at each sighting with `probability` (the paper's
    probabilistic filter): a seeded draw per (id, sighting number), so a
    replay of the same stream admits the same ids at the same sightings.
    Sightings are numbered by the same count-min sketch as FrequencyFilter."""

    probability: float
    counters: int = 1 << 22

    def __post_init__(self):
        if not isinstance(self.probability, (int, float)) or not 0 < self.probability < 1:
            raise ValueError(f"ProbabilisticFilter.probability must be in (0, 1), got {self.probability!r}")
        if not isinstance(self.counters, int) or self.counters < 1024:
            raise ValueError(f"ProbabilisticFilter.counters must be an int >= 1024, got {self.counters!r}")

    def native(self) -> dict:
        return {"admit_probability": float(self.probability), "filter_counters": self.counters}


Admission = Union[None, FrequencyFilter, ProbabilisticFilter]
EVICTIONS = ("lru", "lfu")

# ---------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class TableConfig:
    """What one embedding table is.

    name:          unique name of the table (snapshots and sync use it)
    dim:           floats per row
    initializer:   values of a row created on first sight; a pure function of
                   (seed, key), so a replay rebuilds the same rows
    optimizer:     fused update rule; its learning_rate is the default, and each
                   apply may pass another
    seed:          initializer and hash seed
    capacity_hint: rows to size the index for (growth works without it)
    admission:     None (a row on first sight), FrequencyFilter or
                   ProbabilisticFilter; an id without a row reads `unadmitted`
                   ("zeros" or "initializer": its would-be first values) and
                   its gradients are dropped and counted
    expire_after:  `expire(now)` removes rows not updated for this long, in
                   the units of apply's `step` (the trainer's event time or
                   step, so a replay expires alike); 0 = never
    max_rows:      capacity bound; when a call leaves more rows, the `eviction`
                   policy removes rows down to 95% of it at the call's end
    eviction:      "lru" (least recently updated first) or "lfu" (fewest updates)
    """

    name: str
    dim: int
    initializer: Initializer = dataclasses.field(default_factory=lambda: Normal(0.0, 0.01))
    optimizer: Optimizer = dataclasses.field(default_factory=Adagrad)
    seed: int = 0
    capacity_hint: int = 0
    admission: Admission = None
    unadmitted: str = "zeros"
    expire_after: int = 0
    max_rows: int = 0
    eviction: str = "lru"

    def memory_options(self) -> dict:
        out = {
            "unadmitted_initializer": self.unadmitted == "initializer",
            "expire_after": self.expire_after,
            "max_rows": self.max_rows,
            "eviction": EVICTIONS.index(self.eviction),
        }
        if self.admission is not None:
            out.update(self.admission.native())
        return out

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableConfig.name must be a non-empty string, got {self.name!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or not 0 < self.dim <= 65536:
            raise ValueError(f"TableConfig {self.name!r}: dim must be an int in [1, 65536], got {self.dim!r}")
        if not isinstance(self.initializer, INITIALIZERS):
            raise TypeError(f"TableConfig {self.name!r}: unknown initializer {self.initializer!r}")
        if not isinstance(self.optimizer, OPTIMIZERS):
            raise TypeError(f"TableConfig {self.name!r}: unknown optimizer {self.optimizer!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"TableConfig {self.name!r}: seed must be an int in [0, 2^64)")
        if not isinstance(self.capacity_hint, int) or self.capacity_hint < 0:
            raise ValueError(f"TableConfig {self.name!r}: capacity_hint must be an int >= 0")
        if self.admission is not None and not isinstance(self.admission, (FrequencyFilter, ProbabilisticFilter)):
            raise TypeError(f"TableConfig {self.name!r}: unknown admission {self.admission!r}")
        if self.unadmitted not in ("zeros", "initializer"):
            raise ValueError(f"TableConfig {self.name!r}: unadmitted must be 'zeros' or 'initializer'")
        if not isinstance(self.expire_after, int) or not 0 <= self.expire_after < 2**31:
            raise ValueError(f"TableConfig {self.name!r}: expire_after must be an int in [0, 2^31)")
        if not isinstance(self.max_rows, int) or self.max_rows < 0:
            raise ValueError(f"TableConfig {self.name!r}: max_rows must be an int >= 0")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"TableConfig {self.name!r}: eviction must be one of {EVICTIONS}")


_KINDS = {cls.__name__: cls for cls in (*INITIALIZERS, *OPTIMIZERS, FrequencyFilter, ProbabilisticFilter)}


def config_to_dict(config: TableConfig) -> dict:
    """A TableConfig as plain JSON values (initializer, optimizer and
    admission as {"kind": class name, **fields}): how a table's definition
    travels to another process or into a file."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            v = {"kind": type(v).__name__, **dataclasses.asdict(v)}
        out[f.name] = v
    return out


def config_from_dict(d: dict) -> TableConfig:
    """The inverse of `config_to_dict`; unknown kinds and fields are refused."""
    kwargs = {}
    names = {f.name for f in dataclasses.fields(TableConfig)}
    for key, v in d.items():
        if key not in names:
            raise ValueError(f"TableConfig has no field {key!r}")
        if isinstance(v, dict):
            v = dict(v)
            kind = v.pop("kind", None)
            if kind not in _KINDS:
                raise ValueError(f"TableConfig field {key!r}: unknown kind {kind!r}; known: {sorted(_KINDS)}")
            v = _KINDS[kind](**v)
        kwargs[key] = v
    return TableConfig(**kwargs)
