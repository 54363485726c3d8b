"""transformers + PEFT's side: `generate()` on the base model, one adapter, and mixed batches.

Mixed batches use PEFT's own API for them, `generate(..., adapter_names=[...])`. All prompts have the same
length, so no padding is needed (the attention mask is all ones). Generation is greedy and never stops at
eos. A logits processor stamps the time of every step, so prefill and decode are timed inside one call.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import LogitsProcessor, LogitsProcessorList

from .adapters import lora_config
from .timing import Run, synchronize


class StepClock(LogitsProcessor):
    """Records when each step's logits are ready (after the device finished the forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time at the same moments

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        return scores


class PeftSide:
    def __init__(
        self,
        hf_model: Any,
        states: list[dict[str, torch.Tensor]],
        num_adapters: int,
        rank: int,
        base_name: str,
        device: torch.device,
    ) -> None:
        """`num_adapters` LoRA adapters named lora-0.., adapter i holding the weights `states[i % len]`."""
        config = lora_config(rank, base_name)
        self.device = device
        with torch.device(device):  # PEFT creates the LoRA weights where they will live
            self.model: PeftModel = get_peft_model(hf_model, config, adapter_name="lora-0")
            for index in range(num_adapters):
                name = f"lora-{index}"
                if index:
                    self.model.add_adapter(name, config)
                set_peft_model_state_dict(self.model, states[index % len(states)], adapter_name=name)
        self.model.eval()
        self.pad_token_id = _pad_token_id(hf_model.config)

    def run(self, prompts: torch.Tensor, max_new_tokens: int, adapters: str | list[str] | None) -> Run:
        """`adapters`: None for the base model, one name for the whole batch, or one name per row."""
        prompts = prompts.to(self.device)
        clock = StepClock(self.device)
        kwargs: dict[str, Any] = {}
        if isinstance(adapters, list):
            kwargs["adapter_names"] = adapters
        elif adapters is not None:
            self.model.set_adapter(adapters)
        context = self.model.disable_adapter() if adapters is None else nullcontext()
        synchronize(self.device)
        start = time.perf_counter()
        with context, torch.inference_mode():
            out = self.model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=self.pad_token_id,
                logits_processor=LogitsProcessorList([clock]),
                **kwargs,
            )
        synchronize(self.device)
        end = time.perf_counter()
        batch, prompt_len = prompts.shape
        assert out.shape == (batch, prompt_len + max_new_tokens), "generate() stopped early"
        first, last = clock.times[0], clock.times[-1]
        decode_cpu = clock.cpu_times[-1] - clock.cpu_times[0]
        return Run(batch, batch * max_new_tokens, first - start, last - first, end - start, decode_cpu)

    def time_load(self, adapter_dir: Path, name: str) -> float:
        """Seconds for PEFT to load a saved adapter from disk onto the model's device."""
        synchronize(self.device)
        start = time.perf_counter()
        self.model.load_adapter(str(adapter_dir), adapter_name=name)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.model.delete_adapter(name)
        return seconds


def _pad_token_id(config: Any) -> int:
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
