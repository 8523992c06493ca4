"""Serving: the exported model, the serving PS, touched-row and dense
sync from a trainer, the predictor and its client.

  export      jax.export of the dense part + JSON spec + params (no pickle)
  serving_ps  values-only tables and the latest dense params, over gRPC
  sync        SyncPusher: touched rows every interval, dense params less often
  predictor   ids -> serving PS rows -> exported model -> probabilities
  head_scores a model with heads: a score per head, each binary head
              corrected by its own negative rate
"""
