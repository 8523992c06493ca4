"""`monolith kafka`: a Kafka cluster for a shell, until SIGTERM or Ctrl-C.

    monolith kafka [--broker embedded|tansu] [--watch-stdin]

`embedded` (the default): librdkafka's built-in cluster
(`kafka.EmbeddedKafka`) in this process; one consumer per group (see
`monolith_jax.stream.kafka`). `tansu`: a Kafka-protocol broker process
(`broker.BrokerProcess`, the pinned tansu binary, memory storage), for
several consumers sharing a group (`monolith cluster` with several
trainers). Either way it creates the stream's topics (`kafka.TOPICS`, 4
partitions each), prints `kafka listening on HOST:PORT` and serves on
127.0.0.1 until SIGTERM or SIGINT, or (`--watch-stdin`) until its standard
input closes: a parent that started it is gone, so it never outlives it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="monolith kafka", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--broker", choices=["embedded", "tansu"], default="embedded",
                   help="librdkafka's built-in cluster, or a tansu broker process")
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
    code = 0
    cluster = None
    try:
        if args.broker == "tansu":
            from monolith_jax.stream.broker import BrokerProcess

            cluster = BrokerProcess(die_with_parent=True)  # gone with this process, even on SIGKILL
            bootstrap = cluster.__enter__()
        else:
            cluster = K.EmbeddedKafka()
            bootstrap = cluster.bootstrap
            # The embedded cluster creates a topic (4 partitions) when asked
            # for it; ensure_topics then only checks (its CreateTopics call
            # would wait out a 5 s timeout there first).
            from confluent_kafka import Producer

            probe = Producer(K.client_config(bootstrap))
            for topic in K.TOPICS.values():
                probe.list_topics(topic=topic, timeout=10)
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in K.TOPICS.values()})
        print(f"kafka listening on {bootstrap}", flush=True)
        while not stop.wait(0.5):
            pass
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if cluster is not None:
            cluster.close() if hasattr(cluster, "close") else cluster.__exit__(None, None, None)
        print("kafka stopped", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # At once: no client handle left to log its reconnects to the closed
        # cluster, no finalizing under the thread still reading stdin.
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
