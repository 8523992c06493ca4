"""Replay -> join -> online training of any job, in this process.

    run_pipeline(job, messages)      # an object with messages(), or an iterable

With no `bootstrap`, librdkafka's built-in cluster starts inside this
process; with it, that cluster is used. The joiner runs as its own process
(`monolith join`) with the job's `LabelRule`; the replayer runs in a
thread; the job's model trains here, scoring each batch before training on
it (prequential). Experiments and tests use it; `monolith demo`
(`online/demo.py`) runs the whole loop in processes, serving included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from monolith_jax.stream import kafka as K

JOINER_START_S = 120.0  # the joiner process's imports and its group's first assignment


def joiner_command(bootstrap: str, group: str, labels, topics: dict | None = None, window_s: float | None = None,
                   negative_rate: float | None = None, idle_flush_s: float = 3.0, gate_group: str | None = None,
                   emit_positives: str = "at_window_end", exit_when_idle: bool = True,
                   lateness_s: float = 1.0, job_spec: str | None = None,
                   upstream_ends_with_stdin: bool = False) -> list:
    """The `monolith join` process for a job's `LabelRule` (flags override
    it); with `job_spec` (MODULE:NAME) the joiner also reads the job's dense
    features (a declared fill lets a missing value through). Rules by head
    name (a job with heads) come from the job itself: `job_spec` is then
    needed, and `window_s` and `negative_rate` do not apply."""
    cmd = [sys.executable, "-m", "monolith_jax.cli", "join", "--bootstrap", bootstrap, "--group", group,
           "--lateness", str(lateness_s)]
    if isinstance(labels, dict):
        if not job_spec or window_s is not None or negative_rate is not None:
            raise ValueError("a job with a label rule per head is joined by its own rules: give job_spec, "
                             "and no window_s or negative_rate")
    else:
        cmd += ["--window", str(labels.window_s if window_s is None else window_s),
                "--positive", ",".join(labels.positive), f"--min-value={labels.min_value}",
                "--negative-rate", str(labels.negative_rate if negative_rate is None else negative_rate)]
    cmd += ["--idle-flush", str(idle_flush_s), "--report-every", "0",
           # A replay packs sessions into seconds: emitting at window end keeps
           # each request's label from reaching the model before the negatives
           # served beside it (delayed-feedback bias). "on_action" is freshest.
           "--emit-positives", emit_positives]
    if exit_when_idle:
        cmd.append("--exit-when-idle")
    if upstream_ends_with_stdin:  # the launcher closes the joiner's stdin once the replay is all in Kafka
        cmd.append("--upstream-ends-with-stdin")
    if job_spec:
        cmd += ["--job", job_spec]
    if gate_group:
        cmd += ["--gate-group", gate_group]
    for name, topic in (topics or {}).items():
        cmd += [f"--topic-{name.replace('_', '-')}", topic]
    return cmd


def run_pipeline(job, messages, bootstrap: str | None = None, batch_size: int | None = None,
                 negative_rate: float | None = None, window_s: float | None = None, speed: float = 0.0,
                 seed: int = 0, metrics_path: str | None = None, out=print, report_every_s: float = 5.0,
                 topics: dict | None = None, trainer=None, on_batch=None, emit_positives: str = "at_window_end",
                 describe: str | None = None, prequential: bool = True) -> dict:
    """Replays `messages` (an object with `messages()`, or an iterable of
    (kind, request id, value, event ms)) through Kafka, the joiner and an
    online trainer of `job`; returns the trainer's summary with the
    replayer's and the joiner's counts."""
    from monolith_jax.online.trainer import OnlineTrainer
    from monolith_jax.stream.joiner import warn_if_unlabelled
    from monolith_jax.stream.join_state import JoinConfig
    from monolith_jax.stream.replay import replay

    topics = {**K.TOPICS, **(topics or {})}
    embedded = None
    if not bootstrap:
        embedded = K.EmbeddedKafka()
        bootstrap = embedded.bootstrap
        out(f"embedded Kafka cluster (librdkafka's built-in) at {bootstrap}")
    try:
        K.ensure_topics(bootstrap, {t: K.EMBEDDED_PARTITIONS for t in topics.values()})
        if describe:
            out(describe)
        group = f"monolith-{os.getpid()}-{int(time.time())}"
        joiner = subprocess.Popen(joiner_command(bootstrap, group + "-joiner", job.labels, topics, window_s,
                                                 negative_rate, gate_group=group + "-trainer",
                                                 emit_positives=emit_positives, upstream_ends_with_stdin=True),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        joiner_lines: list = []
        assigned = threading.Event()

        def reading():
            for line in joiner.stdout:
                joiner_lines.append(line)
                if line.startswith("joiner assigned "):
                    assigned.set()

        reader = threading.Thread(target=reading, daemon=True)
        reader.start()
        stop = threading.Event()
        replayed: dict = {}

        def replaying():
            try:
                replayed.update(replay(bootstrap, messages, topics, speed, report_every_s=0, stop=stop,
                                       gate_group=group + "-joiner", max_lag_bytes=lag_bytes))
            finally:  # every message is in Kafka (replay flushes): the joiner decides the rest once it has read them
                joiner.stdin.close()

        # The embedded cluster keeps ~5 MB a partition: the replay stays
        # 3/4 of that ahead of the joiner's commits, which trail its reads.
        lag_bytes = K.EMBEDDED_PARTITION_BYTES * K.EMBEDDED_PARTITIONS * 3 // 4 if embedded is not None else None
        # The trainer compiles its steps (every batch size) while the joiner
        # starts; the replay begins once both are ready, so neither the
        # first examples' compiles nor the joiner's start sit in the stream.
        try:
            trainer = trainer or job.make_trainer(seed, metrics_path=metrics_path, out=out, log_every=0)
            online = OnlineTrainer(trainer, bootstrap, topics, group + "-trainer",
                                   batch_size=batch_size or job.batch_size, out=out, prequential=prequential,
                                   warmup=True)
            online.on_batch = on_batch
            deadline = time.monotonic() + JOINER_START_S
            while not assigned.wait(0.05):
                if joiner.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the joiner {'exited' if joiner.poll() is not None else 'did not start'} "
                                       f"before its partitions were assigned:\n" + "".join(joiner_lines[-30:]))
        except BaseException:
            joiner.kill()
            joiner.wait(10)
            reader.join(5)
            raise
        replayer = threading.Thread(target=replaying, daemon=True)
        replayer.start()
        try:
            summary = online.run(idle_timeout_s=3.0, report_every_s=report_every_s,
                                 upstream_done=lambda: joiner.poll() is not None and not replayer.is_alive())
        finally:
            stop.set()
            if joiner.poll() is None:
                joiner.terminate()
            joiner.wait(30)
            reader.join(5)
        joined = next((json.loads(line.split(" ", 2)[2]) for line in reversed(joiner_lines)
                       if line.startswith("joiner done ")), None)
        if joined is None:
            raise RuntimeError("the joiner did not finish cleanly:\n" + "".join(joiner_lines[-30:]))
        rule = job.labels
        warning = warn_if_unlabelled(joined, JoinConfig(window_s=rule.window_s, positive_types=rule.positive,
                                                        min_value=rule.min_value))
        if warning:
            out(warning)
        lost = {"joiner": int(joined.get("offsets_lost", 0)), "trainer": int(summary.get("offsets_lost", 0))}
        if any(lost.values()):
            out(f"messages the cluster's retention deleted before they were read: {lost['joiner']:,} by the joiner, "
                f"{lost['trainer']:,} by the trainer (offsets_lost); the replay ran further ahead than the topics keep")
        summary.update({"replayed": replayed, "joined": joined, "segment_aucs": online.log.segment_aucs(10),
                        "bootstrap": bootstrap})
        summary["online"] = online
        return summary
    finally:
        if embedded is not None:
            embedded.close()


