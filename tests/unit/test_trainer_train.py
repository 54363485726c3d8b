"""The training loop on a tiny random Llama: LoRA, QLoRA (NF4) and prompt tuning each learn a small task,
save an adapter that adapterd accepts, and adapterd's own engine then generates what was learned. Plus the
learning-rate schedule and batching."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
from adapterd.server.model.loader import Placement
from adapterd.server.trainer import train as train_module
from adapterd.server.trainer.config import JobConfig
from adapterd.server.trainer.data import IGNORE_INDEX, TokenizedExample
from adapterd.server.trainer.train import Progress, collate, learning_rate, num_steps, train

EOS = 2  # make_tiny_llama's


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    rates = [learning_rate(step, 100, 1.0) for step in range(1, 101)]
    assert rates[0] == pytest.approx(1 / 6) and rates[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[5:]))
    assert rates[-1] == pytest.approx(0.1)
    assert learning_rate(1, 1, 0.5) == 0.5


def test_steps_come_from_max_steps_or_epochs() -> None:
    job = JobConfig.from_dict({"adapter_id": "a", "method": "lora", "epochs": 2, "batch_size": 4})
    assert num_steps(job, 10) == 6
    assert num_steps(job.replace(max_steps=7), 10) == 7


def test_collate_pads_right_and_masks_the_padding() -> None:
    batch = collate(
        [TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8], [8])],
        0,
        torch.device("cpu"),
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def examples(constant: bool) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion + eos) pairs: the completion depends on the prompt's last token unless constant."""
    return [([10, 11, 12, k], [50, 51, EOS] if constant else [k + 20, k + 40, EOS]) for k in range(30, 34)]


def tokenized(pairs: list[tuple[list[int], list[int]]]) -> list[TokenizedExample]:
    return [TokenizedExample(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in pairs]


@pytest.mark.parametrize(
    ("method", "quantize", "values"),
    [
        ("lora", "none", {"learning_rate": 1e-2, "rank": 8}),
        ("qlora", "nf4", {"learning_rate": 1e-2, "rank": 8, "alpha": 8}),
        ("prompt_tuning", "none", {"learning_rate": 1e-1, "num_virtual_tokens": 4}),
        ("dora", "none", {"learning_rate": 1e-2, "rank": 8}),
        ("ia3", "none", {"learning_rate": 1e-1}),
        ("p_tuning", "none", {"learning_rate": 1e-2, "num_virtual_tokens": 4}),
        ("prefix_tuning", "none", {"learning_rate": 1e-1, "num_virtual_tokens": 4}),
    ],
)
def test_a_trained_adapter_serves_what_it_learned(
    method: str,
    quantize: str,
    values: dict[str, object],
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(train_module, "REPORT_EVERY_S", 0.0)  # report every step: the last loss is its own
    pairs = examples(constant=method in ("prompt_tuning", "p_tuning", "prefix_tuning", "ia3"))
    job = JobConfig.from_dict(
        {"adapter_id": "a", "method": method, "max_steps": 80, "batch_size": 4, **values}
    )
    reports: list[Progress] = []
    train(
        job,
        tiny_llama,
        Placement.resolve("cpu", quantize),
        tokenized(pairs),
        tmp_path / "adapter",
        reports.append,
    )
    assert [r.step for r in reports] == list(range(1, 81)) and reports[-1].total_steps == 80
    assert reports[-1].loss < 0.1 < reports[0].loss
    assert reports[-1].eta_seconds == 0 and all(r.tokens_per_second > 0 for r in reports)

    engine = EngineConfig(max_rank=8, max_gpu_adapters=1, max_soft_prompts=1, kv_cache_tokens=1024)
    with LLM(model=str(tiny_llama), quantize=quantize, device="cpu", engine=engine) as llm:
        llm.add_adapter("trained", tmp_path / "adapter")  # adapterd's own validation accepts it
        params = SamplingParams(max_new_tokens=8, temperature=0.0)
        requests = [
            GenerateRequest(prompt_ids=tuple(p), adapter_id="trained", params=params) for p, _ in pairs
        ]
        outputs = llm.generate(requests)
    for (_, completion), output in zip(pairs, outputs, strict=True):
        assert list(output.token_ids) == completion and output.finish_reason == "eos"
