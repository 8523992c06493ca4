"""A job that is not MovieLens (`tests/jobs/shop.py`: integer user and item
ids from one range, string categories, a sequence sharing the item id
space, a dense price with missing cells), run through `monolith` commands
only: train from a Parquet file -> export -> serving PS + predictor answer
as the trainer does; replay -> join -> online train -> sync -> predictor;
`monolith cluster` with 2 shards x 2 trainers trains every example once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np

from experiments.multi_task_stream.run import requests_of  # the shop's log rows as predictor requests
from tests.jobs import shop

JOB = "tests.jobs.shop:job"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MONOLITH = os.path.join(os.path.dirname(sys.executable), "monolith")


def monolith(*args, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([MONOLITH, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"monolith {' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


class Server:
    """A `monolith` server process; `address` once it prints that it listens."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([MONOLITH, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            if " listening on " in line:
                self.address = line.split(" listening on ")[1].split()[0]
                threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise AssertionError("server did not start:\n" + "".join(self.lines[-40:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_from_snapshot(folder):
    """The job's trainer with the newest snapshot's state (the trainer's own view)."""
    from monolith_jax.job import load_job
    from monolith_jax.snapshot import Snapshots

    trainer = load_job(JOB).make_trainer(log_every=0)
    snaps = Snapshots(str(folder))
    assert snaps.restore(trainer) is not None
    snaps.close()
    return trainer


def trained_export(tmp_path, n_train: int, n_test: int):
    """The job trained on a fresh log of n_train examples and exported:
    (job, trainer, model folder, test log path, test columns)."""
    from monolith_jax.job import load_job
    from monolith_jax.serving.export import export_model

    train_path, test_path = tmp_path / "train.parquet", tmp_path / "test.parquet"
    shop.make_log(str(train_path), n=n_train, part=0)
    cols = shop.make_log(str(test_path), n=n_test, part=1)
    job = load_job(JOB)
    trainer = job.make_trainer(log_every=0)
    for batch in job.batches(str(train_path)):
        trainer.train_step_host(batch)
    model = tmp_path / "model"
    export_model(trainer, str(model))
    return job, trainer, model, test_path, cols


def own_predictions(trainer, path, n) -> np.ndarray:
    from monolith_jax.job import load_job

    job = load_job(JOB)
    probs = np.concatenate([trainer.predict(b)[: int(np.sum(b.weights))] for b in job.batches(str(path))])
    return probs[:n]


def assert_rows_found(client):
    """Every id of the requests had a trained row on the serving PS (equal
    answers from rows nobody has would prove nothing)."""
    stats = client.info()[1]
    assert stats["predictions"] > 0 and stats["unknown_ids"] == {"ids": 0}, stats


def assert_served_equal(model, serving_args, trainer, test_path, cols, n=300):
    from monolith_jax.serving.predictor import PredictorClient

    ps = Server("serving-ps", "--model", model, "--port", 0, *serving_args)
    try:
        pred = Server("predictor", "--model", model, "--serving-ps", ps.address, "--port", 0)
        try:
            client = PredictorClient(pred.address)
            served = np.concatenate([client.predict(requests_of(cols, range(s, min(s + 100, n))))
                                     for s in range(0, n, 100)])
            assert_rows_found(client)
            client.close()
        finally:
            pred.stop()
    finally:
        ps.stop()
    own = own_predictions(trainer, test_path, n)
    np.testing.assert_allclose(served, own, rtol=1e-4, atol=1e-6)
    assert np.std(served) > 0.05  # the model tells requests apart
    return served


def test_files_train_export_and_serve_through_commands(tmp_path):
    train, test = tmp_path / "train.parquet", tmp_path / "test.parquet"
    shop.make_log(str(train), n=8000, part=0)
    cols = shop.make_log(str(test), n=2000, part=1)
    out = monolith("train", "--job", JOB, "--data", train, "--epochs", 2, "--validation", test,
                   "--export", tmp_path / "model", "--snapshot-dir", tmp_path / "snaps").stdout
    epochs = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("epoch ")]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[0]["examples"] == 8000
    assert epochs[-1]["auc"] > 0.65, epochs  # the true probabilities score 0.91, chance 0.5; 8,000 rows teach part of it
    trainer = trainer_from_snapshot(tmp_path / "snaps")
    assert len(trainer.tables["ids"]) > 600  # users and items kept apart: one row per (feature, id)
    assert_served_equal(tmp_path / "model", ["--snapshot-dir", tmp_path / "snaps"], trainer, test, cols)


def test_train_on_two_host_devices_updates_as_one_device_does(tmp_path):
    """`monolith train --host-devices 2`: each batch's dense step split over two
    CPU devices of the trainer (the last batch, 1001 % 256 = 233 rows, is odd):
    the same params and rows as one device trained on the same file."""
    from monolith_jax.job import load_job

    train = tmp_path / "train.parquet"
    shop.make_log(str(train), n=1001, part=0)
    out = monolith("train", "--job", JOB, "--data", train, "--host-devices", 2, "--snapshot-dir",
                   tmp_path / "snaps", "--summary", tmp_path / "summary.json").stdout
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["dense_devices"] == 2 and summary["examples"] == 1001, out[-2000:]
    two = trainer_from_snapshot(tmp_path / "snaps")
    job = load_job(JOB)
    one = job.make_trainer(0, log_every=0, placement="host")
    one.fit(job.batches(str(train)))
    assert one.step_count == two.step_count == 4
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for name, t in one.tables.items():
        d1, d2 = t.dump(), two.tables[name].dump()
        o1, o2 = np.argsort(d1["keys"]), np.argsort(d2["keys"])
        np.testing.assert_array_equal(d1["keys"][o1], d2["keys"][o2])
        np.testing.assert_allclose(d1["values"][o1], d2["values"][o2], rtol=1e-5, atol=1e-6)


def test_stream_replay_join_train_sync_and_serve_through_commands(tmp_path):
    from monolith_jax.stream import kafka as K

    log = tmp_path / "log.parquet"
    shop.make_log(str(log), n=5000, part=0)
    test = tmp_path / "test.parquet"
    cols = shop.make_log(str(test), n=500, part=1)
    with K.EmbeddedKafka() as kafka:
        b = kafka.bootstrap
        K.ensure_topics(b, {t: 2 for t in K.TOPICS.values()})
        joiner = subprocess.Popen([MONOLITH, "join", "--job", JOB, "--bootstrap", b, "--idle-flush", "3",
                                   "--exit-when-idle", "--report-every", "0", "--lateness", "1"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        replayed = monolith("replay", "--job", JOB, "--bootstrap", b, "--data", log).stdout
        counts = json.loads(replayed.split("replay done ", 1)[1])
        assert counts["features"] == 5000 and 0 < counts["actions"] < 5000
        joined_out, _ = joiner.communicate(timeout=240)
        assert joiner.returncode == 0, joined_out[-3000:]
        joined = json.loads(joined_out.split("joiner done ", 1)[1].splitlines()[0])
        assert joined["positives"] == counts["actions"] and joined["negatives"] == 5000 - counts["actions"]

        port = free_port()
        ps = None
        trainer = subprocess.Popen([MONOLITH, "train", "--job", JOB, "--bootstrap", b, "--idle-timeout", "6",
                                    "--serving-ps", f"127.0.0.1:{port}", "--sync-interval", "0.5",
                                    "--dense-sync-interval", "1", "--export", tmp_path / "model",
                                    "--snapshot-dir", tmp_path / "snaps", "--summary", tmp_path / "s.json",
                                    "--no-warmup"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        try:
            deadline = time.monotonic() + 120
            while not (tmp_path / "model" / "spec.json").exists():  # the trainer exports at start
                assert trainer.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            ps = Server("serving-ps", "--model", tmp_path / "model", "--port", port)
            trained_out, _ = trainer.communicate(timeout=300)
            assert trainer.returncode == 0, trained_out[-3000:]
            summary = json.loads((tmp_path / "s.json").read_text())
            assert summary["examples"] == 5000  # every joined example, once
            own = trainer_from_snapshot(tmp_path / "snaps")
            from monolith_jax.serving.predictor import PredictorClient

            pred = Server("predictor", "--model", tmp_path / "model", "--serving-ps", ps.address, "--port", 0)
            try:
                client = PredictorClient(pred.address)
                served = client.predict(requests_of(cols, range(200)))
                assert_rows_found(client)
                client.close()
            finally:
                pred.stop()
            np.testing.assert_allclose(served, own_predictions(own, test, 200), rtol=1e-4, atol=1e-6)
        finally:
            if trainer.poll() is None:
                trainer.kill()
            if ps is not None:
                ps.stop()


def test_cluster_two_shards_two_trainers_train_every_example_once(tansu_broker, tmp_path):
    from monolith_jax.stream import kafka as K

    log = tmp_path / "log.parquet"
    shop.make_log(str(log), n=4000, part=0)
    b = tansu_broker
    K.ensure_topics(b, {t: 2 for t in K.TOPICS.values()})
    joiner = subprocess.Popen([MONOLITH, "join", "--job", JOB, "--bootstrap", b, "--idle-flush", "3",
                               "--exit-when-idle", "--report-every", "0", "--lateness", "1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monolith("replay", "--job", JOB, "--bootstrap", b, "--data", log)
    joined_out, _ = joiner.communicate(timeout=240)
    joined = json.loads(joined_out.split("joiner done ", 1)[1].splitlines()[0])
    assert joined["positives"] + joined["negatives"] == 4000
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps({"job": JOB, "bootstrap": b, "ps": 2, "trainers": 2, "group": "shop-cluster",
                                  "run_dir": str(tmp_path / "run"),
                                  "trainer_args": ["--idle-timeout", "8", "--batch", "128", "--no-warmup"]}))
    out = monolith("cluster", "--config", config, timeout=600).stdout
    done = json.loads(out.split("cluster done ", 1)[1].splitlines()[0])
    assert [t["exit"] for t in done["trainers"]] == [0, 0]
    assert sum(t["summary"]["examples"] for t in done["trainers"]) == 4000
    assert all(t["summary"]["examples"] > 0 for t in done["trainers"])
