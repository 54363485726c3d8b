"""Prometheus metrics, on a registry of their own (one per server, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TierCounts = Callable[[], dict[str, tuple[int, int]]]  # tier -> (loads, evictions), read at scrape time
PrefixCounts = Callable[
    [], tuple[int, int, int]
]  # (prompt tokens admitted, of them cache hits, cached blocks)


class AdapterTierCollector(Collector):
    def __init__(self, counts: TierCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        loads = CounterMetricFamily("adapterd_adapter_loads", "Adapter loads into a tier", labels=["tier"])
        evictions = CounterMetricFamily("adapterd_adapter_evictions", "Adapter evictions", labels=["tier"])
        for tier, (num_loads, num_evictions) in self.counts().items():
            loads.add_metric([tier], num_loads)
            evictions.add_metric([tier], num_evictions)
        yield loads
        yield evictions


class PrefixCacheCollector(Collector):
    def __init__(self, counts: PrefixCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        queried, hits, blocks = self.counts()
        yield CounterMetricFamily(
            "adapterd_prefix_cache_queries", "Prompt tokens admitted (looked up in the prefix cache)", queried
        )
        yield CounterMetricFamily(
            "adapterd_prefix_cache_hits", "Prompt tokens taken from the prefix cache", hits
        )
        yield GaugeMetricFamily(
            "adapterd_prefix_cache_hit_rate",
            "Prefix cache hits / queries since start",
            hits / queried if queried else 0.0,
        )
        yield GaugeMetricFamily(
            "adapterd_prefix_cache_blocks", "KV blocks findable in the prefix cache", blocks
        )


def adapter_label(adapter_id: str) -> str:
    """The `adapter` label of a request's series: a public adapter by its id, a tenant's adapters as one
    `tenant/*` series, as `/metrics` is open to any scraper and a tenant's adapter names are its own."""
    tenant, slash, _ = adapter_id.rpartition("/")
    return f"{tenant}/*" if slash else adapter_id


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adapterd_requests",
            "Generation requests by adapter (tenant adapters: per tenant)",
            ["adapter"],
            registry=r,
        )
        self.generated_tokens = Counter("adapterd_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("adapterd_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("adapterd_running_batch_size", "Sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "adapterd_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=r
        )

    def watch(
        self,
        queue_depth: Callable[[], float],
        running: Callable[[], float],
        tiers: TierCounts,
        prefix_cache: PrefixCounts,
    ) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        self.registry.register(AdapterTierCollector(tiers))
        self.registry.register(PrefixCacheCollector(prefix_cache))

    def render(self) -> bytes:
        return generate_latest(self.registry)
