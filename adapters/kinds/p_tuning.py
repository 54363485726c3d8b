"""P-tuning (Liu et al. 2021): virtual-token embeddings made by a prompt encoder (an MLP or LSTM over
learned inputs). PEFT saves the encoder's output as `prompt_embeddings` (and loads it for inference in place
of the encoder), so the encoder has run once before the server sees the adapter: it then serves exactly as
a soft prompt. Hook point "input_embeddings"."""

from __future__ import annotations

from . import prompt_tuning
from .base import AdapterKind

KIND = AdapterKind(
    name="p_tuning",
    peft_type="P_TUNING",
    hook="input_embeddings",
    check=prompt_tuning.check,
    spec=lambda root, config, tensors: prompt_tuning.spec_of("p_tuning", root, config),
    host_weights=prompt_tuning.host_weights,
)
