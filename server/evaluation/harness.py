"""An lm-evaluation-harness model backed by adapterd's engine: lm-eval's tasks and metrics as they are, with
`loglikelihood`, `loglikelihood_rolling` and `generate_until` answered by the engine.

One `AdapterdLM` scores one model (the base or an adapter). Given `fan_out` (every model of a comparison) and
a shared `cache`, each call answers lm-eval's requests for *all* of them in one submission, so the base and
many adapters go through one continuous batch; the later runs of the comparison find their answers in the
cache. `lm_eval.simple_evaluate(model=AdapterdLM(backend, "my-lora"), tasks=[...])` from Python, or
`lm_eval --model adapterd --model_args base_url=http://HOST:8080,tokenizer=DIR,adapter=my-lora`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import lm_eval.models  # noqa: F401  (lm-eval registers its own models only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from adapterd.server.evaluation.backends import (
    Backend,
    GenerationRequest,
    Score,
    ScoreRequest,
    ServerBackend,
)

K = TypeVar("K")
V = TypeVar("V")
DEFAULT_MAX_GEN_TOKS = 256


@register_model("adapterd")
class AdapterdLM(TemplateLM):
    def __init__(
        self,
        backend: Backend | None = None,
        adapter_id: str | None = None,
        fan_out: Sequence[str | None] = (),
        cache: dict[Any, Any] | None = None,
        *,
        base_url: str | None = None,
        tokenizer: str | None = None,
        adapter: str | None = None,
        **unused: Any,
    ) -> None:
        """`backend`, or (from lm-eval's `--model_args`) `base_url` of a server and `tokenizer`, the base model's
        Hugging Face directory; `adapter_id` (or `adapter`) names the model scored, None the base."""
        super().__init__()
        self.backend = backend or _server_backend(base_url, tokenizer)
        self.tokenizer = self.backend.tokenizer
        self.adapter_id = adapter_id or adapter or None
        self.fan_out = tuple(dict.fromkeys([self.adapter_id, *fan_out]))
        self.cache = {} if cache is None else cache

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self.backend.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens)).input_ids)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return str(self.tokenizer.decode(list(tokens)))

    # -- what lm-eval asks ---------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
        keys = [self._score_key(context, continuation) for _, context, continuation in requests]
        return self._fanned(("score", *k) for k in keys)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in windows of the context length (as lm-eval's own models do)."""
        per_request: list[list[tuple[Any, ...]]] = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1,
                context_len=1,
            )
            per_request.append([("score", *self._score_key(*make_disjoint_window(w))) for w in windows])
        scores = self._fanned(key for keys in per_request for key in keys)
        totals, start = [], 0
        for keys in per_request:
            totals.append(sum(score for score, _ in scores[start : start + len(keys)]))
            start += len(keys)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        keys = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :]
            keys.append(("generate", tuple(ids), tuple(until), max_gen))
        return self._fanned(keys)

    # -- one submission for every model of the comparison ---------------------------------------------------

    def _score_key(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[Any, ...]:
        ids = (list(context) + list(continuation))[-self.max_length :]
        return tuple(ids), min(len(continuation), len(ids) - 1)

    def _fanned(self, keys: Any) -> list[Any]:
        """This model's answers to `keys`; whatever the cache lacks is computed now for every fanned-out model."""
        wanted = list(keys)
        missing = list(
            dict.fromkeys((a, k) for k in wanted for a in self.fan_out if (a, k) not in self.cache)
        )
        scores = [m for m in missing if m[1][0] == "score"]
        generations = [m for m in missing if m[1][0] == "generate"]
        self.cache.update(_run(scores, self._score_all))
        self.cache.update(_run(generations, self._generate_all))
        return [self.cache[(self.adapter_id, k)] for k in wanted]

    def _score_all(self, items: list[tuple[Any, Any]]) -> list[Score]:
        return self.backend.score([ScoreRequest(a, ids, n) for a, (_, ids, n) in items])

    def _generate_all(self, items: list[tuple[Any, Any]]) -> list[str]:
        return self.backend.generate([GenerationRequest(a, ids, until, m) for a, (_, ids, until, m) in items])


def _run(items: list[K], compute: Callable[[list[K]], list[V]]) -> dict[K, V]:
    return dict(zip(items, compute(items), strict=True)) if items else {}


def _server_backend(base_url: str | None, tokenizer: str | None) -> Backend:
    if not base_url or not tokenizer:
        raise ValueError(
            "give a backend, or base_url (an adapterd server) and tokenizer (the base model's directory)"
        )
    from transformers import AutoTokenizer

    return ServerBackend(base_url, AutoTokenizer.from_pretrained(tokenizer))
