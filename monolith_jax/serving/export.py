"""Export of the dense part of a model for serving, without the training code.

    export_model(trainer, "model/", negative_rate=0.5)
    model = load_exported("model/")       # no Flax module, no tables needed
    logits = model(model.params, rows, lengths, dense)

    # a job with heads: every head's output, and a rate per sampled head
    export_model(trainer, "model/", negative_rate={"click": 1.0, "buy": 0.25})
    outputs = load_exported("model/")(params, rows, lengths, dense)   # {"click": (B,), "buy": (B,)}

A folder holds:

    model.stablehlo   the forward pass (pooling + the Flax model -> logits),
                      `jax.export` serialized StableHLO, batch dimension
                      symbolic, lowered for CPU and CUDA
    spec.json         sparse features (name, table, column, id space, ...)
                      and dense ones (name, column, fill), the key scheme,
                      tables (dim, the features whose ids fill each table's
                      rows, in order), the dense params' names, shapes and
                      dtypes, the negative rate; for a job with heads,
                      the heads (name, kind, and the negative rate of each
                      binary head)
    params.npz        the dense params at export (numpy, read with
                      allow_pickle=False)

The program's inputs are `(params, rows, lengths, dense)`:

    params   list of arrays, in spec["params"] order (inputs, not constants,
             so that dense syncs replace them without a new export)
    rows     table -> float32 (B, sum of its features' max_len, dim), the
             rows of each feature's ids side by side, zeros past `lengths`
    lengths  feature -> int32 (B,)
    dense    float32 (B, number of dense features)

The program returns logits (B,) for a job without heads (one binary
label) or whose heads are one binary head (served as before: one
probability; `spec["head"]` names it, so that a dense sync's rate given
by head name reaches it), and for a job with other heads (`monolith_jax.heads`) a dict
by head name of each head's raw output (B,): a logit for a binary head,
the value for a value head, as the trainer's `_forward`. A predictor
serves a binary head as sigmoid(logit + log(its negative rate)) (the
rate < 1 only where that head's negatives were sampled) and a value head
as it is: a value is never corrected. `spec["heads"]`:

    [{"name": "click", "kind": "binary", "negative_rate": 1.0},
     {"name": "buy",   "kind": "binary", "negative_rate": 0.25},
     {"name": "watch_s", "kind": "value"}]

and `spec["negative_rate"]` is then None. Such an export is format 3
(a reader of format 2 refuses it by its version, not by a wrong answer);
an export of a job without heads stays format 2, as before.

Nothing here is pickled; the spec is JSON and arrays are plain .npy data.

A predictor maps request ids to table keys with each feature's `id_space`
(`monolith_jax.sparse.keys.space_keys`), as the trainer did. An export
written before per-feature key spaces (format 1, no `id_space`) is
refused: its tables were trained on raw ids.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "monolith_jax.serving.export"
FORMAT_VERSION = 3   # 2: per-feature key spaces (id_space, key_scheme), dense fills; 3: heads
SINGLE_HEAD_VERSION = 2   # what an export of a job without heads is written as (unchanged)
PLATFORMS = ("cpu", "cuda")


def dense_arrays(params) -> dict:
    """Name -> numpy array of each dense param, in the params' flatten order.
    Names are the params' paths (`jax.tree_util.keystr`)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}


def _feature_spec(f) -> dict:
    return {"name": f.name, "table": f.table, "column": f.column, "combiner": f.combiner,
            "max_len": f.max_len, "separator": f.separator, "id_space": f.space}


def _dense_spec(f) -> dict:
    return {"name": f.name, "column": f.column, "fill": f.fill}


def check_rate(rate, what: str) -> float:
    """A negative rate: a number in (0, 1]; a ValueError naming `what` otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) \
            or not 0.0 < float(rate) <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {rate!r}")
    return float(rate)


def resolve_rates(heads: list, rates: dict, base: dict, what: str) -> dict:
    """`base` ({binary head: rate}) with the per-head `rates` put in, each
    checked: heads is [(name, kind)]; a name that is not a head, a rate
    outside (0, 1], or a rate < 1 for a value head (a value is never
    corrected) is a ValueError naming it."""
    names = [n for n, _ in heads]
    kinds = dict(heads)
    unknown = sorted(str(k) for k in rates if k not in kinds)
    if unknown:
        raise ValueError(f"{what} names {unknown}, not heads of this model; its heads are {names}")
    out = dict(base)
    for name, rate in rates.items():
        rate = check_rate(rate, f"{what}[{name!r}]")
        if kinds[name] != "binary":
            if rate != 1.0:
                raise ValueError(f"{what}[{name!r}] is {rate}, but head {name!r} is a value head: its output is "
                                 f"served as it is, never corrected for negative sampling")
            continue
        out[name] = rate
    return out


def head_rates(heads, negative_rate, what: str = "negative_rate") -> dict:
    """{binary head name: rate} from one rate (every binary head) or a dict
    by head name (heads left out: 1, not sampled); see `resolve_rates`."""
    pairs = [(h.name, h.kind) for h in heads]
    if not isinstance(negative_rate, dict):
        rate = check_rate(negative_rate, what)
        return {n: rate for n, k in pairs if k == "binary"}
    return resolve_rates(pairs, negative_rate, {n: 1.0 for n, k in pairs if k == "binary"}, what)


def spec_head_rates(spec_heads: list, rates: dict, what: str) -> dict:
    """An export's binary heads' rates (`spec["heads"]`) with a dense
    sync's per-head `rates` put in (heads not named keep the export's)."""
    return resolve_rates([(h["name"], h["kind"]) for h in spec_heads], rates,
                         {h["name"]: float(h["negative_rate"]) for h in spec_heads if h["kind"] == "binary"}, what)


def job_negative_rates(job):
    """The negative rate(s) an export of `job` is corrected by: {head: rate}
    where the job's labels are per-head rules (a mapping head -> LabelRule
    with `negative_rate`), else its one rule's rate, else 1."""
    labels = getattr(job, "labels", None)
    get = getattr(labels, "get", None)
    if get is not None and callable(getattr(labels, "items", None)):
        return {str(name): float(getattr(rule, "negative_rate", 1.0) or 1.0) for name, rule in labels.items()}
    return float(getattr(labels, "negative_rate", 1.0) or 1.0)


def export_model(trainer, directory: str, negative_rate: float | dict = 1.0, max_batch: int = 1024,
                 platforms=PLATFORMS) -> dict:
    """Writes the trainer's model (current dense params) to `directory`;
    returns the spec. `negative_rate`: the share of negatives the joiner
    kept (the examples' sample_rate); serving adds log(rate) to the logit.
    For a job with heads: one rate for every binary head, or a dict
    {head name: rate} (heads left out: 1, their negatives not sampled);
    the export then returns every head's output (the module docstring)."""
    from monolith_jax.features import SparseBatch
    from monolith_jax.sparse.keys import KEY_SCHEME

    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    heads = getattr(trainer, "heads", None)
    one = heads is not None and len(heads) == 1 and heads[0].binary
    if heads is None or one:
        if isinstance(negative_rate, dict):
            if heads is None:
                raise ValueError(f"negative_rate {negative_rate!r} is by head, but this model has no heads (one "
                                 f"binary label): give one rate")
            negative_rate = head_rates(heads, negative_rate)[heads[0].name]
        negative_rate = check_rate(negative_rate, "negative_rate")
        head, heads, rates = (heads[0].name if one else None), None, None
    else:
        head, rates = None, head_rates(heads, negative_rate)
    coll = trainer.collection
    leaves, treedef = jax.tree_util.tree_flatten(trainer.params)
    arrays = dense_arrays(trainer.params)

    def logits(params, rows, lengths, dense):
        p = jax.tree_util.tree_unflatten(treedef, params)
        batch = SparseBatch(ids={}, lengths=lengths, dense=dense, labels=None, weights=None)
        out = trainer._forward(p, rows, batch)
        if heads is not None:
            return {h.name: out[h.name] for h in heads}
        return out[head] if head is not None else out

    b, = jax.export.symbolic_shape("b")
    used = {name: feats for name, feats in coll.by_table.items() if feats}
    specs = (
        [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves],
        {name: jax.ShapeDtypeStruct((b, sum(f.max_len for f in feats), coll.tables[name].config.dim), jnp.float32)
         for name, feats in used.items()},
        {f.name: jax.ShapeDtypeStruct((b,), jnp.int32) for f in trainer.features},
        jax.ShapeDtypeStruct((b, len(trainer.dense_features)), jnp.float32),
    )
    exported = jax.export.export(jax.jit(logits), platforms=tuple(platforms))(*specs)
    spec = {
        "format": FORMAT, "format_version": SINGLE_HEAD_VERSION if heads is None else FORMAT_VERSION,
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "features": [_feature_spec(f) for f in trainer.features],
        "dense_features": [_dense_spec(f) for f in trainer.dense_features],
        "key_scheme": KEY_SCHEME,
        "tables": {name: {"dim": coll.tables[name].config.dim, "features": [f.name for f in feats],
                          "unadmitted": "zeros"}
                   for name, feats in used.items()},
        "params": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()],
        "negative_rate": float(negative_rate) if heads is None else None,
        "max_batch": max_batch,
    }
    if head is not None:   # a job of one binary head: served as one without heads, its name kept
        spec["head"] = head
    if heads is not None:
        spec["heads"] = [{"name": h.name, "kind": h.kind, **({"negative_rate": rates[h.name]} if h.binary else {})}
                         for h in heads]
    os.makedirs(directory, exist_ok=True)
    # Written to temporary names, then renamed: a reader never sees half a model.
    parts = {"model.stablehlo": bytes(exported.serialize()),
             "spec.json": json.dumps(spec, indent=1).encode()}
    for name, data in parts.items():
        with open(os.path.join(directory, name + ".tmp"), "wb") as f:
            f.write(data)
    with open(os.path.join(directory, "params.npz.tmp"), "wb") as f:
        np.savez(f, **{f"p{i}": a for i, a in enumerate(arrays.values())})
    for name in (*parts, "params.npz"):
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))
    return spec


@dataclasses.dataclass
class ExportedModel:
    """A loaded export: `model(params, rows, lengths, dense)` -> logits (B,),
    or for an export with heads a dict by head name of their outputs (B,)."""

    spec: dict
    params: list
    exported: object

    def __post_init__(self):
        self._call = jax.jit(self.exported.call)

    def __call__(self, params, rows: dict, lengths: dict, dense):
        return self._call(params, rows, lengths, dense)

    @property
    def heads(self) -> list | None:
        """The spec's heads (name, kind, negative_rate of binary ones); None without heads."""
        return self.spec.get("heads")

    @property
    def param_names(self) -> list:
        return [p["name"] for p in self.spec["params"]]

    def check_params(self, named: dict) -> list:
        """Named arrays (a dense sync) -> the params list, checked against the spec."""
        out = []
        for p in self.spec["params"]:
            a = named.get(p["name"])
            if a is None:
                raise ValueError(f"dense params lack {p['name']!r}")
            if list(a.shape) != p["shape"] or a.dtype.name != p["dtype"]:
                raise ValueError(f"dense param {p['name']!r}: {a.dtype.name}{list(a.shape)}, "
                                 f"the export has {p['dtype']}{p['shape']}")
            out.append(a)
        extra = set(named) - set(self.param_names)
        if extra:
            raise ValueError(f"dense params the export does not have: {sorted(extra)}")
        return out


def load_exported(directory: str) -> ExportedModel:
    with open(os.path.join(directory, "spec.json"), encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{directory}: not a monolith_jax export (format {spec.get('format')!r})")
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory}: export format {spec['format_version']} is newer than this "
                         f"reader's {FORMAT_VERSION}")
    from monolith_jax.sparse.keys import KEY_SCHEME

    if any("id_space" not in f for f in spec.get("features", [])) or "key_scheme" not in spec:
        raise ValueError(f"{directory}: this export predates per-feature key spaces (its features have no "
                         f"id_space): its tables were trained on raw ids, which no longer map to their rows. "
                         f"Export the model again from a trainer of this version")
    if spec["key_scheme"] != KEY_SCHEME:
        raise ValueError(f"{directory}: export uses key scheme {spec['key_scheme']!r}; this reader maps ids "
                         f"with {KEY_SCHEME!r}")
    with open(os.path.join(directory, "model.stablehlo"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, "params.npz"), allow_pickle=False) as z:
        params = [z[f"p{i}"] for i in range(len(spec["params"]))]
    model = ExportedModel(spec, [], exported)
    model.params = model.check_params(dict(zip(model.param_names, params)))
    return model
