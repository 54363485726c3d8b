"""On the default model (SmolLM2-135M-Instruct, fp32), adapterd's greedy tokens equal PEFT's for LoRA and
soft prompts, alone and all in one batch with the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import GenerateRequest, SamplingParams
from adapterd.server.llm import LLM
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
NEW_TOKENS = 32
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 3?"]


@pytest.fixture(scope="module")
def tokenizer(default_model: ResolvedModel):
    return AutoTokenizer.from_pretrained(default_model.path)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def adapters(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, base = tmp_path_factory.mktemp("default-adapters"), default_model.path
    return {
        "lora-r16-all": make_lora_adapter(base, root / "l16", r=16, alpha=32, target_modules="all-linear"),
        "lora-r4-attn-rslora": make_lora_adapter(
            base, root / "l4", r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, seed=1
        ),
        "soft-text12": make_prompt_adapter(
            base, root / "t12", num_virtual_tokens=12, init_text="Answer in French only."
        ),
        "soft-random20": make_prompt_adapter(base, root / "r20", num_virtual_tokens=20, seed=2),
    }


NEEDED = [
    (None, 0),
    (None, 2),
    ("lora-r16-all", 0),
    ("lora-r16-all", 1),
    ("lora-r4-attn-rslora", 0),
    ("soft-text12", 0),
    ("soft-text12", 1),
    ("soft-random20", 0),
]


@pytest.fixture(scope="module")
def expected(default_model: ResolvedModel, adapters: dict[str, Path], prompts, tokenizer) -> dict:
    """PEFT's greedy tokens for (adapter, prompt index): generate() for LoRA, forward passes for soft prompts."""
    refs = {}
    for name in dict.fromkeys(name for name, _ in NEEDED):
        model = (
            load_base(default_model.path) if name is None else load_peft(default_model.path, adapters[name])
        )
        decode = greedy_forward if name and name.startswith("soft") else greedy_generate
        for key in [k for k in NEEDED if k[0] == name]:
            refs[key] = decode(model, prompts[key[1]], NEW_TOKENS, tokenizer.eos_token_id)
    return refs


@pytest.fixture(scope="module")
def llm(adapters: dict[str, Path]) -> LLM:
    config = EngineConfig(max_rank=16, max_gpu_adapters=2, max_soft_prompts=2, kv_cache_tokens=4096)
    engine = LLM(model="default", quantize="none", device="cpu", engine=config)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    yield engine
    engine.close()


def request(prompt: list[int], adapter: str | None) -> GenerateRequest:
    return GenerateRequest(prompt_ids=tuple(prompt), adapter_id=adapter, params=SamplingParams(NEW_TOKENS))


def test_each_adapter_alone_equals_peft(llm: LLM, prompts, expected: dict, adapters: dict[str, Path]):
    for name in adapters:
        [out] = llm.generate([request(prompts[0], name)])
        assert list(out.token_ids) == expected[name, 0], name
        if name != "soft-random20":  # noise-like rows the model ignores; the other three change the answer
            assert expected[name, 0] != expected[None, 0], f"{name} must change the answer"


def test_one_batch_of_base_loras_and_soft_prompts_equals_peft(llm: LLM, prompts, expected: dict):
    rows = [
        (None, 0),
        (None, 2),
        ("lora-r16-all", 1),
        ("lora-r4-attn-rslora", 0),
        ("soft-text12", 1),
        ("soft-random20", 0),
        ("lora-r16-all", 0),
    ]
    outputs = llm.generate([request(prompts[i], name) for name, i in rows])
    assert [list(o.token_ids) for o in outputs] == [expected[row] for row in rows]


def test_base_model_answers_sensibly(llm: LLM):
    messages = ({"role": "user", "content": QUESTIONS[0]},)
    [out] = llm.generate([GenerateRequest(messages=messages, params=SamplingParams(NEW_TOKENS))])
    assert "Paris" in out.text and out.finish_reason == "eos"
