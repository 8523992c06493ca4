"""Recommendation models as small Flax NNX modules.

Each takes `fields`, a dict of pooled feature embeddings (B, D) from
`SparseFeatures`, and `dense` features (B, n_dense), and returns logits (B,).
DIN also reads a sequence feature (combiner=None: (B, max_len, D) rows);
MMoE returns {task: logits (B,)} (one (B,) array with single_task=True).
DeepFM and Wide & Deep read tables of dim D + 1: an id's row carries its
embedding and, last, its first-order (wide) weight, so one lookup serves both.
"""

from monolith_jax.models.dcn import DCNv2
from monolith_jax.models.deepfm import DeepFM
from monolith_jax.models.din import DIN
from monolith_jax.models.mlp import MLP
from monolith_jax.models.mmoe import MMoE
from monolith_jax.models.two_tower import TwoTower
from monolith_jax.models.wide_deep import WideAndDeep

__all__ = ["DCNv2", "DIN", "DeepFM", "MLP", "MMoE", "TwoTower", "WideAndDeep"]
