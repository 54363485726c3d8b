"""python -m bench.replicas: how routing decides device-slot loads across replicas.

M adapters with Zipf popularity (exponent 1) over N replicas of S device slots each, every replica holding
its slots with the engine's own policy (`SlotPool`: LRU among adapters no running request uses). Requests
arrive at 80% of the replicas' capacity (C requests in flight each, all of one length), and are routed
- round-robin, or
- by adapter affinity, as Ray Serve's multiplexing and the inference gateway's lora-affinity scorer do: to
  the least loaded replica that holds the adapter while it has room, else to the least loaded replica.
Printed: slot loads per 1,000 requests, slot hit rate, and the busiest replica's share of requests against
a fair share (affinity concentrates a popular adapter's traffic). The first 20% of requests warm the slots
and are not counted. A model of routing, not of speed: what a load costs is in docs/performance.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from adapterd.server.engine.adapter_slots import LoadedAdapter, SlotPool

SLOTS = 16  # --max-gpu-adapters' default
IN_FLIGHT = 8  # requests a replica runs at once
LOAD = 0.8  # arrivals as a fraction of the replicas' capacity
WARM_UP = 0.2


@dataclass(frozen=True)
class Outcome:
    policy: str
    replicas: int
    adapters: int
    loads_per_1000: float
    hit_rate: float
    busiest_share_vs_fair: float  # the busiest replica's requests / (all requests / replicas)


class Replica:
    def __init__(self, slots: int) -> None:
        self.pool = SlotPool(slots)
        self.running: list[tuple[float, int]] = []  # (finish time, adapter)
        self.served = 0

    def holds(self, adapter: int) -> bool:
        return cast(LoadedAdapter, adapter) in self.pool.resident

    def finish_until(self, now: float) -> None:
        while self.running and self.running[0][0] <= now:
            _, adapter = heapq.heappop(self.running)
            self.pool.release(cast(LoadedAdapter, adapter))

    def start(self, adapter: int, now: float, length: float) -> bool:
        """Run the request; whether its adapter was already in a slot."""
        hit = self.holds(adapter)
        self.pool.acquire(cast(LoadedAdapter, adapter))
        start = max(now, self.running[0][0]) if len(self.running) >= IN_FLIGHT else now  # queue if full
        if len(self.running) >= IN_FLIGHT:
            _, done = heapq.heappop(self.running)
            self.pool.release(cast(LoadedAdapter, done))
        heapq.heappush(self.running, (start + length, adapter))
        self.served += 1
        return hit


def route(policy: str, replicas: list[Replica], adapter: int, index: int) -> Replica:
    if policy == "round-robin":
        return replicas[index % len(replicas)]
    holders = [r for r in replicas if r.holds(adapter) and len(r.running) < IN_FLIGHT]
    return min(holders or replicas, key=lambda r: len(r.running))


def simulate(policy: str, num_replicas: int, num_adapters: int, num_requests: int, seed: int = 0) -> Outcome:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_adapters + 1)
    adapters = rng.choice(num_adapters, size=num_requests, p=weights / weights.sum())
    replicas = [Replica(SLOTS) for _ in range(num_replicas)]
    length = 1.0
    gap = length / (num_replicas * IN_FLIGHT * LOAD)
    counted = int(num_requests * WARM_UP)
    loads = hits = 0
    for i, adapter in enumerate(adapters.tolist()):
        now = i * gap
        for replica in replicas:
            replica.finish_until(now)
        if i == counted:
            for replica in replicas:
                replica.served = 0
        hit = route(policy, replicas, adapter, i).start(adapter, now, length)
        if i >= counted:
            hits += hit
            loads += not hit
    measured = num_requests - counted
    busiest = max(r.served for r in replicas) / (measured / num_replicas)
    return Outcome(policy, num_replicas, num_adapters, 1000 * loads / measured, hits / measured, busiest)


def zipf_mass(num_adapters: int, top: int) -> float:
    """The share of requests for the `top` most popular adapters."""
    weights = 1.0 / np.arange(1, num_adapters + 1)
    return float(weights[:top].sum() / weights.sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results-replicas.json"))
    args = parser.parse_args(argv)
    outcomes: list[dict[str, Any]] = []
    print(
        f"{SLOTS} slots per replica, {IN_FLIGHT} requests in flight each, Zipf(1) popularity, {args.requests} requests"
    )
    print(
        f"{'N':>3} {'M':>6} {'policy':<12} {'loads/1k':>9} {'hit rate':>9} {'busiest':>8} {'top N*S mass':>13}"
    )
    for replicas in (2, 8, 32):
        for adapters in (100, 1_000, 10_000):
            for policy in ("round-robin", "affinity"):
                outcome = simulate(policy, replicas, adapters, args.requests)
                mass = zipf_mass(adapters, replicas * SLOTS if policy == "affinity" else SLOTS)
                outcomes.append({**asdict(outcome), "zipf_mass_of_cached_set": mass})
                print(
                    f"{replicas:>3} {adapters:>6} {policy:<12} {outcome.loads_per_1000:>9.1f} "
                    f"{outcome.hit_rate:>9.3f} {outcome.busiest_share_vs_fair:>7.2f}x {mass:>13.3f}"
                )
    args.out.write_text(json.dumps({"slots": SLOTS, "in_flight": IN_FLIGHT, "outcomes": outcomes}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
