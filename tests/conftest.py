"""Kafka for the online tests: the embedded cluster, and a broker in its own
process (`monolith_jax.stream.broker`: tansu from PyPI, a real
Kafka-protocol broker with memory storage)."""

import pytest

from monolith_jax.stream.broker import BrokerProcess


@pytest.fixture
def tansu_broker():
    """bootstrap address of a tansu broker running in its own process."""
    with BrokerProcess() as bootstrap:
        yield bootstrap
