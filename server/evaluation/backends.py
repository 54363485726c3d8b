"""What lm-eval asks of a model, as adapterd requests: score token ids (the log-likelihood of a continuation)
and generate from token ids until a stop. Many requests, for many adapters, go to the engine together.

`LocalBackend` runs them on an in-process engine (`LLM`), `ServerBackend` through a running server's
/v1/completions (token-id prompts, `echo` with `logprobs`, batched, several requests in flight).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from adapterd.server.common.protocol import Completion, GenerateRequest, SamplingParams, TokenEvent

SERVER_BATCH = 16  # prompts per /v1/completions request
SERVER_CONCURRENCY = 8  # requests in flight: enough for the server's continuous batch to fill


@dataclass(frozen=True)
class ScoreRequest:
    """The log-likelihood of the last `num_scored` tokens of `token_ids`, under `adapter_id` (None: base)."""

    adapter_id: str | None
    token_ids: tuple[int, ...]
    num_scored: int


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy generation from `token_ids` until a stop string or `max_new_tokens`."""

    adapter_id: str | None
    token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    max_new_tokens: int


Score = tuple[float, bool]  # (log-likelihood, whether every scored token was the greedy choice)


@dataclass
class ModelStats:
    """What one model's requests cost during a run (HELM's efficiency figures)."""

    latencies: list[float] = field(default_factory=list)  # seconds from submission to answer, per request
    generated_tokens: int = 0

    def summary(self, wall_s: float) -> dict[str, float]:
        ordered = sorted(self.latencies) or [0.0]
        return {
            "requests": len(self.latencies),
            "generated_tokens": self.generated_tokens,
            "generated_tokens_per_s": self.generated_tokens / wall_s if wall_s else 0.0,
            "latency_mean_s": statistics.fmean(ordered),
            "latency_p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        }


class Backend(Protocol):
    tokenizer: Any
    max_length: int
    stats: dict[str | None, ModelStats]

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]: ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]: ...


class LocalBackend:
    """An in-process engine: every request of a call is submitted at once, so they share its batch."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_length = llm.engine.context_limit
        self.stats: dict[str | None, ModelStats] = defaultdict(ModelStats)

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
        done = self._run(
            [
                GenerateRequest(prompt_ids=r.token_ids, adapter_id=r.adapter_id, params=params)
                for r in requests
            ]
        )
        return [_score(c, r.num_scored) for c, r in zip(done, requests, strict=True)]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        done = self._run(
            [
                GenerateRequest(
                    prompt_ids=r.token_ids,
                    adapter_id=r.adapter_id,
                    params=SamplingParams(max_new_tokens=r.max_new_tokens, stop=r.stop),
                )
                for r in requests
            ]
        )
        return [c.text for c in done]

    def _run(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Submit every request at once (they share the continuous batch); the answers, in order."""
        started = time.perf_counter()
        futures: list[Future[tuple[Completion, float]]] = [Future() for _ in requests]
        self.llm.submit_all(requests, [_timed_sink(f) for f in futures])
        answers = []
        for request, future in zip(requests, futures, strict=True):
            done, finished = future.result()
            stats = self.stats[request.adapter_id]
            stats.latencies.append(finished - started)
            stats.generated_tokens += len(done.token_ids)
            answers.append(done)
        return answers


def _timed_sink(future: Future[tuple[Completion, float]]) -> Any:
    def sink(event: TokenEvent | Completion) -> None:
        if isinstance(event, Completion):
            future.set_result((event, time.perf_counter()))

    return sink


def _score(done: Completion, num_scored: int) -> Score:
    assert done.prompt_logprobs is not None
    scored = done.prompt_logprobs[-num_scored:]
    total = sum(s.logprob for s in scored if s.logprob is not None)
    return total, all(s.top and s.top[0][0] == s.token_id for s in scored)


class ServerBackend:
    """A running adapterd server, over its OpenAI /v1/completions route (what `lm_eval --model
    local-completions` uses too, here with every adapter's requests in flight together)."""

    def __init__(self, url: str, tokenizer: Any, api_key: str | None = None, timeout: float = 600) -> None:
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.stats: dict[str | None, ModelStats] = defaultdict(ModelStats)
        info = httpx.get(f"{self.url}/info", headers=self.headers, timeout=30).json()
        self.base_name = str(info["model_id"])
        self.max_length = int(info["max_total_tokens"])

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        bodies = [
            {"prompt": [list(r.token_ids) for r in batch], "max_tokens": 0, "echo": True, "logprobs": 1}
            for batch in _batches(requests)
        ]
        answers = self._post_all(bodies, [batch[0].adapter_id for batch in _batches(requests)])
        scores: list[Score] = []
        for batch, answer in zip(_batches(requests), answers, strict=True):
            for request, choice in zip(
                batch, sorted(answer["choices"], key=lambda c: c["index"]), strict=True
            ):
                logprobs = choice["logprobs"]
                values = logprobs["token_logprobs"][-request.num_scored :]
                tops = logprobs["top_logprobs"][-request.num_scored :]
                scores.append(
                    (sum(values), all(v == max(t.values()) for v, t in zip(values, tops, strict=True)))
                )
        return scores

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        bodies = [
            {
                "prompt": list(r.token_ids),
                "max_tokens": r.max_new_tokens,
                "stop": list(r.stop),
                "temperature": 0,
            }
            for r in requests
        ]
        answers = self._post_all(bodies, [r.adapter_id for r in requests])
        return [a["choices"][0]["text"] for a in answers]

    def _post_all(self, bodies: list[dict[str, Any]], adapters: list[str | None]) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            limit = asyncio.Semaphore(SERVER_CONCURRENCY)
            async with httpx.AsyncClient(headers=self.headers, timeout=self.timeout) as client:

                async def post(body: dict[str, Any], adapter_id: str | None) -> dict[str, Any]:
                    async with limit:
                        body = {"model": adapter_id or self.base_name, **body}
                        response = await client.post(f"{self.url}/v1/completions", json=body)
                    if response.status_code != 200:
                        raise RuntimeError(
                            f"the server answered {response.status_code}: {response.text[:500]}"
                        )
                    return dict(response.json())

                return list(
                    await asyncio.gather(*(post(b, a) for b, a in zip(bodies, adapters, strict=True)))
                )

        return asyncio.run(run())


def _batches(requests: Sequence[ScoreRequest]) -> list[list[ScoreRequest]]:
    """Consecutive runs of one adapter's requests, at most SERVER_BATCH each (one /v1/completions call)."""
    batches: list[list[ScoreRequest]] = []
    for request in requests:
        if batches and batches[-1][0].adapter_id == request.adapter_id and len(batches[-1]) < SERVER_BATCH:
            batches[-1].append(request)
        else:
            batches.append([request])
    return batches
