"""Kafka for the online tests: the embedded cluster, and a broker in its own
process (`monolith_jax.stream.broker`: tansu from PyPI, a real
Kafka-protocol broker with memory storage)."""

import pytest

from monolith_jax.stream.broker import BrokerProcess


def pytest_collection_modifyitems(items):
    """The README's blocks first: one test a file, minutes each, mostly
    waiting on processes. Collected last (tests/test_readme.py), they ran
    alone at the end while the other worker sat idle; first, the other
    tests fill in beside them. The two stay adjacent, so one worker starts
    both files' runs together (tests/test_readme.py's file_runs)."""
    first = [item for item in items if item.nodeid.startswith("tests/test_readme.py::test_every_block_runs")]
    if first:
        items[:] = first + [item for item in items if item not in first]


@pytest.fixture
def tansu_broker():
    """bootstrap address of a tansu broker running in its own process."""
    with BrokerProcess() as bootstrap:
        yield bootstrap
