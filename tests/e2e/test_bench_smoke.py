"""The GPU benchmark's code, run end to end on a tiny random model on the CPU (`--mode gpu --tiny`): every
step a GPU run takes (checks, throughput against PEFT, time to first token, loads, the Zipf workload, the
targets) runs and writes its table and JSON. A GPU session's device minutes must not be the first to find
that a refactor broke the bench (one did: the Zipf step read a slot pool that had moved). Timings here mean
nothing and are not asserted; the figures come from bench/gpu_check.sh on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_runs_on_a_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = ["--mode", "gpu", "--tiny", "--repeats", "1", "--new-tokens", "8", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["model"] == "tiny-llama-random" and results["quantize"] == "nf4"
    assert {"checks", "cases", "ttft", "loads", "zipf", "targets"} <= results.keys()
    assert all(case["adapterd"]["decode_tok_s"]["median"] > 0 for case in results["cases"].values())
    assert results["zipf"]["slot_loads"] and results["zipf"]["zipf"]["e2e_tok_s"]["median"] > 0
    assert "Zipf workload" in result.stdout and str(out) in result.stdout
