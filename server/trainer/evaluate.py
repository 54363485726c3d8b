"""Held-out evaluation: greedy generation, then exact match and ROUGE-1/2/L F1 (Lin 2004, via rouge-score).

Generation goes through adapterd's own engine, never PEFT's `generate()`: in the trainer's worker through the
in-process `LLM`, and for `POST /v1/evaluations` / `adapterd eval` through a running server. Both give each
example the same token budget, so the job's metrics and a later `adapterd eval` agree.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.errors import AdapterdError
from adapterd.server.trainer.data import Example, read_examples
from adapterd.server.trainer.remote import ServerClient

REMOTE_CONCURRENCY = 8  # requests in flight to the server: enough for its continuous batch to help
BUDGET_MARGIN = 16  # new tokens beyond the reference's length in characters
MAX_NEW_TOKENS = 512
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TRAINED = "trained"  # the adapter's id in the worker's own engine


@dataclass(frozen=True)
class Scores:
    """Mean scores over the examples, each in [0, 1]."""

    exact_match: float
    rouge1: float
    rouge2: float
    rougeL: float  # the API's name
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_budget(example: Example) -> int:
    """New tokens to allow: enough for the reference (a token is at least one character) plus a margin."""
    return min(len(example.completion) + BUDGET_MARGIN, MAX_NEW_TOKENS)


def is_exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


class _WordTokenizer:
    """Lower-cased Unicode words: rouge-score's default tokenizer drops every non-ASCII letter."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def score(predictions: Sequence[str], references: Sequence[str]) -> Scores:
    from rouge_score import rouge_scorer

    assert len(predictions) == len(references) and references, "one prediction per reference"
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_WordTokenizer())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    matches = 0
    for prediction, reference in zip(predictions, references, strict=True):
        matches += is_exact_match(prediction, reference)
        for name, value in scorer.score(reference, prediction).items():
            totals[name] += value.fmeasure
    n = len(references)
    return Scores(matches / n, totals["rouge1"] / n, totals["rouge2"] / n, totals["rougeL"] / n, n)


def generate_local(llm: Any, examples: Sequence[Example], adapter_id: str | None) -> list[str]:
    """Greedy completions from an in-process `LLM`, all in one continuous batch. An example the engine
    refuses (too long for it) counts as an empty prediction."""
    from adapterd.server.common.protocol import GenerateRequest, SamplingParams

    futures: list[Future[str]] = []
    for example in examples:
        params = SamplingParams(max_new_tokens=token_budget(example), temperature=0.0)
        request = GenerateRequest(**example.request_kwargs(), adapter_id=adapter_id, params=params)
        future: Future[str] = Future()
        try:
            llm.submit(request, _text_sink(future))
        except AdapterdError:
            future.set_result("")
        futures.append(future)
    return [f.result() for f in futures]


def _text_sink(future: Future[str]) -> Any:
    def sink(event: Any) -> None:  # called on the engine thread; the last event is the Completion
        if not hasattr(event, "token_id"):
            future.set_result(event.text)

    return sink


def evaluate_local(
    model_dir: Path,
    quantize: str,
    device: str,
    examples: Sequence[Example],
    adapter_dir: Path | None = None,
    engine: EngineConfig | None = None,
    tasks: Callable[[Any, str | None], dict[str, Any]] | None = None,
) -> tuple[Scores, list[str], dict[str, Any] | None]:
    """Load the base as the server would (`quantize` none or nf4), add the adapter if any, score it on the
    examples; then, given `tasks`, call it with the same engine and the adapter's id (see `evaluate_tasks`)."""
    from adapterd.server.host.llm import LLM

    with LLM(model=str(model_dir), quantize=quantize, device=device, engine=engine) as llm:
        adapter_id = None
        if adapter_dir is not None:
            adapter_id = TRAINED
            llm.add_adapter(adapter_id, adapter_dir)
        predictions = generate_local(llm, examples, adapter_id)
        task_scores = tasks(llm, adapter_id) if tasks is not None else None
    return score(predictions, [e.completion for e in examples]), predictions, task_scores


def evaluate_tasks(llm: Any, adapter_id: str | None, names: Sequence[str], manager: Any) -> dict[str, Any]:
    """lm-eval `names` for the base and the adapter, in one continuous batch on `llm`:
    {"base": {task: {metric: value}}, "adapter": {...}}: lm-eval's "metric,filter" results (+ "ece,none")."""
    from adapterd.server.evaluation.backends import LocalBackend
    from adapterd.server.evaluation.compare import BASE, compare

    assert adapter_id is not None
    comparison = compare(
        LocalBackend(llm), list(names), [adapter_id], include_base=True, task_manager=manager
    )
    numbers = {
        model: {
            task: {k: v for k, v in values.items() if "," in k and isinstance(v, int | float)}
            for task, values in results.items()
        }
        for model, results in comparison.results.items()
    }
    return {"base": numbers[BASE], "adapter": numbers[adapter_id]}


async def evaluate_remote(
    server: ServerClient, examples: Sequence[Example], adapter_id: str | None
) -> tuple[Scores, list[str]]:
    """The same evaluation through a running server's HTTP generation API (it is adapterd's engine)."""
    base_name = str((await server.info())["model_id"])
    if adapter_id and adapter_id != base_name:
        await server.adapter(adapter_id)  # an unknown adapter: one clear 404 before any generation
    slots = asyncio.Semaphore(REMOTE_CONCURRENCY)

    async def one(example: Example) -> str:
        async with slots:
            return await server.generate(example, adapter_id, base_name, token_budget(example))

    predictions = await asyncio.gather(*(one(e) for e in examples))
    return score(predictions, [e.completion for e in examples]), list(predictions)


async def evaluate_file(server: ServerClient, data: Path, adapter_id: str | None) -> Scores:
    """`POST /v1/evaluations` and gRPC `Evaluate`: validate a JSONL file (every bad line named), score it."""

    def read() -> list[Example]:
        with data.open("rb") as lines:
            return read_examples(lines, "data")

    examples = await asyncio.to_thread(read)
    scores, _ = await evaluate_remote(server, examples, adapter_id)
    return scores
