"""The one-hop predictor (`monolith predictor --tables local`): it holds the
serving tables itself and takes the trainer's pushes on its own port, as a
serving PS does; it answers as the trainer does. Restarted with
`--snapshot-dir`, it gets only the rows changed since the snapshot. The
shop job (not MovieLens), real predictor processes."""

import time

import numpy as np

from monolith_jax.serving.sync import SyncPusher
from tests.jobs.test_shop_job import Server, assert_rows_found, own_predictions, requests_of, trained_export


def served(address, cols, n):
    from monolith_jax.serving.predictor import PredictorClient

    client = PredictorClient(address)
    try:
        deadline = time.monotonic() + 60   # the dense params pushed are polled in (every 0.5 s)
        while client.info()[1]["dense_version"] == 0:
            assert time.monotonic() < deadline, "the predictor never took the pushed dense params"
            time.sleep(0.1)
        out = np.concatenate([client.predict(requests_of(cols, range(s, min(s + 100, n)))) for s in range(0, n, 100)])
        assert_rows_found(client)
        return out
    finally:
        client.close()


def test_one_hop_predictor_takes_pushes_and_answers_as_the_trainer(tmp_path):
    from monolith_jax.serving.export import dense_arrays
    from monolith_jax.snapshot import Snapshots

    job, trainer, model, test_path, cols = trained_export(tmp_path, 6000, 600)
    train_path = tmp_path / "train.parquet"
    snaps = Snapshots(str(tmp_path / "snaps"), every_s=None)
    n = 300
    dense = lambda: (dense_arrays(trainer.params), 1.0)  # noqa: E731
    try:
        pred = Server("predictor", "--model", model, "--tables", "local", "--port", 0)
        try:
            pusher = SyncPusher(trainer.tables, pred.address, "shop-0", dense_source=dense)
            assert pusher.push_once() and pusher.push_dense() and pusher.stats["full_copies"] == 1
            np.testing.assert_allclose(served(pred.address, cols, n), own_predictions(trainer, test_path, n),
                                       rtol=1e-4, atol=1e-6)
            pusher.stop(final_push=False)
        finally:
            pred.stop()
        assert pred.proc.returncode == 0, "".join(pred.lines[-30:])
        # A snapshot, more training, and a predictor restarted from the snapshot.
        assert snaps.save(trainer.step_count, trainer, {}) and snaps.wait() is not None
        for i, batch in enumerate(job.batches(str(train_path))):
            if i == 8:
                break
            trainer.train_step_host(batch)
        pred = Server("predictor", "--model", model, "--tables", "local", "--port", 0,
                      "--snapshot-dir", tmp_path / "snaps")
        try:
            pusher = SyncPusher(trainer.tables, pred.address, "shop-0", dense_source=dense)
            assert pusher.push_once() and pusher.push_dense()
            assert pusher.stats["full_copies"] == 0 and pusher.stats["since_snapshot"] == 1
            assert 0 < pusher.stats["rows"] < len(trainer.tables["ids"])
            np.testing.assert_allclose(served(pred.address, cols, n), own_predictions(trainer, test_path, n),
                                       rtol=1e-4, atol=1e-6)
            pusher.stop(final_push=False)
        finally:
            pred.stop()
    finally:
        snaps.close()


def test_snapshot_dir_without_local_tables_is_refused(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "monolith_jax.serving.predictor", "--model", str(tmp_path),
                           "--serving-ps", "127.0.0.1:1", "--snapshot-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--tables local" in done.stderr, done.stderr[-2000:]
