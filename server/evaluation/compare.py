"""`adapterd eval --tasks`: lm-evaluation-harness tasks for the base and many adapters in one continuous batch.

    adapterd eval --tasks TASK[,TASK...] --adapters ID[,ID...] [--base] [--server URL --tokenizer DIR]
                  [--model default|PATH] [--limit N] [--num-fewshot K] [--include-path DIR] [--out DIR]

With `--server`, adapters are ids registered there; without it, an in-process engine loads `--model` and each
adapter is `ID=PATH` (or a PEFT directory, named by its folder). The table shows each metric with its
standard error; `--out` gets `results.json` (lm-eval's results per model, and the run's own figures) and one
bar chart per task (base vs each adapter, error bars: the standard error), as PNG and SVG.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "base"


@dataclass(frozen=True)
class Comparison:
    """lm-eval's results for each model (BASE or an adapter id), from one shared pass through the engine."""

    results: dict[str, dict[str, Any]]  # model -> lm-eval's results["results"] (+ "ece,none")
    wall_s: float
    efficiency: dict[str, dict[str, float]]  # model -> its requests, tokens/s and latencies during the run

    def table(self) -> str:
        rows = [("task", "metric", *self.results)]
        for task in next(iter(self.results.values())):
            for metric in _metrics(self.results, task):
                cells = [_cell(self.results[m].get(task, {}), metric) for m in self.results]
                rows.append((task, metric, *cells))
        return _aligned(rows)

    def to_json(self) -> dict[str, Any]:
        run = {"models": list(self.results), "wall_s": self.wall_s, "efficiency": self.efficiency}
        return {"results": self.results, "adapterd": run}

    def efficiency_table(self) -> str:
        rows: list[tuple[Any, ...]] = [("model", "requests", "generated tok/s", "latency mean / p95 (s)")]
        for model, e in self.efficiency.items():
            latency = f"{e['latency_mean_s']:.3f} / {e['latency_p95_s']:.3f}"
            rows.append((model, f"{e['requests']:.0f}", f"{e['generated_tokens_per_s']:.1f}", latency))
        return _aligned(rows)


def _aligned(rows: list[tuple[Any, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _metrics(results: dict[str, dict[str, Any]], task: str) -> list[str]:
    first = next(iter(results.values()))[task]
    return [k for k in first if "," in k and "_stderr" not in k and isinstance(first[k], int | float)]


def _cell(task_results: dict[str, Any], metric: str) -> str:
    value = task_results.get(metric)
    if not isinstance(value, int | float):
        return "-"
    name, _, filter_name = metric.partition(",")
    stderr = task_results.get(f"{name}_stderr,{filter_name}")
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, int | float) else f"{value:.4f}"


def compare(
    backend: Any,
    tasks: list[str],
    adapters: list[str],
    include_base: bool,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    task_manager: Any = None,
) -> Comparison:
    """Evaluate every model on `tasks`; the first run answers every model's requests together."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError("lm-evaluation-harness is not installed: pip install 'adapterd[eval]'") from exc

    from adapterd.server.evaluation.harness import AdapterdLM

    models: list[str | None] = ([None] if include_base else []) + list(adapters)
    # Indexing lm-eval's task files takes seconds: callers comparing several times pass one manager.
    manager = task_manager or TaskManager(include_path=str(include_path) if include_path else None)
    cache: dict[Any, Any] = {}
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for model in models:
        lm = AdapterdLM(backend, model, fan_out=models, cache=cache)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=True,
        )
        results[model or BASE] = with_calibration(out["results"], out["samples"])
    wall_s = time.perf_counter() - started
    efficiency = {model or BASE: backend.stats[model].summary(wall_s) for model in models}
    return Comparison(results, wall_s, efficiency)


def with_calibration(results: dict[str, Any], samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """lm-eval's results with `ece,none` added to each multiple-choice task."""
    from adapterd.server.evaluation.calibration import expected_calibration_error

    out = {task: dict(values) for task, values in results.items()}
    for task, task_samples in samples.items():
        ece = expected_calibration_error(task_samples)
        if ece is not None and task in out:
            out[task]["ece,none"] = ece
    return out


def open_backend(args: Any) -> tuple[Any, list[str], Any]:
    """(the backend, the adapter ids to score, what to close afterwards) for `adapterd eval --tasks`."""
    from adapterd.server.common.config import default_cache_dir
    from adapterd.server.evaluation.backends import LocalBackend, ServerBackend
    from adapterd.server.model.resolve import resolve_model

    entries = [a for a in (args.adapters or "").split(",") if a]
    if args.server:
        from transformers import AutoTokenizer

        tokenizer_dir = args.tokenizer or resolve_model(args.model, default_cache_dir()).path
        backend = ServerBackend(args.server, AutoTokenizer.from_pretrained(tokenizer_dir), args.api_key)
        return backend, entries, None
    from adapterd.server.host.llm import LLM

    llm = LLM(model=args.model, quantize=args.quantize, device=args.device)
    ids = []
    for entry in entries:
        adapter_id, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        llm.add_adapter(adapter_id, path)
        ids.append(adapter_id)
    return LocalBackend(llm), ids, llm


def tasks_command(args: Any) -> int:
    """`adapterd eval --tasks ...`: print the table, write `--out DIR/results.json`; exit 1 on an error."""
    from adapterd.server.common.errors import CommandFailed

    closing: Any = None
    try:
        backend, adapters, closing = open_backend(args)
        comparison = compare(
            backend,
            [t for t in args.tasks.split(",") if t],
            adapters,
            include_base=args.base or not adapters,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            include_path=args.include_path,
        )
    except Exception as exc:  # lm-eval's own errors (unknown task, bad YAML) are plain exceptions
        raise CommandFailed(f"{type(exc).__name__}: {exc}") from exc
    finally:
        if closing is not None:
            closing.close()
    print(comparison.table())
    print(f"\n{len(comparison.results)} models in {comparison.wall_s:.1f} s, one continuous batch:")
    print(comparison.efficiency_table())
    if args.out:
        from adapterd.server.evaluation.charts import write_charts

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(comparison.to_json(), indent=2, default=str))
        charts = write_charts(comparison.results, args.out)
        print(f"wrote {args.out / 'results.json'} and {len(charts)} charts")
    return 0
