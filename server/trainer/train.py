"""The training loop: a PEFT adapter (LoRA, QLoRA or prompt tuning) on a frozen base, AdamW, warmup + cosine.

QLoRA (Dettmers et al. 2023) trains LoRA over the NF4, double-quantized base that transformers and
bitsandbytes build, which is byte for byte the base adapterd serves (tests/parity/test_quantized_parity.py).
Prompt tuning (Lester et al. 2021) learns `num_virtual_tokens` input embeddings placed before the prompt.
The loop itself is plain top-to-bottom code, as in nanoGPT's train.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterd.server.model.loader import Placement
from adapterd.server.trainer.config import JobConfig
from adapterd.server.trainer.data import IGNORE_INDEX, TokenizedExample, batches

WARMUP_FRACTION = 0.06
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of the peak
LORA_DROPOUT = 0.05
MAX_GRAD_NORM = 1.0
REPORT_EVERY_S = 0.25  # progress reports: at most this often (and always the first and last step)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    loss: float  # mean over the steps since the last report
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float


def num_steps(config: JobConfig, num_examples: int) -> int:
    return config.max_steps or config.epochs * math.ceil(num_examples / config.batch_size)


def learning_rate(step: int, total_steps: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to MIN_LR_FRACTION * peak at the last step (1-based)."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    config: JobConfig,
    model_dir: Path,
    placement: Placement,
    examples: list[TokenizedExample],
    out_dir: Path,
    report: Callable[[Progress], None],
) -> None:
    """Train the adapter `config` describes on `examples` and save it (PEFT format) to `out_dir`."""
    torch.manual_seed(config.seed)
    model = peft_model(config, model_dir, placement)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.peak_learning_rate, weight_decay=0.0)
    pad_id = pad_token_id(model.config)
    total_steps = num_steps(config, len(examples))
    data = batches(examples, config.batch_size, config.seed)
    model.train()
    started = last_report = time.perf_counter()
    losses: list[float] = []
    num_tokens = 0
    for step in range(1, total_steps + 1):
        lr = learning_rate(step, total_steps, config.peak_learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate(next(data), pad_id, placement.device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        num_tokens += int(batch["attention_mask"].sum())
        now = time.perf_counter()
        if step in (1, total_steps) or now - last_report >= REPORT_EVERY_S:
            seconds_per_step = (now - started) / step
            report(
                Progress(
                    step=step,
                    total_steps=total_steps,
                    loss=sum(losses) / len(losses),
                    learning_rate=lr,
                    tokens_per_second=num_tokens / max(now - last_report, 1e-9),
                    eta_seconds=seconds_per_step * (total_steps - step),
                )
            )
            losses, num_tokens, last_report = [], 0, now
    model.save_pretrained(out_dir)


def peft_model(config: JobConfig, model_dir: Path, placement: Placement) -> Any:
    from peft import get_peft_model

    base = load_base(model_dir, placement)
    for param in base.parameters():
        param.requires_grad_(False)
    return get_peft_model(base, peft_config(config, model_dir))


def load_base(model_dir: Path, placement: Placement) -> Any:
    """The base for training: plain weights in the placement's dtype, or NF4 with double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = None
    if placement.quantize == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=placement.dtype,
        )
    assert placement.quantize in ("nf4", "none"), "training runs on a plain or an NF4 base"
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=placement.dtype,
        quantization_config=quantization,
        device_map={"": str(placement.device)},
    )


def peft_config(config: JobConfig, model_dir: Path) -> Any:
    """PEFT's config for the job's method (what the server serves as that kind, adapters/kinds)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, TaskType

    if config.is_ranked:
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.rank,
            lora_alpha=config.alpha,  # type: ignore[arg-type] # PEFT annotates int; any number works
            target_modules=list(config.target_modules),
            lora_dropout=LORA_DROPOUT,
            bias="none",
            use_dora=config.method == "dora",
        )
    if config.method == "ia3":
        # IA3 scales the outputs of its targets, and the input of the MLP's down projection (the
        # intermediate activations), as in Liu et al. 2022.
        targets = list(config.target_modules)
        return IA3Config(
            task_type=TaskType.CAUSAL_LM,
            target_modules=targets,
            feedforward_modules=[m for m in targets if m == "down_proj"],
        )
    if config.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    if config.method == "p_tuning":
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens)
    return prompt_tuning_config(config, model_dir)


def prompt_tuning_config(config: JobConfig, model_dir: Path) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    text = config.prompt_tuning_init_text
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config.num_virtual_tokens,
        # "Random": embeddings of randomly sampled vocabulary tokens, at the scale the model expects.
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.SAMPLE_VOCAB,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(model_dir) if text else None,
    )


def pad_token_id(model_config: Any) -> int:
    for candidate in (model_config.pad_token_id, model_config.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def collate(examples: list[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask and labels, each [B, T]."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}
