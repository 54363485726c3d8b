"""Engine defaults that depend on the machine: the CPU threads of `serve`, the prefill chunk per device."""

from __future__ import annotations

import os

import pytest

from adapterd.server.config import PREFILL_CHUNK_TOKENS, EngineConfig, serving_cpu_threads


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_serve_leaves_one_core_to_the_front_end(
    monkeypatch: pytest.MonkeyPatch, cores: int, threads: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert serving_cpu_threads() == threads


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_prefill_chunk_is_the_devices_unless_given(device: str) -> None:
    assert EngineConfig().for_device(device).prefill_chunk_tokens == PREFILL_CHUNK_TOKENS[device]
    assert EngineConfig(prefill_chunk_tokens=100).for_device(device).prefill_chunk_tokens == 100
    assert PREFILL_CHUNK_TOKENS["cpu"] < PREFILL_CHUNK_TOKENS["cuda"]  # CPU prefill is compute-bound
