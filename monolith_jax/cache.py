"""The cache folder for things fetched at first use (data sets of the
examples, the test broker's binary): `cache_dir` if given, else
$MONOLITH_DATA_DIR, else ~/.cache/monolith_jax."""

from __future__ import annotations

import os
import pathlib


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("MONOLITH_DATA_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "monolith_jax"
