"""What the clients return (`Generation`, `Token`, `Adapter`) and the sampling options they take."""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

Messages = Sequence[Mapping[str, str]]  # chat turns: [{"role": "user", "content": "..."}, ...]

# Sent when the caller gives no max_new_tokens, so every transport and route generates the same length
# (the server's own defaults differ: TGI routes 20, OpenAI chat 256, gRPC 64).
DEFAULT_MAX_NEW_TOKENS = 64

# The server's finish reasons on every route, normalised to the gRPC / `adapterd run` names.
FINISH_REASONS = {"eos_token": "eos", "stop_sequence": "stop"}


class SamplingOptions(TypedDict, total=False):
    """The keyword arguments of generate(), generate_stream() and chat(), the same on every client.
    temperature 0 or unset is greedy decoding; top_p and top_k apply only when sampling."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: str | list[str]
    ignore_eos: bool
    logit_bias: Mapping[int, float]
    min_tokens: int
    stop_token_ids: list[int]
    presence_penalty: float
    frequency_penalty: float
    # Structured output, at most one of them: the output is JSON matching the schema, any JSON object,
    # text matching the regex in full, text of the Lark grammar, or exactly one of the choices.
    json_schema: Mapping[str, Any]
    json_object: bool
    regex: str
    grammar: str
    choice: list[str]


STRUCTURED = ("json_schema", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class Sampling:
    """SamplingOptions checked for names (values are the server's to judge, so that every transport
    refuses the same values with the same InvalidRequest)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool | None = None
    logit_bias: Mapping[int, float] | None = None
    min_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    json_schema: Mapping[str, Any] | None = None
    json_object: bool | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> Sampling:
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        given = {name: value for name, value in options.items() if value is not None}
        structured = [name for name in STRUCTURED if given.get(name)]
        if len(structured) > 1:
            raise TypeError(f"give at most one of {', '.join(STRUCTURED)}, not {' and '.join(structured)}")
        stop = given.pop("stop", ())
        for name in ("stop_token_ids", "choice"):
            if name in given:
                given[name] = tuple(given[name])
        return cls(**given, stop=(stop,) if isinstance(stop, str) else tuple(stop))

    @property
    def structured(self) -> tuple[str, Any] | None:
        """The structured-output option given, as (name, value)."""
        for name in STRUCTURED:
            value = getattr(self, name)
            if value:
                return name, value
        return None

    def extras(self) -> dict[str, Any]:
        """The options beside the classic ones that were given, by name."""
        names = ("ignore_eos", "logit_bias", "min_tokens", "presence_penalty", "frequency_penalty")
        given = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.stop_token_ids:
            given["stop_token_ids"] = list(self.stop_token_ids)
        if "logit_bias" in given:
            given["logit_bias"] = {str(token): bias for token, bias in given["logit_bias"].items()}
        return given

    @property
    def is_sampling(self) -> bool:
        return bool(self.temperature)


@dataclass(frozen=True)
class Generation:
    """A finished generation. `finish_reason` is "length", "eos", "stop" or "cancelled".
    `token_ids` is None only for chat() over HTTP, whose OpenAI route does not return ids."""

    text: str
    token_ids: list[int] | None
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Token:
    """One streamed token. The last token of a stream carries the whole `generation`."""

    id: int
    text: str
    generation: Generation | None = None


@dataclass(frozen=True)
class Adapter:
    """An adapter's description, as the server stores it."""

    id: str
    type: str  # "lora" | "dora" | "ia3" | "prompt_tuning" | "p_tuning" | "prefix_tuning"
    rank: int | None  # LoRA and DoRA
    num_virtual_tokens: int | None  # prompt tuning, P-tuning, prefix tuning
    target_modules: list[str]
    base_model: str
    version: int
    sha256: str
    size_bytes: int
    created_at: str  # ISO 8601 UTC
    residency: str  # "disk" | "cpu" | "gpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, description: Mapping[str, Any]) -> Adapter:
        """From the server's JSON description (extra keys, e.g. "deleted", are ignored)."""
        values: dict[str, Any] = {f.name: description.get(f.name) for f in fields(cls)}
        values["target_modules"] = list(values["target_modules"] or [])
        values["metadata"] = dict(values["metadata"] or {})
        values["residency"] = values["residency"] or "disk"
        return cls(**values)


def finish_reason(name: str) -> str:
    return FINISH_REASONS.get(name, name)


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
AdapterFile = Path | bytes  # a file to send, or (from a tar archive) its content


def adapter_files(path: str | Path) -> tuple[AdapterFile, AdapterFile]:
    """A local PEFT adapter's (adapter_config.json, adapter_model.safetensors): from its directory, or from a
    tar archive of it (plain or gzip; the files at its top or in one folder). A clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        return _files_in_tar(path)
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if not weights.is_file() and pickles:
        raise FileNotFoundError(
            f"{path} has {pickles[0]} but no {WEIGHTS_FILE}: pickle weights are refused (loading them can run "
            f"code); save the adapter as safetensors (PEFT's save_pretrained does by default)"
        )
    for needed in (config, weights):
        if not needed.is_file():
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory: {needed.name} is missing")
    return config, weights


def _files_in_tar(path: Path) -> tuple[bytes, bytes]:
    if not tarfile.is_tarfile(path):
        raise FileNotFoundError(f"{path} is neither a PEFT adapter directory nor a tar archive of one")
    found: dict[str, bytes] = {}
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            name = parts[-1] if parts else ""
            if name in (CONFIG_FILE, WEIGHTS_FILE) and len(parts) <= 2 and member.isfile():
                extracted = archive.extractfile(member)
                assert extracted is not None
                found[name] = extracted.read()
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if needed not in found:
            raise FileNotFoundError(f"{path} (a tar archive) holds no {needed} (at its top or in one folder)")
    return found[CONFIG_FILE], found[WEIGHTS_FILE]
