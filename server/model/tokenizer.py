"""The base model's tokenizer: loading it, its chat template as tokens, its end-of-sequence ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapterd.server.common.errors import InvalidRequest


def load_tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    has_tokenizer = any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(path) if has_tokenizer else None


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """The chat template as text (with `tools` for a template that renders them), then tokens: the same on
    transformers 4.x and 5.x."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template: send a plain prompt")
    extra = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def eos_token_ids(path: Path, tokenizer: Any | None, config: Any) -> set[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    candidates: list[Any] = [getattr(config, "eos_token_id", None)]
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    if (path / "generation_config.json").exists():
        candidates.append(GenerationConfig.from_pretrained(path).eos_token_id)
    for item in candidates:
        ids.update(item if isinstance(item, list) else [] if item is None else [item])
    return ids
