"""librdkafka's built-in Kafka cluster in a process of its own, for the soak.

    python -m experiments.soak.kafka_server [--watch-stdin]

Starts `monolith_jax.stream.kafka.EmbeddedKafka`, creates the stream's
topics (`kafka.TOPICS`, 4 partitions each), prints `kafka listening on
HOST:PORT` and serves until SIGTERM or SIGINT, or (`--watch-stdin`) until
its standard input closes: the process that started it is gone, so it
never outlives the soak.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--watch-stdin", action="store_true", help="exit when standard input closes")
    args = p.parse_args(argv)
    from monolith_jax.stream import kafka as K

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.watch_stdin:
        def watch():
            while sys.stdin.buffer.read(4096):
                pass
            stop.set()

        threading.Thread(target=watch, daemon=True).start()
    cluster = K.EmbeddedKafka()
    code = 0
    try:
        # The embedded cluster creates a topic (4 partitions) when asked for
        # it; ensure_topics then only checks (its CreateTopics call would
        # wait out a 5 s timeout there first).
        from confluent_kafka import Producer

        probe = Producer(K.client_config(cluster.bootstrap))
        for topic in K.TOPICS.values():
            probe.list_topics(topic=topic, timeout=10)
        K.ensure_topics(cluster.bootstrap, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        print(f"kafka listening on {cluster.bootstrap}", flush=True)
        while not stop.wait(0.5):
            pass
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        cluster.close()
        print("kafka stopped", flush=True)
        sys.stderr.flush()
        # At once: no client handle left to log its reconnects to the closed
        # cluster, no finalizing under the thread still reading stdin.
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
