"""Export of the dense part of a model for serving, without the training code.

    export_model(trainer, "model/", negative_rate=0.5)
    model = load_exported("model/")       # no Flax module, no tables needed
    logits = model(model.params, rows, lengths, dense)

A folder holds:

    model.stablehlo   the forward pass (pooling + the Flax model -> logits),
                      `jax.export` serialized StableHLO, batch dimension
                      symbolic, lowered for CPU and CUDA
    spec.json         sparse features (name, table, column, id space, ...)
                      and dense ones (name, column, fill), the key scheme,
                      tables (dim, the features whose ids fill each table's
                      rows, in order), the dense params' names, shapes and
                      dtypes, the negative rate
    params.npz        the dense params at export (numpy, read with
                      allow_pickle=False)

The program's inputs are `(params, rows, lengths, dense)`:

    params   list of arrays, in spec["params"] order (inputs, not constants,
             so that dense syncs replace them without a new export)
    rows     table -> float32 (B, sum of its features' max_len, dim), the
             rows of each feature's ids side by side, zeros past `lengths`
    lengths  feature -> int32 (B,)
    dense    float32 (B, number of dense features)

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
FORMAT_VERSION = 2   # 2: per-feature key spaces (id_space, key_scheme), dense fills
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


def export_model(trainer, directory: str, negative_rate: float = 1.0, max_batch: int = 1024,
                 platforms=PLATFORMS) -> dict:
    """Writes the trainer's model (current dense params) to `directory`;
    returns the spec. `negative_rate`: the share of negatives the joiner
    kept (the examples' sample_rate); serving adds log(rate) to the logit."""
    from monolith_jax.features import SparseBatch
    from monolith_jax.sparse.keys import KEY_SCHEME

    if not 0.0 < negative_rate <= 1.0:
        raise ValueError(f"negative_rate must be in (0, 1], got {negative_rate}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
    heads = getattr(trainer, "heads", None)
    if heads is not None and (len(heads) > 1 or not heads[0].binary):
        raise ValueError(f"the export serves one probability per request; a model with heads "
                         f"{[h.name for h in heads]} cannot be exported yet")
    coll = trainer.collection
    leaves, treedef = jax.tree_util.tree_flatten(trainer.params)
    arrays = dense_arrays(trainer.params)

    def logits(params, rows, lengths, dense):
        p = jax.tree_util.tree_unflatten(treedef, params)
        batch = SparseBatch(ids={}, lengths=lengths, dense=dense, labels=None, weights=None)
        out = trainer._forward(p, rows, batch)
        return out[heads[0].name] if heads is not None else out

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
        "format": FORMAT, "format_version": FORMAT_VERSION, "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "features": [_feature_spec(f) for f in trainer.features],
        "dense_features": [_dense_spec(f) for f in trainer.dense_features],
        "key_scheme": KEY_SCHEME,
        "tables": {name: {"dim": coll.tables[name].config.dim, "features": [f.name for f in feats],
                          "unadmitted": "zeros"}
                   for name, feats in used.items()},
        "params": [{"name": n, "shape": list(a.shape), "dtype": a.dtype.name} for n, a in arrays.items()],
        "negative_rate": float(negative_rate),
        "max_batch": max_batch,
    }
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
    """A loaded export: `model(params, rows, lengths, dense)` -> logits (B,)."""

    spec: dict
    params: list
    exported: object

    def __post_init__(self):
        self._call = jax.jit(self.exported.call)

    def __call__(self, params, rows: dict, lengths: dict, dense):
        return self._call(params, rows, lengths, dense)

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
