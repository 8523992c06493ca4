"""monolith_jax: real-time recommendation in JAX.

Public API, in one screen:

  Tables (monolith_jax.sparse)
    TableConfig(name, dim, initializer, optimizer, seed, capacity_hint)
    EmbeddingTable(config)       .lookup / .apply_gradients       (in jit, CPU)
                                 .lookup_host / .apply_gradients_host (numpy)
                                 .find / .erase / .dump / .load / .stats
    Keys, key_words, hash_strings    64-bit ids in 32-bit JAX
  Memory control (TableConfig fields): admission=FrequencyFilter |
    ProbabilisticFilter, expire_after (+ .expire), max_rows + eviction;
    .drain_touched / .export (float32, float16, bfloat16) for serving
  Initializers: Zeros, Constant, Uniform, Normal, TruncatedNormal
  Fused optimizers: SGD, Momentum, Adagrad, RowwiseAdagrad, Adam, AMSGrad,
                    RMSProp, FTRL

Jobs (what every `monolith` command runs, named as --job MODULE:NAME)
  Job(sparse, tables, model, dense, optimizer, label, heads, batch_size, labels, log, source)
  Head(name, loss, weight, label, threshold, missing)       one objective of a multi-task model
  LabelRule(positive, min_value, window_s, negative_rate, value_of, default, given)
                                                            the joiner's labels (one, or one per head)
  LogSpec(time_column, actions, request_id_column, ...)     a log to replay
  load_job("module:name")

Models and training (import the submodules)
  monolith_jax.features    SparseFeature, DenseFeature, SparseBatch, records_to_batch
  monolith_jax.io          iter_batches (CSV, Parquet)
  monolith_jax.embedding   EmbeddingCollection, SparseFeatures (pooling), pool
  monolith_jax.models      DeepFM, DCNv2, WideAndDeep, TwoTower, MLP, DIN, MMoE
  monolith_jax.heads       Head: losses, weights and metrics of several objectives
  monolith_jax.training    Trainer (jitted step, fit, evaluate, metrics JSONL)
  monolith_jax.metrics     auc, log_loss
  monolith_jax.examples    example jobs, users of this API like yours

Importing this package loads no native code and changes no JAX setting; the
first EmbeddingTable loads the C++ engine.
"""

from monolith_jax.sparse import (
    AMSGrad,
    FTRL,
    SGD,
    FrequencyFilter,
    ProbabilisticFilter,
    Adagrad,
    Adam,
    Constant,
    EmbeddingTable,
    Keys,
    Momentum,
    Normal,
    RMSProp,
    RowwiseAdagrad,
    TableConfig,
    TruncatedNormal,
    Uniform,
    Zeros,
    hash_strings,
    key_words,
)

from monolith_jax.heads import Head
from monolith_jax.job import Job, JobError, LabelRule, LogSpec, load_job

__version__ = "0.1.0"

__all__ = [
    "AMSGrad", "Adagrad", "Adam", "Constant", "EmbeddingTable", "FTRL", "FrequencyFilter", "Head", "Job", "JobError",
    "Keys", "LabelRule", "LogSpec", "load_job",
    "Momentum", "Normal", "ProbabilisticFilter", "RMSProp", "RowwiseAdagrad", "SGD", "TableConfig",
    "TruncatedNormal", "Uniform", "Zeros", "hash_strings", "key_words",
]
