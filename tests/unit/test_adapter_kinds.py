"""The adapter kinds' table and validation of real PEFT-made DoRA, IA³, prefix-tuning and P-tuning adapters
on a tiny random Llama (GQA: 4 heads, 2 KV heads): what loads, and each malformed variant refused with a
problem naming its field."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig

from adapterd.adapters.format import BaseModelInfo, read_adapter, read_adapter_tensors
from adapterd.adapters.io import host_weights
from adapterd.adapters.kinds import KINDS, LinearWeights, PrefixWeights, PromptWeights, kind_for
from tests.unit.test_adapter_format import (
    MAX_RANK,
    assert_refused,
    edit_config,
    edit_tensors,
    poison,
    save_adapter,
    set_tensor,
    tiny_llama_config,
)

Q_MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
K_IA3 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
DOWN_IA3 = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
PROMPT = "prompt_embeddings"
CONFIGS = {
    "dora": LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    ),
    "ia3": IA3Config(task_type="CAUSAL_LM"),
    "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_projection": PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16
    ),
    "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "p_tuning_lstm": PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        encoder_hidden_size=16,
        encoder_reparameterization_type="LSTM",
    ),
}


@pytest.fixture(scope="module")
def base() -> BaseModelInfo:
    return BaseModelInfo.from_hf_config(tiny_llama_config(), name="tiny-llama")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {name: save_adapter(root / name, config) for name, config in CONFIGS.items()}


def copy(saved: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / name))


def test_the_table_has_one_entry_per_kind_and_picks_dora_by_its_option() -> None:
    assert list(KINDS) == ["lora", "dora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
    assert kind_for({"peft_type": "LORA"}) is KINDS["lora"]
    assert kind_for({"peft_type": "LORA", "use_dora": True}) is KINDS["dora"]
    assert kind_for({"peft_type": "LOHA"}) is None
    assert {kind.hook for kind in KINDS.values()} == {"linear", "input_embeddings", "kv_prefix"}


@pytest.mark.parametrize(
    ("name", "kind", "weights_type"),
    [
        ("dora", "dora", LinearWeights),
        ("ia3", "ia3", LinearWeights),
        ("prefix_tuning", "prefix_tuning", PrefixWeights),
        ("prefix_projection", "prefix_tuning", PrefixWeights),
        ("p_tuning", "p_tuning", PromptWeights),
        ("p_tuning_lstm", "p_tuning", PromptWeights),
    ],
)
def test_peft_made_adapters_of_each_kind_load(
    saved: dict[str, Path], base: BaseModelInfo, name: str, kind: str, weights_type: type
) -> None:
    spec, tensors = read_adapter_tensors(saved[name], base, MAX_RANK)
    assert spec.kind == kind
    weights = host_weights(spec, tensors, base, torch.float32)
    assert isinstance(weights, weights_type)


def test_dora_keeps_lora_and_one_magnitude_per_output(saved: dict[str, Path], base: BaseModelInfo) -> None:
    spec, tensors = read_adapter_tensors(saved["dora"], base, MAX_RANK)
    weights = host_weights(spec, tensors, base, torch.float32)
    assert isinstance(weights, LinearWeights) and weights.lora is not None
    assert (spec.rank, spec.target_modules) == (4, ("q_proj", "v_proj"))
    assert (
        set(weights.magnitudes)
        == set(weights.lora.a)
        == {(layer, m) for layer in (0, 1) for m in ("q_proj", "v_proj")}
    )
    assert torch.equal(weights.magnitudes[(0, "q_proj")], tensors[Q_MAGNITUDE])


def test_ia3_scales_outputs_of_attention_and_the_input_of_feedforward_modules(
    saved: dict[str, Path], base: BaseModelInfo
) -> None:
    spec, tensors = read_adapter_tensors(saved["ia3"], base, MAX_RANK)
    weights = host_weights(spec, tensors, base, torch.float32)
    assert isinstance(weights, LinearWeights) and weights.lora is None and weights.rank == 0
    assert set(weights.out_scales) == {(layer, m) for layer in (0, 1) for m in ("k_proj", "v_proj")}
    assert set(weights.in_scales) == {(0, "down_proj"), (1, "down_proj")}
    assert weights.in_scales[(0, "down_proj")].shape == (128,) and weights.out_scales[
        (0, "k_proj")
    ].shape == (32,)


def test_prefix_splits_into_per_layer_keys_and_values_as_peft_does(
    saved: dict[str, Path], base: BaseModelInfo
) -> None:
    spec, tensors = read_adapter_tensors(saved["prefix_tuning"], base, MAX_RANK)
    weights = host_weights(spec, tensors, base, torch.float32)
    assert isinstance(weights, PrefixWeights)
    assert weights.keys.shape == weights.values.shape == (2, 4, 2, 16)  # layers, V, KV heads, head_dim
    # PEFT: view [V, layers * 2, heads, head_dim], layer i's keys at 2i and values at 2i + 1.
    raw = tensors[PROMPT].view(4, 4, 2, 16)
    assert torch.equal(weights.keys[1], raw[:, 2]) and torch.equal(weights.values[1], raw[:, 3])


@pytest.mark.parametrize(
    ("edit", "field", "text"),
    [
        pytest.param(set_tensor(Q_MAGNITUDE, torch.ones(7)), Q_MAGNITUDE, "expected [64]", id="shape"),
        pytest.param(poison(Q_MAGNITUDE, math.nan), Q_MAGNITUDE, "NaN", id="nan"),
        pytest.param(lambda t: t.pop(Q_MAGNITUDE), "lora_magnitude_vector", "layer 0 q_proj", id="missing"),
        pytest.param(
            set_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", torch.ones(128)),
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            "no matching lora_A",
            id="orphan",
        ),
    ],
)
def test_malformed_dora_is_refused(saved, base, tmp_path: Path, edit, field: str, text: str) -> None:
    path = copy(saved, "dora", tmp_path)
    edit_tensors(path, edit)
    assert_refused(path, base, field, text)


@pytest.mark.parametrize(
    ("edit", "field", "text"),
    [
        pytest.param(set_tensor(K_IA3, torch.ones(1, 64)), K_IA3, "[32, 1]", id="out-shape"),
        pytest.param(set_tensor(DOWN_IA3, torch.ones(64, 1)), DOWN_IA3, "[1, 128]", id="in-shape"),
        pytest.param(poison(K_IA3, math.inf), K_IA3, "Inf", id="inf"),
        pytest.param(lambda t: t.clear(), "adapter_model.safetensors", "no IA3 vectors", id="empty"),
        pytest.param(
            set_tensor("base_model.model.model.layers.0.self_attn.c_attn.ia3_l", torch.ones(32, 1)),
            "base_model.model.model.layers.0.self_attn.c_attn.ia3_l",
            "c_attn",
            id="module",
        ),
        pytest.param(
            set_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", torch.ones(4, 64)),
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
            "unrecognised",
            id="foreign",
        ),
    ],
)
def test_malformed_ia3_is_refused(saved, base, tmp_path: Path, edit, field: str, text: str) -> None:
    path = copy(saved, "ia3", tmp_path)
    edit_tensors(path, edit)
    assert_refused(path, base, field, text)


@pytest.mark.parametrize(
    ("name", "changes", "field", "text"),
    [
        ("ia3", {"feedforward_modules": ["c_fc"]}, "feedforward_modules", "c_fc"),
        ("ia3", {"modules_to_save": ["lm_head"]}, "modules_to_save", "not supported"),
        ("prefix_tuning", {"token_dim": 64}, "token_dim", "32"),
        ("prefix_tuning", {"num_layers": 3}, "num_layers", "2"),
        ("prefix_tuning", {"num_attention_heads": 4}, "num_attention_heads", "2"),
        ("prefix_tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens", "positive integer"),
        ("prefix_tuning", {"num_transformer_submodules": 2}, "num_transformer_submodules", "1"),
        ("p_tuning", {"token_dim": 32}, "token_dim", "64"),
        ("p_tuning", {"num_virtual_tokens": 5}, PROMPT, "[5, 64]"),
    ],
)
def test_malformed_configs_are_refused(saved, base, tmp_path: Path, name, changes, field, text) -> None:
    path = copy(saved, name, tmp_path)
    edit_config(path, **changes)
    assert_refused(path, base, field, text)


@pytest.mark.parametrize(
    ("name", "edit", "text"),
    [
        ("prefix_tuning", set_tensor(PROMPT, torch.zeros(4, 127)), "[4, 128]"),
        ("prefix_tuning", poison(PROMPT, math.nan), "NaN"),
        ("prefix_tuning", lambda t: t.pop(PROMPT), "missing"),
        ("p_tuning", set_tensor(PROMPT, torch.zeros(4, 32)), "[4, 64]"),
        ("p_tuning", lambda t: t.pop(PROMPT), "missing"),
    ],
)
def test_malformed_prompt_learning_tensors_are_refused(saved, base, tmp_path: Path, name, edit, text) -> None:
    path = copy(saved, name, tmp_path)
    edit_tensors(path, edit)
    assert_refused(path, base, PROMPT, text)


def test_read_adapter_reports_the_kind(saved: dict[str, Path], base: BaseModelInfo) -> None:
    assert read_adapter(saved["p_tuning"], base, MAX_RANK).num_virtual_tokens == 4
