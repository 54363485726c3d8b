"""What the client commands print: aligned tables and key/value lists for people, JSON for scripts, and a
training job's progress bar."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from adapterd.clients.types import Adapter

BAR_WIDTH = 30


def print_json(value: Any, out: TextIO = sys.stdout) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]  # type: ignore[arg-type]
    out.write(json.dumps(value, ensure_ascii=False) + "\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, under upper-case headers."""
    cells = [[str(h).upper() for h in headers], *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def key_values(values: Mapping[str, Any]) -> str:
    width = max(map(len, values), default=0)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in values.items())


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value) if value else "-"
    return str(value)


def human_bytes(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def adapter_shape(adapter: Adapter) -> str:
    """ "r=8" for a LoRA or DoRA, "vt=20" (virtual tokens) for a soft prompt or prefix, "-" for IA³."""
    if adapter.rank:
        return f"r={adapter.rank}"
    return f"vt={adapter.num_virtual_tokens}" if adapter.num_virtual_tokens else "-"


def adapters_table(adapters: Sequence[Adapter]) -> str:
    if not adapters:
        return "no adapters"
    headers = ("id", "type", "shape", "version", "size", "residency", "created")
    rows = [
        (a.id, a.type, adapter_shape(a), a.version, human_bytes(a.size_bytes), a.residency, a.created_at)
        for a in adapters
    ]
    return table(headers, rows)


# -- training jobs ----------------------------------------------------------------------------------------


def progress_bar(job: Mapping[str, Any]) -> str:
    """`[#######-----------]  35%  step 7/20  loss 1.2345  running`"""
    progress = job.get("progress") or {}
    step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
    fraction = min(1.0, step / total) if total else 0.0
    filled = round(fraction * BAR_WIDTH)
    parts = [
        f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]",
        f"{fraction:4.0%}",
        f"step {step}/{total or '?'}",
    ]
    if progress.get("loss"):
        parts.append(f"loss {float(progress['loss']):.4f}")
    parts.append(str(job.get("status", "?")))
    return "  ".join(parts)


def jobs_table(jobs: Sequence[Mapping[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    headers = ("id", "adapter", "method", "status", "step", "loss", "created")
    return table(headers, [_job_row(job) for job in jobs])


def _job_row(job: Mapping[str, Any]) -> tuple[Any, ...]:
    progress = job.get("progress") or {}
    step = f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}"
    loss = f"{float(progress['loss']):.4f}" if progress.get("loss") else None
    return (
        job.get("id"),
        job.get("adapter_id"),
        job.get("method"),
        job.get("status"),
        step,
        loss,
        job.get("created_at"),
    )


def job_details(job: Mapping[str, Any]) -> str:
    """Every field of a job; held-out metrics one line per model, eval_tasks one line per model and task."""
    nested = ("progress", "metrics", "config", "adapter", "loss_curve")
    values: dict[str, Any] = {key: value for key, value in job.items() if key not in nested}
    values["progress"] = progress_bar(job)
    if job.get("loss_curve"):
        values["loss_curve"] = f"{len(job['loss_curve'])} points (the JSON job has them)"
    for group in ("config", "adapter"):  # one line per field, not one long JSON line
        for key, value in (job.get(group) or {}).items():
            values[f"{group}.{key}"] = value
    metrics = job.get("metrics") or {}
    for model in ("base", "adapter"):
        if isinstance(metrics.get(model), Mapping):
            values[f"metrics.{model}"] = "  ".join(f"{k} {_score(v)}" for k, v in metrics[model].items())
    for model, tasks in (metrics.get("tasks") or {}).items():
        for task, scores in tasks.items():
            shown = (f"{k} {float(v):.4f}" for k, v in scores.items() if "_stderr" not in k)
            values[f"tasks.{model}.{task}"] = "  ".join(shown)
    gate = metrics.get("gate")
    if isinstance(gate, Mapping):
        verdict = "passed" if gate["passed"] else "refused"
        values["register_if"] = (
            f"{verdict}: {gate['task']} {gate['metric']}: adapter {gate['adapter']:.4f}, base {gate['base']:.4f}"
            f" (delta {gate['delta']:+.4f}, min_delta {gate['min_delta']:+.4f})"
        )
    return key_values(values)


def _score(value: Any) -> str:
    """A score to 3 places; a count (num_examples) as the integer it is."""
    return str(value) if isinstance(value, int) else f"{float(value):.3f}"


class ProgressPrinter:
    """A job's progress: one bar rewritten in place on a terminal, else one line per change."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.is_live = out.isatty()
        self.last = ""

    def update(self, job: Mapping[str, Any]) -> None:
        line = progress_bar(job)
        if line == self.last:
            return
        self.last = line
        self.out.write(f"\r{line}\x1b[K" if self.is_live else f"{line}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.is_live and self.last:
            self.out.write("\n")
