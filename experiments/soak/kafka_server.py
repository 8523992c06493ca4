"""The soak's Kafka: `monolith kafka` (monolith_jax/stream/kafka_server.py)
in a process of its own.

    python -m experiments.soak.kafka_server [--watch-stdin]
"""

import sys

from monolith_jax.stream.kafka_server import main

if __name__ == "__main__":
    sys.exit(main())
