"""The worker subprocess from the trainer's side: start it, read its events, stop it, explain its end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STOP_GRACE_S = 10.0
LOG_TAIL_BYTES = 2000


async def start_worker(command: Sequence[str], log_file: Path) -> asyncio.subprocess.Process:
    """Events come on its stdout, its stderr goes to `log_file`; it leads its own process group."""
    with log_file.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True
        )


def read_event(line: bytes) -> dict[str, Any]:
    """One worker event; a torn last line (the worker was killed while writing) is no event."""
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def signal_group(worker: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signum)


async def stop_worker(worker: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not ended within STOP_GRACE_S."""
    signal_group(worker, signal.SIGTERM)
    try:
        await asyncio.wait_for(worker.wait(), STOP_GRACE_S)
    except asyncio.TimeoutError:
        signal_group(worker, signal.SIGKILL)
        await worker.wait()


def exit_reason(code: int, log_file: Path) -> str:
    """Why a worker that sent no error event failed: the signal that killed it, or the end of its log."""
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory, or killed by an operator)" if name == "SIGKILL" else ""
        return f"the training process was killed by {name}{hint}"
    with log_file.open("rb") as file:
        file.seek(max(0, file.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
        tail = file.read().decode(errors="replace").strip()
    return f"the training process exited with status {code}: {tail}"
