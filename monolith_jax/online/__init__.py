"""The online trainer: the examples topic -> a `Trainer`, continuously.

  trainer   OnlineTrainer: batches by count or time, prequential metrics,
            snapshots with stream offsets, sync to a serving PS
  train     the `monolith train` process: from files or from the stream
"""
