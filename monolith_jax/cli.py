"""`monolith`: one command, a subcommand per process.

    monolith train        --job MODULE:NAME (--data FILE... | --bootstrap HOST:PORT)
    monolith join         --bootstrap HOST:PORT [--job MODULE:NAME]
    monolith replay       --job MODULE:NAME --bootstrap HOST:PORT [--data LOG...]
    monolith serving-ps   --model DIR [--snapshot-dir DIR]
    monolith predictor    --model DIR --serving-ps HOST:PORT
    monolith training-ps  --job MODULE:NAME --shard I --shards N
    monolith cluster      --config cluster.json [--role ps:I | trainer:J]
    monolith demo         --job MODULE:NAME [--data LOG...] [--quick]
    monolith kafka        [--broker embedded|tansu]

`monolith SUBCOMMAND --help` lists every option with its default. A job is
named as `MODULE:NAME` (see `monolith_jax.job`); the serving PS and the
predictor read what they need from the exported model instead.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose main(argv) runs it, one line of help)
COMMANDS = {
    "train": ("monolith_jax.online.train", "train a job's model from files or from the examples topic"),
    "join": ("monolith_jax.stream.joiner", "join features and actions into labelled examples"),
    "replay": ("monolith_jax.stream.replay", "replay a time-stamped log (or the job's source) into Kafka"),
    "serving-ps": ("monolith_jax.serving.serving_ps", "serve the tables' rows and the dense params"),
    "predictor": ("monolith_jax.serving.predictor", "serve predictions of an exported model"),
    "training-ps": ("monolith_jax.distributed.training_ps", "one training parameter-server shard of a job"),
    "cluster": ("monolith_jax.distributed.cluster", "start a job's shards and trainers"),
    "demo": ("monolith_jax.online.demo", "the whole loop of a job for a few minutes: replay, join, train, "
                                         "sync, serve, kill and resume"),
    "kafka": ("monolith_jax.stream.kafka_server", "a local Kafka cluster (embedded or a tansu broker) until stopped"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.split("\n\n")[0], "", "usage: monolith SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`monolith SUBCOMMAND --help` for its options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"monolith: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
