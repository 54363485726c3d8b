"""`register_if`: whether a trained adapter beats the base model by enough to be registered.

The gate reads the job's metrics: lm-eval results for a task of `eval_tasks` (`metrics["tasks"]`), or the
held-out scores for the task "held_out". A metric is lm-eval's key ("acc,none") or its name alone ("acc")
when the task reports it under one filter only.
"""

from __future__ import annotations

from typing import Any

from adapterd.server.trainer.config import HELD_OUT

TOLERANCE = 1e-9  # 0.5 - 0.4 is 0.0999...: a delta equal to min_delta passes


class GateError(ValueError):
    """The gate names a metric the task does not report."""


def decide(gate: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The outcome: {task, metric, base, adapter, delta, min_delta, passed}, `metric` as found."""
    task, metric = gate["task"], gate["metric"]
    if task == HELD_OUT:
        base, adapter = float(metrics["base"][metric]), float(metrics["adapter"][metric])
    else:
        tasks = metrics.get("tasks") or {}
        metric = _key(tasks.get("base", {}).get(task, {}), task, metric)
        base, adapter = float(tasks["base"][task][metric]), float(tasks["adapter"][task][metric])
    delta = adapter - base
    passed = delta >= gate["min_delta"] - TOLERANCE
    return {
        "task": task,
        "metric": metric,
        "base": base,
        "adapter": adapter,
        "delta": delta,
        "min_delta": gate["min_delta"],
        "passed": passed,
    }


def _key(results: dict[str, Any], task: str, metric: str) -> str:
    scores = sorted(k for k, v in results.items() if "_stderr" not in k and isinstance(v, int | float))
    if metric in scores:
        return metric
    matching = [k for k in scores if k.partition(",")[0] == metric]
    if len(matching) == 1:
        return matching[0]
    if matching:
        raise GateError(
            f"register_if: {task} reports {metric} under several filters ({', '.join(matching)}); name one"
        )
    reported = ", ".join(scores) or "no metrics"
    raise GateError(f"register_if: {task} does not report {metric!r}; it reports {reported}")


def rejection(outcome: dict[str, Any]) -> str:
    """Why the adapter was not registered, with both scores."""
    return (
        f"not registered: on {outcome['task']}, {outcome['metric']} is {outcome['adapter']:.4f} for the adapter "
        f"and {outcome['base']:.4f} for the base model (delta {outcome['delta']:+.4f}); register_if asks for "
        f"min_delta {outcome['min_delta']:+.4f}"
    )
