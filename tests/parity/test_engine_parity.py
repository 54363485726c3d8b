"""adapterd's greedy tokens equal PEFT's on a tiny random Llama: alone, in mixed batches, and when
requests join a batch that is already generating."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import Completion, GenerateRequest, SamplingParams, TokenEvent
from adapterd.server.llm import LLM
from tests.reference import make_lora_adapter, make_prompt_adapter, peft_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [10, 20, 30], list(range(40, 77)), [100, 3, 100, 3, 7, 19, 200, 201]]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_CASES = {  # name: (r, alpha, target_modules, use_rslora)
    "r4-attn": (4, 8, ATTENTION, False),
    "r4-all": (4, 4, "all-linear", False),
    "r16-attn": (16, 8, ATTENTION, False),
    "r16-all-rslora": (16, 32, "all-linear", True),
    "r64-attn-rslora": (64, 16, ATTENTION, True),
    "r64-all": (64, 128, "all-linear", False),
}


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {
        name: make_lora_adapter(
            tiny_llama, root / name, r=r, alpha=alpha, target_modules=targets, use_rslora=rslora, seed=seed
        )
        for seed, (name, (r, alpha, targets, rslora)) in enumerate(LORA_CASES.items())
    }
    for virtual in (8, 20):
        made[f"soft{virtual}"] = make_prompt_adapter(
            tiny_llama, root / f"soft{virtual}", num_virtual_tokens=virtual, seed=virtual
        )
    return made


@pytest.fixture(scope="module")
def llm(tiny_llama: Path, adapters: dict[str, Path]) -> LLM:
    config = EngineConfig(max_rank=64, max_gpu_adapters=4, max_soft_prompts=2, kv_cache_tokens=4096)
    engine = LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=config)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    yield engine
    engine.close()


def reference(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    return peft_greedy(base, adapter, prompt, NEW_TOKENS)


def run(llm: LLM, adapter_id: str | None, prompt: list[int]) -> list[int]:
    [out] = llm.generate([GenerateRequest(prompt_ids=tuple(prompt), adapter_id=adapter_id, params=GREEDY)])
    return list(out.token_ids)


@pytest.mark.parametrize("name", LORA_CASES)
def test_lora_alone_equals_peft_generate(llm: LLM, tiny_llama: Path, adapters: dict[str, Path], name: str):
    expected = reference(tiny_llama, adapters[name], PROMPTS[0])
    assert expected != reference(tiny_llama, None, PROMPTS[0]), "the adapter must change the output"
    assert run(llm, name, PROMPTS[0]) == expected


@pytest.mark.parametrize("virtual", [8, 20])
def test_soft_prompt_alone_equals_peft_forward(
    llm: LLM, tiny_llama: Path, adapters: dict[str, Path], virtual: int
):
    name = f"soft{virtual}"
    expected = reference(tiny_llama, adapters[name], PROMPTS[1])
    assert expected != reference(tiny_llama, None, PROMPTS[1])
    assert run(llm, name, PROMPTS[1]) == expected


MIXED = [  # (adapter, prompt): the base, three LoRA ranks and two soft prompts in one batch
    (None, PROMPTS[0]),
    ("r4-attn", PROMPTS[1]),
    ("r16-all-rslora", PROMPTS[2]),
    ("r64-all", PROMPTS[3]),
    ("soft8", PROMPTS[2]),
    ("soft20", PROMPTS[0]),
]


@pytest.fixture(scope="module")
def mixed_expected(tiny_llama: Path, adapters: dict[str, Path]) -> list[list[int]]:
    return [reference(tiny_llama, adapters[a] if a else None, p) for a, p in MIXED]


def test_mixed_batch_equals_peft_row_by_row(llm: LLM, mixed_expected: list[list[int]]):
    requests = [GenerateRequest(prompt_ids=tuple(p), adapter_id=a, params=GREEDY) for a, p in MIXED]
    outputs = llm.generate(requests)
    assert [list(o.token_ids) for o in outputs] == mixed_expected


def test_requests_joining_a_running_batch_equal_peft(
    tiny_llama: Path, adapters: dict[str, Path], mixed_expected: list[list[int]]
):
    """Drive the engine step by step: half the rows join after the first ones generated 5 tokens."""
    config = EngineConfig(max_rank=64, max_gpu_adapters=4, max_soft_prompts=2, kv_cache_tokens=4096)
    llm = LLM(model=str(tiny_llama), quantize="none", device="cpu", engine=config)
    for name in {a for a, _ in MIXED if a}:
        llm.add_adapter(name, adapters[name])
    llm.loop.stop()  # stop the engine thread; this test is the engine's only caller
    engine, done = llm.engine, {}

    def add(i: int) -> None:
        adapter, prompt = MIXED[i]
        engine.add_request(str(i), prompt, GREEDY, llm.adapters.resolve(adapter), collect(done, i))

    for i in range(0, len(MIXED), 2):
        add(i)
    for _ in range(5):  # one prefill step (1 token each), then 4 decode steps
        engine.step()
    first = list(engine.scheduler.running)
    assert len(first) == 3 and all(len(s.output_ids) == 5 for s in first)
    for i in range(1, len(MIXED), 2):
        add(i)
    engine.step()  # the joiners' prefill ...
    assert len(engine.scheduler.running) == 6
    while engine.has_work:
        engine.step()
    assert [done[i] for i in range(len(MIXED))] == mixed_expected


def collect(done: dict[int, list[int]], i: int):
    def sink(event: TokenEvent | Completion) -> None:
        if isinstance(event, Completion):
            done[i] = list(event.token_ids)

    return sink
