"""The table of adapter kinds: one module each (see `base.AdapterKind`). Adding a kind is adding its module
here; the format, store, registry and engine ask the kind, never branch on its name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import dora, ia3, lora, p_tuning, prefix_tuning, prompt_tuning
from .base import AdapterKind, Hook, HostWeights, LinearWeights, PrefixWeights, PromptWeights

KINDS: dict[str, AdapterKind] = {
    kind.name: kind
    for kind in (lora.KIND, dora.KIND, ia3.KIND, prompt_tuning.KIND, p_tuning.KIND, prefix_tuning.KIND)
}
SUPPORTED_PEFT_TYPES = tuple(dict.fromkeys(kind.peft_type for kind in KINDS.values()))


def kind_for(config: Mapping[str, Any]) -> AdapterKind | None:
    """The kind of an adapter_config.json, None when its peft_type is not served."""
    peft_type = config.get("peft_type")
    return next(
        (kind for kind in KINDS.values() if kind.peft_type == peft_type and kind.selects(config)), None
    )


__all__ = [
    "KINDS",
    "SUPPORTED_PEFT_TYPES",
    "AdapterKind",
    "Hook",
    "HostWeights",
    "LinearWeights",
    "PrefixWeights",
    "PromptWeights",
    "kind_for",
]
