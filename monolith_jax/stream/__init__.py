"""The stream: Kafka plumbing, message formats, the joiner and its spill
store, the replayer of any time-stamped log, a broker process for tests.

Needs the Kafka client (`confluent-kafka`), which the package installs;
nothing outside `stream/`, `online/` and the command line imports it, so
the rest of monolith_jax works without it.

  messages    the three message formats (features, actions, examples)
  kafka       embedded cluster and client configuration
  joiner      features + actions -> examples (window, spill, negative sampling)
  join_state  the join in event time, without Kafka (tested against a reference)
  labels      label rules (one binary label, or several named ones: binary, value, given)
  join_labels the join of several named labels, one per head of a multi-task job
  spill       waiting requests on disk (SQLite)
  dead_letters  unreadable messages with their reason (truncated when too large), counted
  replay      a time-stamped log (CSV/Parquet) -> features and actions topics
  broker      a Kafka-protocol broker in its own process (tests, benchmarks)
"""
