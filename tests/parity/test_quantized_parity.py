"""NF4 (QLoRA's format) and LLM.int8 bases on CPU: adapterd quantizes to the same bytes as transformers,
its logits follow PEFT's on the same quantized base, and its greedy tokens equal PEFT's wherever PEFT's
own choice is not a near-tie.

Why near-ties are excluded (found while writing these tests): bitsandbytes' CPU kernels round activations
before the matmul (NF4 computes in bf16, int8 quantizes rows to int8), so a 1e-7 difference upstream, such
as two attention kernels summing in another order, can move a logit by ~1e-2. PEFT disagrees with itself
the same way: its `generate()` and its forward pass differ on this base (see the last test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig

from adapterd.server.common.config import EngineConfig
from adapterd.server.common.protocol import SamplingParams
from adapterd.server.engine.engine import LLMEngine
from adapterd.server.engine.logprobs import token_logprobs
from adapterd.server.llm import LLM
from adapterd.server.model.loader import Placement, load_model
from tests.reference import greedy_forward, load_base, load_peft, make_lora_adapter, make_prompt_adapter

PROMPTS = [[5, 6, 7, 8, 9, 11], [9, 8, 7, 6, 5, 4, 3, 2], [100, 50, 25, 12]]
NEW_TOKENS = 24
NOISE = 0.1  # logit noise of bitsandbytes' CPU kernels; a wrongly applied adapter moves logits by > 1


def bnb_config(quantize: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """transformers' config for adapterd's --quantize (None for none): NF4 with double quantization, int8."""
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True) if quantize == "int8" else None


BNB = {quantize: bnb_config(quantize, torch.float32) for quantize in ("nf4", "int8")}


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-adapters")
    return {
        "lora": make_lora_adapter(tiny_llama, root / "lora", r=16, alpha=32, target_modules="all-linear"),
        "soft": make_prompt_adapter(tiny_llama, root / "soft", num_virtual_tokens=8, seed=3),
    }


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quantized(request: pytest.FixtureRequest, tiny_llama: Path, adapters: dict[str, Path]):
    config = EngineConfig(max_rank=16, max_gpu_adapters=2, max_soft_prompts=2, kv_cache_tokens=1024)
    llm = LLM(model=str(tiny_llama), quantize=request.param, device="cpu", engine=config)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    llm.loop.stop()  # these tests drive the engine step by step
    yield request.param, llm
    llm.close()


def peft_model(base: Path, adapter: Path | None, quantize: str):
    config = BNB[quantize]
    return (
        load_base(base, quantization_config=config)
        if adapter is None
        else load_peft(base, adapter, quantization_config=config)
    )


def generate_with_logits(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """PEFT's greedy `generate()`: its tokens and the logits it chose them from, step by step: [N, vocab].
    Incremental like adapterd's decoding, so int8's row coupling sees the same rows on both sides."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), torch.cat(out.logits).float()


def peft_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """PEFT's next-token logits after the prompt and each prefix of `tokens` (full forward): [N, vocab]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    start = logits.shape[0] - len(tokens) - 1  # a soft prompt's virtual rows come first
    return logits[start : start + len(tokens)].float()


def engine_logits(engine: LLMEngine, adapter, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """adapterd's logits at each step, with `tokens` forced as the choices (teacher forcing): [N, vocab]."""
    seq = engine.add_request(
        "forced",
        prompt,
        SamplingParams(max_new_tokens=len(tokens), ignore_eos=True),
        adapter,
        lambda event: None,
    )
    rows = []
    for token in tokens:
        seqs, is_prefill = engine.scheduler.schedule()
        assert seqs == [seq]
        rows.append(engine.runner.run(seqs, is_prefill)[0])
        engine.postprocess(seqs, token_logprobs(rows[-1][None], torch.tensor([token]), 0))
    assert not engine.has_work
    return torch.stack(rows)


def free_greedy(engine: LLMEngine, adapter, prompt: list[int]) -> list[int]:
    done: list[list[int]] = []
    engine.add_request(
        "free",
        prompt,
        SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        adapter,
        lambda e: done.append(list(e.token_ids)) if hasattr(e, "token_ids") else None,
    )
    while engine.has_work:
        engine.step()
    return done[0]


def first_divergence(ours: list[int], expected: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ours, expected, strict=True)) if a != b), len(expected))


def margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2).values
    return float(top2[0] - top2[1])


def test_quantized_base_follows_peft(quantized, tiny_llama: Path, adapters: dict[str, Path]):
    """For the base, a LoRA and a soft prompt on each prompt: logits along PEFT's greedy path agree within
    the kernels' noise at every step, and free greedy decoding equals PEFT's tokens up to the end or up to
    a step where PEFT's top two are a near-tie. Most tokens must match, or the exclusion hollows the test."""
    quantize, llm = quantized
    matched = []
    for adapter in (None, "lora", "soft") if quantize == "nf4" else (None, "lora"):
        model = peft_model(tiny_llama, adapters[adapter] if adapter else None, quantize)
        loaded = llm.adapters.resolve(adapter)
        for prompt in PROMPTS:
            if adapter == "soft":  # no int8 here: a full forward sees other rows than decoding does
                expected = greedy_forward(model, prompt, NEW_TOKENS)
                theirs = peft_logits(model, prompt, expected)
            else:
                expected, theirs = generate_with_logits(model, prompt)
            ours = engine_logits(llm.engine, loaded, prompt, expected)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=NOISE, msg=f"{adapter} {prompt}")
            split = first_divergence(free_greedy(llm.engine, loaded, prompt), expected)
            assert split == NEW_TOKENS or margin(theirs[split]) < 2 * NOISE, f"{adapter} {prompt}: {split}"
            matched.append(split)
    assert sum(matched) >= 0.75 * NEW_TOKENS * len(matched), matched


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_weights_are_the_bytes_transformers_makes(quantize: str, tiny_llama: Path):
    """Compared before any forward: bitsandbytes repacks CPU NF4 weights in place on first use."""
    ours = load_model(tiny_llama, Placement.resolve("cpu", quantize)).layers[1].mlp.down_proj.base.weight
    theirs = load_base(tiny_llama, quantization_config=BNB[quantize]).model.layers[1].mlp.down_proj.weight
    assert ours.dtype == theirs.dtype == (torch.uint8 if quantize == "nf4" else torch.int8)
    assert torch.equal(ours.data, theirs.data)
    if quantize == "nf4":  # double quantization: the absmax constants are quantized too
        assert ours.quant_state.nested and theirs.quant_state.nested
        assert torch.equal(ours.quant_state.absmax, theirs.quant_state.absmax)


def test_cpu_nf4_rounds_activations_to_bf16(tiny_llama: Path):
    """The finding behind NOISE: on CPU, bitsandbytes' NF4 matmul gives the same result for x and for x
    rounded to bf16, so it cannot resolve fp32 differences below bf16's precision."""
    layer = load_base(tiny_llama, quantization_config=BNB["nf4"]).model.layers[0].mlp.down_proj
    x = torch.randn(1, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.bfloat16().float()))
        assert not torch.equal(x, x.bfloat16().float())


def test_int8_rows_depend_on_their_batch_neighbours(tiny_llama: Path):
    """LLM.int8 (Dettmers et al. 2022) computes in 16 bits every input *column* whose magnitude passes the
    threshold (6.0) in ANY row, so a row's output depends on the other rows of the same matmul. This is
    bitsandbytes' own behaviour, shown on its Linear8bitLt alone: int8 serving is not batch-invariant."""
    layer = load_base(tiny_llama, quantization_config=BNB["int8"]).model.layers[0].mlp.down_proj
    generator = torch.Generator().manual_seed(0)
    calm = torch.randn(1, 1, layer.in_features, generator=generator) * 0.5
    loud = torch.randn(1, 1, layer.in_features, generator=generator) * 0.5
    loud[..., :8] = 40.0  # outlier features
    with torch.no_grad():
        assert not torch.equal(layer(calm), layer(torch.cat([calm, loud]))[:1])
