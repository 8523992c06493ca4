"""Sparse features: collisionless embedding tables, their configuration, and
the per-feature key spaces records map into (`space_keys`)."""

from monolith_jax.sparse.config import (
    AMSGrad,
    FTRL,
    SGD,
    FrequencyFilter,
    ProbabilisticFilter,
    Adagrad,
    Adam,
    Constant,
    Momentum,
    Normal,
    RMSProp,
    RowwiseAdagrad,
    TableConfig,
    TruncatedNormal,
    Uniform,
    Zeros,
)
from monolith_jax.sparse.keys import KEY_SCHEME, Keys, hash_strings, key_words, space_ids, space_keys
from monolith_jax.sparse.table import EmbeddingTable

__all__ = [
    "AMSGrad", "Adagrad", "Adam", "Constant", "EmbeddingTable", "FTRL", "FrequencyFilter", "Keys",
    "Momentum", "Normal", "ProbabilisticFilter", "RMSProp", "RowwiseAdagrad", "SGD", "TableConfig",
    "TruncatedNormal", "Uniform", "Zeros", "hash_strings", "key_words", "space_ids", "space_keys", "KEY_SCHEME",
]
