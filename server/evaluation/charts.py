"""One bar chart per task: each model's score on the task's first metric, with its standard error as an
error bar, written as PNG and SVG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_charts(results: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """results: model -> lm-eval's results by task. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    models = list(results)
    for task in next(iter(results.values())):
        metric = _headline_metric(results[models[0]][task])
        if metric is None:
            continue
        name, _, filter_name = metric.partition(",")
        values = [float(results[m][task].get(metric, 0.0)) for m in models]
        errors = [_number(results[m][task].get(f"{name}_stderr,{filter_name}")) for m in models]
        figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * len(models) + 1.5), 3.6))
        axes.bar(models, values, yerr=errors, capsize=4, color=["#888888", *["#3b75af"] * (len(models) - 1)])
        axes.set_title(f"{task}: {name}")
        axes.set_ylabel(name)
        axes.set_ylim(0, max(1.0, max(v + e for v, e in zip(values, errors, strict=True)) * 1.1))
        for index, value in enumerate(values):
            axes.text(index, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        figure.tight_layout()
        for suffix in ("png", "svg"):
            path = out_dir / f"{task}.{suffix}"
            figure.savefig(path, dpi=120)
            written.append(path)
        plt.close(figure)
    return written


def _headline_metric(task_results: dict[str, Any]) -> str | None:
    """The task's first metric (lm-eval lists them as configured), not a stderr nor our ECE."""
    for key, value in task_results.items():
        if (
            "," in key
            and "_stderr" not in key
            and not key.startswith("ece")
            and isinstance(value, int | float)
        ):
            return key
    return None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
