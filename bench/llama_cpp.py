"""llama.cpp's `llama-server` as the CPU peer of the serving bench (`bench.http_serving --llama-cpp SRC`).

SRC is a llama.cpp source tree with `build/bin/llama-server` built (the tree vendored in the
`llama-cpp-python` sdist; see docs/performance.md, "Against llama.cpp"). The same base model and the same
PEFT LoRAs are converted with that tree's own scripts to F32 GGUF, loaded at start (`--lora` each,
`--lora-init-without-apply`), and each request picks its LoRA by index with explicit scales (zero for the
others, and for base requests: in one build `--lora-init-without-apply` left them applied). Every request
sets `cache_prompt: false`, so llama.cpp prefills every prompt as adapterd does for a new prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Peer:
    process: subprocess.Popen[bytes]
    url: str
    args: str
    lora_ids: list[str]

    def body(self, model: str) -> dict[str, Any]:
        """The request fields that select `model` (a LoRA id, or anything else for the base)."""
        scales = [{"id": i, "scale": 1.0 if name == model else 0.0} for i, name in enumerate(self.lora_ids)]
        return {"lora": scales, "cache_prompt": False}


def convert(src: Path, model_dir: Path, loras: list[Path], out: Path) -> tuple[Path, list[Path]]:
    """The base model and each LoRA as F32 GGUF, by llama.cpp's own converters (cached in `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    model = out / "model-f32.gguf"
    if not model.exists():
        run = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32"]
        subprocess.run([*run, "--outfile", str(model)], check=True, env=env, capture_output=True)
    converted = []
    for lora in loras:
        target = out / f"{lora.name}-f32.gguf"
        if not target.exists():
            run = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(model_dir)]
            run += ["--outtype", "f32", "--outfile", str(target), str(lora)]
            subprocess.run(run, check=True, env=env, capture_output=True)
        converted.append(target)
    return model, converted


def start(src: Path, model_dir: Path, loras: list[Path], out: Path, threads: int) -> Peer:
    from .http_serving import free_port, wait_healthy

    model, converted = convert(src, model_dir, loras, out)
    port = free_port()
    args = ["-m", str(model), "-t", str(threads), "-np", "8", "-c", "8192", "--port", str(port)]
    args += ["--lora-init-without-apply", "--lora", ",".join(str(path) for path in converted)]
    binary = src / "build" / "bin" / "llama-server"
    log = out / "llama-server.log"
    process = subprocess.Popen([str(binary), *args], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, "llama-server", log)
    check_adapters(url, len(loras))
    return Peer(process, url, " ".join(_short(a) for a in args), [p.name for p in loras])


def check_adapters(url: str, count: int) -> None:
    """llama-server must hold every LoRA (a repeated --lora flag once kept only the last one)."""
    loaded = httpx.get(f"{url}/lora-adapters", timeout=10).json()
    if len(loaded) != count:
        raise RuntimeError(f"llama-server loaded {len(loaded)} LoRA adapters, not {count}")


def _short(arg: str) -> str:
    """Paths by their file names, for the report."""
    return ",".join(Path(part).name for part in arg.split(",")) if arg.startswith("/") else arg
