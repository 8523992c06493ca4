"""Shape checks the models make on their inputs.

Shapes are static under `jax.jit`, so these run once, while the first step
is traced: a model given inputs it would silently misread (a table of the
wrong width, a sequence feature where a pooled one belongs, dense columns
it does not read) fails at step 0 with a message naming the feature, not
after a thousand steps with a bad AUC.
"""

from __future__ import annotations

from typing import Sequence


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def pooled_fields(model, fields: dict, names: Sequence[str], width: int, expected: str) -> list:
    """[fields[name] for name in names], each checked to be pooled (batch, width).

    expected: how `width` follows from the model's arguments, for the message
    (e.g. "embed_dim + 1 = 9: embed_dim values, then the first-order weight")."""
    cls = type(model).__name__
    out = []
    for name in names:
        if name not in fields:
            raise KeyError(f"{cls} reads feature {name!r}, which no sparse feature provides "
                           f"(the features are {sorted(fields)})")
        x = fields[name]
        shape = _shape(x)
        if len(shape) != 2:
            hint = (" (a feature with combiner=None gives (batch, max_len, dim) sequences; give it a "
                    "combiner: 'sum', 'mean' or 'sqrtn')") if len(shape) == 3 else ""
            raise ValueError(f"{cls}: feature {name!r} gives rows of shape {shape}; {cls} needs pooled "
                             f"(batch, {width}) rows{hint}")
        if shape[1] != width:
            raise ValueError(f"{cls}: feature {name!r} reads a table with rows of width {shape[1]}; "
                             f"{cls} needs rows of width {expected}")
        out.append(x)
    return out


def dense_input(model, dense, n_dense: int):
    """`dense` checked to hold the `n_dense` columns the model was built for
    (None or zero columns when it reads none)."""
    cls = type(model).__name__
    shape = None if dense is None else _shape(dense)
    if n_dense == 0:
        if shape is not None and (len(shape) != 2 or shape[1] != 0):
            raise ValueError(f"{cls} was built with n_dense=0 but the batch has dense features of shape {shape}: "
                             f"they would be ignored (build it with n_dense={shape[-1] if shape else 0} "
                             f"or drop the dense features)")
        return dense
    if shape is None or len(shape) != 2 or shape[1] != n_dense:
        raise ValueError(f"{cls} was built with n_dense={n_dense} but the batch has dense features of shape "
                         f"{shape} (expected (batch, {n_dense}): one column per DenseFeature)")
    return dense


def no_dense_input(model, dense):
    """For models that read no dense features: refuses a batch that has some."""
    shape = None if dense is None else _shape(dense)
    if shape is not None and (len(shape) != 2 or shape[1] != 0):
        raise ValueError(f"{type(model).__name__} reads no dense features but the batch has dense features of "
                         f"shape {shape}: they would be ignored (drop them from the trainer's dense features)")
    return dense


def input_width(model, x, width: int, what: str):
    """x checked to be (..., width)."""
    shape = _shape(x)
    if not shape or shape[-1] != width:
        raise ValueError(f"{type(model).__name__}: {what} has shape {shape}; expected last axis {width}")
    return x
