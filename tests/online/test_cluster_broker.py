"""The launcher refuses several trainers on librdkafka's embedded cluster
(its coordinator refuses commits during a rebalance: examples trained
twice) and says which broker to use; one trainer, or a broker process, is
fine."""

import json

import pytest

from monolith_jax.distributed import cluster
from monolith_jax.stream import kafka as K


def test_several_trainers_on_the_embedded_cluster_are_refused_before_anything_starts(tmp_path):
    lines = []
    with K.EmbeddedKafka() as kafka:
        assert K.is_embedded(kafka.bootstrap)
        cfg = {"job": "tests.jobs.shop:job", "bootstrap": kafka.bootstrap, "ps": 1, "trainers": 2,
               "run_dir": str(tmp_path / "run")}
        with pytest.raises(cluster.EmbeddedClusterRefused, match="BrokerProcess"):
            cluster.run_local(cfg, out=lines.append)
        assert lines == [] and not (tmp_path / "run").exists(), "no shard or trainer was started"
        with pytest.raises(cluster.EmbeddedClusterRefused, match="embedded cluster"):
            cluster.run_role({**cfg, "ps": ["127.0.0.1:1"], "coordinator": "127.0.0.1:2"}, "trainer:1")
        path = tmp_path / "cluster.json"
        path.write_text(json.dumps(cfg))
        with pytest.raises(SystemExit, match="monolith cluster: .*embedded cluster.*Use a Kafka broker"):
            cluster.main(["--config", str(path)])
        cluster.check_broker({**cfg, "trainers": 1})  # one trainer: fine


def test_a_broker_process_is_not_taken_for_the_embedded_cluster(tansu_broker):
    assert not K.is_embedded(tansu_broker)
    cluster.check_broker({"bootstrap": tansu_broker, "trainers": 2})
    assert not K.is_embedded("127.0.0.1:1", timeout_s=1), "no broker there: not the embedded cluster either"
