"""Online training: stream messages, Kafka plumbing, the joiner, the
online trainer and the MovieLens replayer.

Needs the optional Kafka client (`confluent-kafka`), which the package
installs; nothing outside this folder imports it, so the rest of
monolith_jax works without it.

  messages   the three message formats (features, actions, examples)
  kafka      embedded cluster and client configuration
  joiner     features + actions -> examples (window, spill, negative sampling)
  trainer    OnlineTrainer: examples -> continuous training, prequential AUC
  replay     MovieLens-1M in time order -> features and actions topics
  loop       replay -> join -> train in one command (the main job)
"""
