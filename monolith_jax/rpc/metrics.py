"""Prometheus metrics of the servers (serving PS, predictor, training PS).

    monolith serving-ps ... --metrics-port 9100     # then GET http://127.0.0.1:9100/metrics

Off by default; `--metrics-port P` serves them on 127.0.0.1 only (P = 0:
any free port, printed). Every server exposes:

    monolith_rpc_requests_total{method, code}   RPCs answered, by method ("ServingPS/Push") and status
    monolith_rpc_seconds{method}                latency histogram
    monolith_refusals_total{reason}             requests refused or work dropped, by reason
                                                (limits, stale or abandoned pushes, non-finite deltas, ...)

and, by server, live values read at each scrape: rows per table
(`monolith_table_rows{table}`), the sync lag (`monolith_sync_lag_seconds`:
seconds since the last applied push, or since the start before the first),
staged pushes and open rounds with their bytes, dense versions. Each
server has its own registry, so several servers in one process do not mix.
"""

from __future__ import annotations

import math

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = Counter("monolith_rpc_requests", "RPCs answered, by method and status code",
                                 ["method", "code"], registry=self.registry)
        self._latency = Histogram("monolith_rpc_seconds", "RPC latency in seconds, by method", ["method"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self._live: list = []    # (kind, name, help, label, fn)
        self._http = None
        self.port = None
        self.registry.register(_Live(self._live))

    def observe(self, method: str, code: str, seconds: float) -> None:
        self._requests.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)

    def gauge(self, name: str, help_: str, fn, label: str | None = None) -> None:
        """A value read at each scrape: fn() -> number, or {label value: number}."""
        self._live.append(("gauge", name, help_, label, fn))

    def counter(self, name: str, help_: str, fn, label: str | None = None) -> None:
        """A count read at each scrape (exposed as NAME_total)."""
        self._live.append(("counter", name, help_, label, fn))

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int) -> int:
        """Serves /metrics on 127.0.0.1:port (0: any free port); returns the port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port = self._http.server_address[1]
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _Live:
    def __init__(self, entries: list):
        self._entries = entries

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for kind, name, help_, label, fn in list(self._entries):
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_, labels=[label] if label else None)
            try:
                value = fn()
            except Exception:  # a scrape never fails for one value
                continue
            if label:
                for key, v in dict(value).items():
                    family.add_metric([str(key)], float(v))
            elif value is not None and not (isinstance(value, float) and math.isnan(value)):
                family.add_metric([], float(value))
            yield family


def refusals(counts: dict, lock=None):
    """A scrape-time copy of a reason -> count dict (under `lock`)."""
    def read():
        if lock is None:
            return dict(counts)
        with lock:
            return dict(counts)
    return read


def start(metrics_port: int | None, setup) -> Metrics:
    """A server's metrics: `setup(metrics)` adds its live values; served
    over HTTP when `metrics_port` is not None."""
    m = Metrics()
    setup(m)
    if metrics_port is not None:
        m.serve(metrics_port)
    return m
