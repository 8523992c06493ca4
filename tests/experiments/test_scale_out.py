"""The scale-out benchmark, small: it measures the local table and sharded tables, and estimates."""

from experiments.scale_out import run


def test_throughput_and_estimate():
    r = run.throughput(shard_counts=(1, 2), dim=8, batch_ids=2048, steps=4, vocab=5000, out=lambda *a: None)
    assert r["local"]["ids_per_s"] > 0 and r["shards_1"]["ids_per_s"] > 0 and r["shards_2"]["vs_local"] > 0
    e = run.estimate(r)
    assert e["machines_for_memory"] > 1 and e["shards_for_target"] >= 1
