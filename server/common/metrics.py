"""Prometheus metrics, on a registry of their own (one per server, so tests can run several)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now, as the inference gateway's endpoint picker reads it."""

    waiting: int  # requests not yet admitted to the batch
    running: int  # sequences in the running batch
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    max_lora: int  # adapters the device slots hold at once
    running_adapters: tuple[str, ...]  # adapters in device slots, ready to serve
    waiting_adapters: tuple[str, ...]  # adapters that waiting requests ask for


class GatewayCollector(Collector):
    """The series the Gateway API Inference Extension's endpoint picker (and llm-d's) reads, by vLLM's names:
    the picker scores replicas by queue, KV-cache use and which adapters each holds (`lora-affinity`).
    `vllm:lora_requests_info` is one series whose value is the time it was written (the picker keeps the
    latest) and whose labels list adapters comma-separated, without spaces (the picker splits on ",")."""

    def __init__(self, load: Callable[[], EngineLoad]) -> None:
        self.load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self.load()
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for admission", load.waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "Sequences in the running batch", load.running)
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)", load.kv_cache_usage
        )
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Adapters in device slots (running) and asked for by waiting requests; value: time written",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        labels = [str(load.max_lora), ",".join(load.running_adapters), ",".join(load.waiting_adapters)]
        info.add_metric(labels, time.time())
        yield info


def adapter_label(adapter_id: str) -> str:
    """The `adapter` label of a request's series: a public adapter by its id, a tenant's adapters as one
    `tenant/*` series, as `/metrics` is open to any scraper and a tenant's adapter names are its own."""
    tenant, slash, _ = adapter_id.rpartition("/")
    return f"{tenant}/*" if slash else adapter_id


class Metrics:
    def __init__(self, replica: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        info = Gauge(
            "adapterd_replica", "This replica (its name also in X-Adapterd-Replica)", ["replica"], registry=r
        )
        info.labels(replica=replica).set(1)
        self.requests = Counter(
            "adapterd_requests",
            "Generation requests by adapter (tenant adapters: per tenant)",
            ["adapter"],
            registry=r,
        )
        self.generated_tokens = Counter("adapterd_generated_tokens", "Tokens generated", registry=r)
        self.adapter_tokens = Counter(
            "adapterd_adapter_generated_tokens",
            "Tokens generated by adapter (tenant adapters: per tenant)",
            ["adapter"],
            registry=r,
        )
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
        load: Callable[[], EngineLoad],
    ) -> None:
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        self.registry.register(AdapterTierCollector(tiers))
        self.registry.register(PrefixCacheCollector(prefix_cache))
        self.registry.register(GatewayCollector(load))

    def render(self) -> bytes:
        return generate_latest(self.registry)
