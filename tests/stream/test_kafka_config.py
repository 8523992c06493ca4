"""The user's librdkafka properties file (MONOLITH_KAFKA_CONFIG): parsed
strictly, applied to every client, never over what a component needs."""

import pytest

from monolith_jax.stream import kafka as K


def test_the_file_applies_to_every_client_below_what_components_need(tmp_path, monkeypatch):
    path = tmp_path / "client.properties"
    path.write_text("# security for a real cluster\n\n"
                    "security.protocol = SASL_SSL\n! a Java-style comment\n"
                    "sasl.mechanism=PLAIN\nlinger.ms=50\nsession.timeout.ms=30000\n"
                    "group.id=not-this-one\nenable.auto.offset.store=true\nbootstrap.servers=elsewhere:9092\n")
    monkeypatch.setenv(K.CONFIG_ENV, str(path))
    prod = K.producer_config("127.0.0.1:9092")
    cons = K.consumer_config("127.0.0.1:9092", "trainers")
    for conf in (prod, cons):
        assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "PLAIN"
        assert conf["bootstrap.servers"] == "127.0.0.1:9092"   # the command line's address
    assert prod["linger.ms"] == "50"                 # a tunable: the user's value
    assert cons["session.timeout.ms"] == "30000"
    assert cons["group.id"] == "trainers"            # what the component needs: ours
    assert cons["enable.auto.offset.store"] is False
    monkeypatch.delenv(K.CONFIG_ENV)
    assert K.producer_config("b:1")["linger.ms"] == 10 and "security.protocol" not in K.producer_config("b:1")


@pytest.mark.parametrize("text, named", [("just-a-key\n", "expected key=value"), ("=value\n", "expected key=value")])
def test_a_malformed_line_is_refused_naming_it(tmp_path, monkeypatch, text, named):
    path = tmp_path / "bad.properties"
    path.write_text("linger.ms=5\n" + text)
    monkeypatch.setenv(K.CONFIG_ENV, str(path))
    with pytest.raises(ValueError, match=f"bad.properties:2: {named}"):
        K.producer_config("b:1")


def test_a_missing_file_is_refused_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(K.CONFIG_ENV, str(tmp_path / "nope.properties"))
    with pytest.raises(ValueError, match="MONOLITH_KAFKA_CONFIG=.*nope.properties"):
        K.consumer_config("b:1", "g")


def test_a_real_client_reads_the_embedded_cluster_with_the_file(tmp_path, monkeypatch):
    from confluent_kafka import Consumer, Producer

    path = tmp_path / "client.properties"
    path.write_text("client.id=from-the-file\n")
    monkeypatch.setenv(K.CONFIG_ENV, str(path))
    with K.EmbeddedKafka() as kafka:
        K.check_reachable(kafka.bootstrap)
        prod = Producer(K.producer_config(kafka.bootstrap))
        prod.produce("cfg", b"v")
        prod.flush(10)
        cons = Consumer(K.consumer_config(kafka.bootstrap, "g"))
        cons.subscribe(["cfg"])
        got = []
        for _ in range(200):
            got += [m.value() for m in cons.consume(10, 0.05) if not m.error()]
            if got:
                break
        cons.close()
        assert got == [b"v"]
