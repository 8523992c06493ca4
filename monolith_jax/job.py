"""`Job`: one definition of a training job that every process runs.

A job is what a trainer, a training PS shard, the joiner, the replayer, an
exporter and a predictor must agree on: the features, the tables, the model,
the optimizer, the batch size, how the stream labels a request and how a
log a user has becomes a stream. Write one in a module of your own and name
it on the command line as `MODULE:NAME`, the way WSGI apps are named:

    # my_job.py
    import optax, monolith_jax as mj
    from monolith_jax.features import SparseFeature, DenseFeature
    from monolith_jax.models import DeepFM

    job = mj.Job(
        sparse=[SparseFeature("user", "ids"), SparseFeature("item", "ids")],
        dense=[DenseFeature("price", fill=0.0)],
        tables=[mj.TableConfig("ids", 9, mj.Normal(0, 0.01), mj.Adagrad(0.05))],
        model=lambda rngs: DeepFM(["user", "item"], 8, n_dense=1, rngs=rngs),
        optimizer=optax.adam(1e-3),
        labels=mj.LabelRule(positive=("click",)),
        log=mj.LogSpec(time_column="ts", request_id_column="request", actions={"click": "clicked"}))

    $ monolith train --job my_job:job --data clicks.parquet --export model/

A job with several heads labels each from the stream by its own rule:
`labels={"click": mj.LabelRule(positive=("click",)), "buy":
mj.LabelRule(positive=("buy",), given="click")}` (`monolith_jax.stream.labels`).

`NAME` is a `Job` or a function of no arguments returning one. The module
is imported with the current folder on `sys.path` (as WSGI servers do).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Callable, Iterable, Mapping, Sequence

from monolith_jax.features import DenseFeature, SparseFeature
from monolith_jax.sparse import TableConfig
from monolith_jax.stream.labels import LabelRule, check_rules


@dataclasses.dataclass(frozen=True)
class LogSpec:
    """How a time-stamped log (CSV/Parquet, one row per request) becomes the
    features and actions topics (`monolith replay`).

    time_column:        the request's event time
    time_unit:          "s" or "ms" (a timestamp column of any unit also works)
    request_id_column:  the request id; None: the row number
    actions:            action type -> the column holding its value; a row
                        whose cell is present and not 0 (or False) gets that
                        action, with the cell as its value
    action_delay_s:     seconds after the request that its actions happen
    """

    time_column: str
    actions: Mapping[str, str]
    time_unit: str = "s"
    request_id_column: str | None = None
    action_delay_s: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "actions", dict(self.actions))
        if self.time_unit not in ("s", "ms"):
            raise ValueError(f"LogSpec.time_unit must be 's' or 'ms', got {self.time_unit!r}")
        if not self.actions:
            raise ValueError("LogSpec.actions must map at least one action type to its column")
        if not self.action_delay_s >= 0:
            raise ValueError(f"LogSpec.action_delay_s must be >= 0, got {self.action_delay_s}")


@dataclasses.dataclass(frozen=True)
class Job:
    """A training job; see the module docstring.

    sparse, dense:   the features (`SparseFeature`, `DenseFeature`)
    tables:          the `TableConfig`s the sparse features read
    model:           factory: `model(rngs)` -> an NNX module taking
                     (pooled features dict, dense (B, n)) -> logits (B,)
    optimizer:       optax transformation of the dense params (default adam 1e-3)
    label:           the label column of training files
    label_threshold: labels >= it are 1, others 0 (None: the label as it is)
    heads:           `Head`s of a model with several objectives (its model
                     returns a dict by head name; each head names its own
                     label column, loss and weight; `monolith_jax.heads`).
                     Empty: one binary head read from `label`
    batch_size:      examples per step, for files and the stream
    sparse_loss:     "sum" (each example's own gradient to its rows) or "mean"
    seed:            seeds the model's init and the tables' initializers
    labels:          how the joiner labels the stream: a `LabelRule` (one
                     binary label; default LabelRule()), or for a job with
                     heads a mapping head name -> `LabelRule`, one per head
                     (`monolith_jax.stream.labels`). A job with one head may
                     give a single LabelRule (it labels that head); one
                     with several heads and no labels has no stream rules
    log:             `LogSpec`: how `monolith replay --data FILE` reads a log
    source:          optional `source(limit, seed)` -> iterable of
                     (kind "features"|"actions", request id, value bytes,
                     event ms) in event-time order: a job's own replay, used
                     by `monolith replay` / `monolith demo` without `--data`
    name:            for logs
    """

    sparse: Sequence[SparseFeature]
    tables: Sequence[TableConfig]
    model: Callable
    dense: Sequence[DenseFeature] = ()
    optimizer: object = None
    label: str = "label"
    label_threshold: float | None = None
    heads: Sequence = ()
    batch_size: int = 1024
    sparse_loss: str = "sum"
    seed: int = 0
    labels: LabelRule | Mapping[str, LabelRule] | None = None
    log: LogSpec | None = None
    source: Callable | None = None
    name: str = "job"

    def __post_init__(self):
        from monolith_jax.heads import check_heads

        object.__setattr__(self, "heads", check_heads(self.heads) or ())
        for field in ("sparse", "dense", "tables"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if not self.sparse:
            raise ValueError(f"job {self.name!r}: no sparse features")
        for f in self.sparse:
            if not isinstance(f, SparseFeature):
                raise TypeError(f"job {self.name!r}: sparse features must be SparseFeature, got {f!r}")
        for f in self.dense:
            if not isinstance(f, DenseFeature):
                raise TypeError(f"job {self.name!r}: dense features must be DenseFeature, got {f!r}")
        for t in self.tables:
            if not isinstance(t, TableConfig):
                raise TypeError(f"job {self.name!r}: tables must be TableConfig, got {t!r}")
        names = [f.name for f in self.sparse] + [f.name for f in self.dense]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"job {self.name!r}: feature names used twice: {dup}")
        tables = {t.name for t in self.tables}
        for f in self.sparse:
            if f.table not in tables:
                raise ValueError(f"job {self.name!r}: feature {f.name!r} reads table {f.table!r}, "
                                 f"which is not among {sorted(tables)}")
        if not callable(self.model):
            raise TypeError(f"job {self.name!r}: model must be a factory model(rngs) -> nnx.Module")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"job {self.name!r}: batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.sparse_loss not in ("sum", "mean"):
            raise ValueError(f"job {self.name!r}: sparse_loss must be 'sum' or 'mean'")
        self._check_labels()
        if self.log is not None and not isinstance(self.log, LogSpec):
            raise TypeError(f"job {self.name!r}: log must be a LogSpec")
        rules = self.label_rules() or ({} if self.labels is None else {"": self.labels})
        if self.log is not None:
            for head, rule in rules.items():
                if not set(self.log.actions) & set(rule.action_types):
                    # The replayer would send actions the joiner never counts for this label.
                    what = (f"the action types {list(rule.action_types)} of label {head!r}" if head
                            else f"the label rule's positive types {list(rule.action_types)}")
                    raise ValueError(f"job {self.name!r}: the log's actions {sorted(self.log.actions)} include "
                                     f"none of {what}")

    def _check_labels(self) -> None:
        heads = [h.name for h in self.heads]
        labels = self.labels
        if labels is None:
            if not heads:
                object.__setattr__(self, "labels", LabelRule())
            return
        if isinstance(labels, LabelRule):
            if len(heads) > 1:
                raise ValueError(f"job {self.name!r}: a single LabelRule cannot label the heads {heads}; give "
                                 "labels={head name: LabelRule, ...}, one per head")
            if labels.given is not None:
                raise ValueError(f"job {self.name!r}: LabelRule(given={labels.given!r}) needs other labels; "
                                 "a single label has none")
            return
        if not isinstance(labels, Mapping):
            raise TypeError(f"job {self.name!r}: labels must be a LabelRule or a mapping head name -> "
                            f"LabelRule, got {type(labels).__name__}")
        if not heads:
            raise ValueError(f"job {self.name!r}: labels by name {sorted(labels)} need heads of those names; "
                             "a job without heads takes one LabelRule")
        rules = check_rules(labels, f"job {self.name!r}: labels")
        lacking = [h for h in heads if h not in rules]
        extra = [n for n in rules if n not in heads]
        if lacking or extra:
            raise ValueError(f"job {self.name!r}: labels must give one rule per head {heads}"
                             + (f"; heads without a rule: {lacking}" if lacking else "")
                             + (f"; rules naming no head: {extra}" if extra else ""))
        object.__setattr__(self, "labels", rules)

    def label_rules(self) -> dict | None:
        """The stream's label rules by head name for a job with heads (the
        joiner then writes named labels), None for a single-label job (or a
        job with heads but no label rules: see `labels`)."""
        if not self.heads or self.labels is None:
            return None
        if isinstance(self.labels, LabelRule):
            return {self.heads[0].name: self.labels}
        return dict(self.labels)

    # ------------------------------------------------------------------
    def table_configs(self, seed: int | None = None) -> list:
        """The tables, their initializer seeds offset by `seed` (default the job's)."""
        seed = self.seed if seed is None else seed
        return [dataclasses.replace(t, seed=t.seed + seed) for t in self.tables]

    def build_model(self, seed: int | None = None):
        from flax import nnx

        return self.model(nnx.Rngs(self.seed if seed is None else seed))

    def make_trainer(self, seed: int | None = None, **kwargs):
        """A `Trainer` of this job (its own tables, a fresh model).
        kwargs go to `Trainer` (metrics_path, log_every, out, ...)."""
        import optax

        from monolith_jax.training import Trainer

        kwargs.setdefault("sparse_loss", self.sparse_loss)
        kwargs.setdefault("heads", self.heads or None)
        return Trainer(self.build_model(seed), self.table_configs(seed), self.sparse, self.dense,
                       self.optimizer if self.optimizer is not None else optax.adam(1e-3), **kwargs)

    def batches(self, paths, **kwargs) -> Iterable:
        """SparseBatches of `batch_size` records from CSV/Parquet files (one pass)."""
        from monolith_jax.io import iter_batches

        kwargs.setdefault("batch_size", self.batch_size)
        if self.heads:
            return iter_batches(paths, self.sparse, self.dense, self.heads, **kwargs)
        return iter_batches(paths, self.sparse, self.dense, self.label, label_threshold=self.label_threshold,
                            **kwargs)


class JobError(ValueError):
    """A `MODULE:NAME` that does not name a Job."""


def load_job(spec: str) -> Job:
    """The Job named by `MODULE:NAME` (NAME: a Job, or a function returning one)."""
    if isinstance(spec, Job):
        return spec
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise JobError(f"--job takes MODULE:NAME (e.g. my_job:job), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise JobError(f"--job {spec}: cannot import module {module_name!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise JobError(f"--job {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, Job) and callable(obj):
        obj = obj()
    if not isinstance(obj, Job):
        raise JobError(f"--job {spec}: {attr!r} is {type(obj).__name__}, not a monolith_jax.Job "
                       "(or a function returning one)")
    return obj
