"""Sparse features: collisionless embedding tables and their configuration."""

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
from monolith_jax.sparse.keys import Keys, hash_strings, key_words
from monolith_jax.sparse.table import EmbeddingTable

__all__ = [
    "AMSGrad", "Adagrad", "Adam", "Constant", "EmbeddingTable", "FTRL", "FrequencyFilter", "Keys",
    "Momentum", "Normal", "ProbabilisticFilter", "RMSProp", "RowwiseAdagrad", "SGD", "TableConfig",
    "TruncatedNormal", "Uniform", "Zeros", "hash_strings", "key_words",
]
