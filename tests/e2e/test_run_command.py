"""`adapterd run`, the real console script: offline batch inference over JSONL on the default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapterd.server.model.resolve import ResolvedModel
from adapterd.server.model.tokenizer import encode_chat
from tests.reference import (
    greedy_forward,
    greedy_generate,
    load_base,
    load_peft,
    make_lora_adapter,
    make_prompt_adapter,
)

pytestmark = pytest.mark.slow
ADAPTERD = str(Path(sys.executable).with_name("adapterd"))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter_dir(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run-adapters")
    make_lora_adapter(default_model.path, root / "lora16", r=16, alpha=32, target_modules="all-linear")
    make_prompt_adapter(default_model.path, root / "acme" / "soft", num_virtual_tokens=8, seed=1)
    return root


def run_adapterd(tmp_path: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    source, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_text("".join(line + "\n" for line in lines))
    command = [ADAPTERD, "run", "--in", str(source), "--out", str(results), "--quantize", "none", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_run_mixes_base_lora_and_soft_prompt_and_equals_peft(
    tmp_path: Path, default_model: ResolvedModel, adapter_dir: Path
):
    requests = [
        {"id": "base", "messages": QUESTION, "max_new_tokens": 16},
        {"id": 7, "prompt": "The three primary colours are", "adapter_id": "lora16", "max_new_tokens": 16},
        {"id": "soft", "messages": QUESTION, "adapter_id": "acme/soft", "max_new_tokens": 16},
    ]
    done = run_adapterd(tmp_path, [json.dumps(r) for r in requests], "--adapters", str(adapter_dir))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["base", 7, "soft"]

    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    chat = encode_chat(tokenizer, QUESTION)
    plain = tokenizer(requests[1]["prompt"]).input_ids
    eos = tokenizer.eos_token_id
    expected = [
        greedy_generate(load_base(default_model.path), chat, 16, eos),
        greedy_generate(load_peft(default_model.path, adapter_dir / "lora16"), plain, 16, eos),
        greedy_forward(load_peft(default_model.path, adapter_dir / "acme" / "soft"), chat, 16, eos),
    ]
    assert [r["token_ids"] for r in results] == expected
    for result, prompt in zip(results, [chat, plain, chat], strict=True):
        assert result["prompt_tokens"] == len(prompt)
        assert result["text"] == tokenizer.decode(result["token_ids"], skip_special_tokens=True)
        assert result["finish_reason"] in ("length", "eos")
    assert "Paris" in results[0]["text"]


def test_run_reports_every_bad_line_and_writes_nothing(tmp_path: Path):
    lines = [
        json.dumps({"id": 1, "prompt": "fine"}),
        "{not json",
        json.dumps({"id": 3, "prompt": "x", "temperature": "hot"}),
        json.dumps({"prompt": "no id"}),
        json.dumps({"id": 5, "prompt": "x", "messages": QUESTION}),
        json.dumps({"id": 6, "prompt": "x", "max_new_tokens": 0}),
    ]
    done = run_adapterd(tmp_path, lines)
    assert done.returncode == 2
    for number in (2, 3, 4, 5, 6):
        assert f"line {number}:" in done.stderr
    assert "line 1:" not in done.stderr
    assert "temperature must be a number" in done.stderr
    assert not (tmp_path / "results.jsonl").exists()


def test_run_refuses_unknown_adapter_before_generating(tmp_path: Path):
    done = run_adapterd(tmp_path, [json.dumps({"id": "a", "prompt": "hi", "adapter_id": "nope"})])
    assert done.returncode == 2
    assert "'nope' is not registered" in done.stderr
    assert not (tmp_path / "results.jsonl").exists()
