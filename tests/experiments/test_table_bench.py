"""The table benchmark end to end on a tiny workload."""

from experiments.table_bench.bench import BenchConfig, run


def test_tiny_benchmark_runs_and_reports_every_figure():
    lines = []
    cfg = BenchConfig(universe=20_000, batch=2048, min_resident=5_000, batches=2, dict_batches=1, dims=(8,))
    (r,) = run(cfg, out=lines.append)
    for key in ("lookup_host", "lookup_jit", "lookup_numpy", "lookup_dict",
                "apply_host", "apply_jit", "apply_numpy", "apply_dict"):
        assert r[key] > 0, key
    assert r["resident"] >= 5_000
    assert r["payload_per_row"] == 8 * 4 * 2  # values + Adagrad accumulator
    assert any("lookup" in line for line in lines) and any("bytes/row" in line for line in lines)
