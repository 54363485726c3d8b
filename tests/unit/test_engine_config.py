"""Engine defaults that depend on the machine: the CPU threads of `serve`, the prefill chunk per device."""

from __future__ import annotations

import os

import pytest

from adapterd.server.cli.main import build_parser
from adapterd.server.common.config import PREFILL_CHUNK_TOKENS, EngineConfig, serving_cpu_threads


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


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch", "0", "must be at least 1, not 0"),
        ("--cpu-threads", "-1", "must be at least 0, not -1"),
        ("--prefill-chunk-tokens", "many", "'many' is not an integer"),
        ("--kv-cache-tokens", "8", "must be at least 16, not 8"),
    ],
)
def test_bad_engine_flags_are_refused_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser("run").parse_args(["run", "--in", "a.jsonl", "--out", "b.jsonl", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_engine_flags_default_to_the_engine_config() -> None:
    args = build_parser("run").parse_args(["run", "--in", "a.jsonl", "--out", "b.jsonl"])
    defaults = EngineConfig()
    assert (args.max_batch, args.prefill_chunk_tokens, args.cpu_threads) == (defaults.max_batch, 0, None)
