"""Real `adapterd serve` processes on free loopback ports, always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import make_tiny_llama

ADAPTERD = str(Path(sys.executable).with_name("adapterd"))
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_tiny_chat_model(path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama with the default model's tokenizer and chat template (so text works)."""
    make_tiny_llama(path, seed=seed, vocab_size=49152, max_position_embeddings=4096)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@dataclass
class Server:
    process: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, sig_kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if sig_kill else self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(model: Path | str, store: Path, log: Path, *args: str, timeout: float = 120) -> Server:
    http_port, grpc_port = free_port(), free_port()
    command = [
        ADAPTERD,
        "serve",
        "--model",
        str(model),
        "--quantize",
        "none",
        "--device",
        "cpu",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--store",
        str(store),
        *args,
    ]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
    server = Server(process, http_port, grpc_port, log)
    wait_healthy(server, "server", timeout)
    return server


def wait_healthy(service: Server | Any, what: str, timeout: float) -> None:
    """Poll `service.url`/health until 200; on exit or timeout stop it and raise with its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {service.process.returncode}:\n{service.log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{service.url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"{what} not healthy in {timeout}s:\n{service.log.read_text()[-3000:]}")


@contextmanager
def running_server(model: Path | str, store: Path, log: Path, *args: str) -> Iterator[Server]:
    server = start_server(model, store, log, *args)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serving_adapters(
    model: Path | str, adapters: dict[str, Path], root: Path, *args: str
) -> Iterator[Server]:
    """A server (store and log under `root`) with each PEFT directory of `adapters` uploaded under its id."""
    from adapterd.clients import Client

    with running_server(model, root / "store", root / "server.log", *args) as server:
        with Client(server.url) as client:
            for name, path in adapters.items():
                client.upload_adapter(name, path)
        yield server
