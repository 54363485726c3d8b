"""The two fresh processes the Triton kernel tests need (tests/unit/test_triton_lora.py, test_triton_nf4.py):
the interpreter tests when this process imported triton before TRITON_INTERPRET=1 could be set, and an
ahead-of-time compile for sm_90 (H100/H200), which an interpreting process cannot make."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(test_file: str, *selection: str) -> str:
    """Run `test_file`'s tests chosen by `selection` (pytest -k/-m arguments) with TRITON_INTERPRET=1; they
    must pass. Returns pytest's output."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", *selection],
        cwd=REPO_ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    return result.stdout


def compile_for_sm90(script: str, cache_dir: Path) -> str:
    """Run a compile `script` (it prints "COMPILED n", or "SKIP why" for a Triton whose AOT API differs,
    which skips the test) in a process without the interpreter. Returns its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its (and earlier ones') default
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    if result.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton's AOT compile API differs: {result.stdout.strip()}")
    return result.stdout
