"""Reading and validating real PEFT adapters saved from a tiny random Llama."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from peft.config import PeftConfig
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from adapterd.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterValidationError,
    BaseModelInfo,
    InvalidAdapterId,
    read_adapter,
    validate_adapter_id,
)
from adapterd.adapters.io import load_lora_weights, load_prompt_embeddings
from adapterd.adapters.kinds.common import AdapterProblem, group_key

MAX_RANK = 16
ATTENTION = ("k_proj", "o_proj", "q_proj", "v_proj")
ALL_LINEAR = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
PROMPT = "prompt_embeddings"
TensorEdit = Callable[[dict[str, torch.Tensor]], None]


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


def save_adapter(path: Path, peft_config: PeftConfig) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(tiny_llama_config()), peft_config)
    model.save_pretrained(str(path))
    return path


def lora(**kwargs: Any) -> LoraConfig:
    # init_lora_weights=False gives a non-zero B, so scaling tests can fail.
    return LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **kwargs})


def prompt_tuning(num_virtual_tokens: int = 5) -> PromptTuningConfig:
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)


@pytest.fixture(scope="module")
def base() -> BaseModelInfo:
    return BaseModelInfo.from_hf_config(tiny_llama_config(), name="tiny-llama")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": save_adapter(root / "lora", lora(target_modules=list(ATTENTION))),
        "prompt": save_adapter(root / "prompt", prompt_tuning()),
    }


@pytest.fixture
def lora_dir(saved: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved["lora"], tmp_path / "lora"))


@pytest.fixture
def prompt_dir(saved: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved["prompt"], tmp_path / "prompt"))


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def edit_tensors(path: Path, edit: TensorEdit) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def refusal(path: Path, base: BaseModelInfo, max_rank: int = MAX_RANK) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as info:
        read_adapter(path, base, max_rank)
    return info.value


def shown(p: AdapterProblem, err: AdapterValidationError) -> bool:
    """The message names `p`: as it is, or as the first of the same problem in other layers."""
    alike = [q.message for q in err.problems if group_key(q.message) == group_key(p.message)]
    return alike[0] in str(err) and (p.message == alike[0] or "more layer" in str(err))


def assert_refused(path: Path, base: BaseModelInfo, field: str, *texts: str) -> None:
    err = refusal(path, base)
    problems = [p for p in err.problems if p.field == field]
    assert problems, f"no problem for {field!r} in: {err}"
    assert all(p.message.startswith(f"{field}: ") and shown(p, err) for p in problems)
    for text in texts:
        assert any(text in p.message for p in problems), f"{text!r} not in {problems}"


# --- base model ------------------------------------------------------------------------------------------


def test_base_model_info_from_llama_config(base: BaseModelInfo) -> None:
    assert (base.name, base.hidden_size, base.num_layers) == ("tiny-llama", 64, 2)
    assert dict(base.linear_shapes) == {
        "q_proj": (64, 64),
        "k_proj": (64, 32),
        "v_proj": (64, 32),
        "o_proj": (64, 64),
        "gate_proj": (64, 128),
        "up_proj": (64, 128),
        "down_proj": (128, 64),
    }


def test_base_model_info_without_head_dim_or_kv_heads() -> None:
    config = SimpleNamespace(hidden_size=64, num_attention_heads=8, intermediate_size=96, num_hidden_layers=3)
    info = BaseModelInfo.from_hf_config(config, name="plain")
    assert info.linear_shapes["k_proj"] == (64, 64)
    assert info.linear_shapes["down_proj"] == (96, 64)
    assert info.num_layers == 3


# --- valid adapters --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peft_kwargs", "modules", "scaling"),
    [
        pytest.param({"target_modules": list(ATTENTION)}, ATTENTION, 2.0, id="attention"),
        pytest.param({"target_modules": "all-linear"}, ALL_LINEAR, 2.0, id="all-linear"),
        pytest.param({"target_modules": ["q_proj"], "use_rslora": True}, ("q_proj",), 8 / 2, id="rslora"),
        pytest.param({"target_modules": ["v_proj"], "lora_alpha": 3, "r": 8}, ("v_proj",), 3 / 8, id="alpha"),
        pytest.param({"target_modules": r".*\.(q_proj|down_proj)"}, ("down_proj", "q_proj"), 2.0, id="regex"),
        pytest.param({"target_modules": ["up_proj"], "lora_dropout": 0.1}, ("up_proj",), 2.0, id="dropout"),
    ],
)
def test_valid_lora_loads(
    tmp_path: Path, base: BaseModelInfo, peft_kwargs: dict[str, Any], modules: tuple[str, ...], scaling: float
) -> None:
    path = save_adapter(tmp_path / "a", lora(**peft_kwargs))
    spec = read_adapter(path, base, MAX_RANK)
    assert (spec.kind, spec.target_modules, spec.num_virtual_tokens) == ("lora", modules, 0)
    assert spec.rank == peft_kwargs.get("r", 4)
    assert spec.scaling == pytest.approx(scaling)
    assert spec.config == json.loads((path / CONFIG_FILE).read_text())


def test_rslora_scaling_uses_square_root_of_rank(tmp_path: Path, base: BaseModelInfo) -> None:
    path = save_adapter(tmp_path / "a", lora(target_modules=["q_proj"], r=16, lora_alpha=8, use_rslora=True))
    assert read_adapter(path, base, MAX_RANK).scaling == pytest.approx(8 / math.sqrt(16))


def test_load_lora_weights_folds_scaling_into_b(tmp_path: Path, base: BaseModelInfo) -> None:
    path = save_adapter(tmp_path / "a", lora(target_modules="all-linear", r=4, lora_alpha=12))
    spec = read_adapter(path, base, MAX_RANK)
    weights = load_lora_weights(spec)
    raw = load_file(path / WEIGHTS_FILE)
    expected_keys = {(layer, module) for layer in range(2) for module in ALL_LINEAR}
    assert set(weights.a) == set(weights.b) == expected_keys
    for layer, module in expected_keys:
        group = "self_attn" if module in ATTENTION else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
        raw_b = raw[f"{prefix}.lora_B.weight"]
        assert torch.equal(weights.a[(layer, module)], raw[f"{prefix}.lora_A.weight"])
        assert torch.equal(weights.b[(layer, module)], raw_b * 3.0)
        assert not torch.equal(weights.b[(layer, module)], raw_b)
        in_features, out_features = base.linear_shapes[module]
        assert weights.a[(layer, module)].shape == (4, in_features)
        assert weights.b[(layer, module)].shape == (out_features, 4)


def test_load_lora_weights_casts_to_dtype(lora_dir: Path, base: BaseModelInfo) -> None:
    weights = load_lora_weights(read_adapter(lora_dir, base, MAX_RANK), dtype=torch.bfloat16)
    raw_b = load_file(lora_dir / WEIGHTS_FILE)[Q_PROJ_B]
    assert weights.a[(0, "q_proj")].dtype == weights.b[(0, "q_proj")].dtype == torch.bfloat16
    assert torch.equal(weights.b[(0, "q_proj")], (raw_b * 2.0).to(torch.bfloat16))


def test_layers_to_transform_loads_only_those_layers(tmp_path: Path, base: BaseModelInfo) -> None:
    path = save_adapter(tmp_path / "a", lora(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    weights = load_lora_weights(read_adapter(path, base, MAX_RANK))
    assert set(weights.a) == {(1, "q_proj"), (1, "v_proj")}


def test_keys_without_peft_prefix_are_accepted(lora_dir: Path, base: BaseModelInfo) -> None:
    def strip_prefix(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.removeprefix("base_model.model.")] = tensors.pop(key)

    edit_tensors(lora_dir, strip_prefix)
    assert read_adapter(lora_dir, base, MAX_RANK).target_modules == ATTENTION
    assert (0, "q_proj") in load_lora_weights(read_adapter(lora_dir, base, MAX_RANK)).a


def test_valid_prompt_tuning_loads(prompt_dir: Path, base: BaseModelInfo) -> None:
    spec = read_adapter(prompt_dir, base, MAX_RANK)
    assert (spec.kind, spec.num_virtual_tokens, spec.rank, spec.target_modules) == ("prompt_tuning", 5, 0, ())
    assert spec.scaling == 1.0
    embeddings = load_prompt_embeddings(spec, dtype=torch.float16)
    assert embeddings.shape == (5, 64) and embeddings.dtype == torch.float16
    raw = load_file(prompt_dir / WEIGHTS_FILE)[PROMPT]
    assert torch.equal(embeddings, raw.to(torch.float16))


def test_prompt_tuning_with_sampled_vocab_init_loads(tmp_path: Path, base: BaseModelInfo) -> None:
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"
    )
    spec = read_adapter(save_adapter(tmp_path / "a", config), base, MAX_RANK)
    assert load_prompt_embeddings(spec).shape == (3, 64)


def test_loaders_refuse_the_other_kind(lora_dir: Path, prompt_dir: Path, base: BaseModelInfo) -> None:
    with pytest.raises(ValueError, match="not a soft prompt"):
        load_prompt_embeddings(read_adapter(lora_dir, base, MAX_RANK))
    with pytest.raises(ValueError, match="not LoRA"):
        load_lora_weights(read_adapter(prompt_dir, base, MAX_RANK))


# --- refused: files --------------------------------------------------------------------------------------


def test_missing_config(lora_dir: Path, base: BaseModelInfo) -> None:
    (lora_dir / CONFIG_FILE).unlink()
    assert_refused(lora_dir, base, CONFIG_FILE, "missing")


def test_invalid_json(lora_dir: Path, base: BaseModelInfo) -> None:
    (lora_dir / CONFIG_FILE).write_text('{"peft_type": "LORA",')
    assert_refused(lora_dir, base, CONFIG_FILE, "invalid JSON")


def test_missing_safetensors(lora_dir: Path, base: BaseModelInfo) -> None:
    (lora_dir / WEIGHTS_FILE).unlink()
    assert_refused(lora_dir, base, WEIGHTS_FILE, "missing")


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "extra.pkl"])
def test_pickle_files_refused_even_with_safetensors(lora_dir: Path, base: BaseModelInfo, name: str) -> None:
    torch.save({"x": torch.zeros(1)}, lora_dir / name)
    assert_refused(lora_dir, base, name, "pickle")


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: b"not a safetensors file", id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_safetensors(lora_dir: Path, base: BaseModelInfo, corrupt: Callable[[bytes], bytes]) -> None:
    weights = lora_dir / WEIGHTS_FILE
    weights.write_bytes(corrupt(weights.read_bytes()))
    assert_refused(lora_dir, base, WEIGHTS_FILE, "corrupt")


def test_missing_directory(tmp_path: Path, base: BaseModelInfo) -> None:
    assert_refused(tmp_path / "nope", base, "path")


# --- refused: config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "text"),
    [
        ({"bias": "all"}, "bias", "'all'"),
        ({"bias": "lora_only"}, "bias", "'lora_only'"),
        ({"lora_bias": True}, "lora_bias", "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save", "not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out", "not supported"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern", "single r"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern", "single lora_alpha"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "not supported"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "not supported"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters", "not supported"),
        ({"use_qalora": True}, "use_qalora", "QALoRA"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens", "aLoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "pissa"),
        ({"init_lora_weights": "olora"}, "init_lora_weights", "olora"),
        (
            {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
            "target_modules",
            "embed_tokens, lm_head",
        ),
        ({"target_modules": ["c_attn"]}, "target_modules", "c_attn"),
        ({"target_modules": r".*(q_proj|lm_head)"}, "target_modules", "lm_head"),
        ({"target_modules": r".*\.c_attn"}, "target_modules", "matches no linear module"),
        ({"target_modules": "(unclosed"}, "target_modules", "invalid regular expression"),
        ({"r": 0}, "r", "positive integer"),
        ({"r": -2}, "r", "positive integer"),
        ({"r": "four"}, "r", "positive integer"),
        ({"lora_alpha": "eight"}, "lora_alpha", "number"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type", "SEQ_2_SEQ_LM"),
        ({"peft_type": "LOHA"}, "peft_type", "LOHA"),
        ({"peft_type": "LOKR"}, "peft_type", "LOKR"),
        ({"peft_type": "OFT"}, "peft_type", "OFT"),
        ({"peft_type": "BOFT"}, "peft_type", "BOFT"),
        ({"peft_type": "VERA"}, "peft_type", "VERA"),
        ({"peft_type": "ADALORA"}, "peft_type", "ADALORA"),
        ({"peft_type": None}, "peft_type", "missing"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_refused_lora_config(
    lora_dir: Path, base: BaseModelInfo, changes: dict[str, Any], field: str, text: str
) -> None:
    edit_config(lora_dir, **changes)
    assert_refused(lora_dir, base, field, text)


def test_rank_above_server_limit(lora_dir: Path, base: BaseModelInfo) -> None:
    err = refusal(lora_dir, base, max_rank=2)
    assert [p.field for p in err.problems] == ["r"]
    assert "max_rank=2" in str(err)


def test_rank_mismatch_between_config_and_weights(lora_dir: Path, base: BaseModelInfo) -> None:
    edit_config(lora_dir, r=8)
    assert_refused(lora_dir, base, "lora_A shape", Q_PROJ_A, "expected [8, 64]")
    assert_refused(lora_dir, base, "lora_B shape", Q_PROJ_B, "expected [64, 8]")


# --- refused: tensors ------------------------------------------------------------------------------------


def set_tensor(key: str, value: torch.Tensor) -> TensorEdit:
    return lambda tensors: tensors.__setitem__(key, value)


def poison(key: str, value: float) -> TensorEdit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return edit


def rename_layer(old: int, new: int) -> TensorEdit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if f".layers.{old}." in k]:
            tensors[key.replace(f".layers.{old}.", f".layers.{new}.")] = tensors.pop(key)

    return edit


LM_HEAD_SAVED = "base_model.model.lm_head.weight"
Q_PROJ_BIAS = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
DORA_MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


@pytest.mark.parametrize(
    ("edit", "field", "text"),
    [
        pytest.param(set_tensor(Q_PROJ_A, torch.zeros(4, 32)), "lora_A shape", Q_PROJ_A, id="in-features"),
        pytest.param(set_tensor(Q_PROJ_B, torch.zeros(32, 4)), "lora_B shape", Q_PROJ_B, id="out-features"),
        pytest.param(set_tensor(Q_PROJ_A, torch.zeros(2, 64)), "lora_A shape", "expected [4, 64]", id="rank"),
        pytest.param(set_tensor(Q_PROJ_A, torch.zeros(4, 64, 1)), "lora_A shape", Q_PROJ_A, id="3d"),
        pytest.param(lambda t: t.pop(Q_PROJ_B), "lora_B", Q_PROJ_A, id="a-without-b"),
        pytest.param(lambda t: t.pop(Q_PROJ_A), "lora_A", Q_PROJ_B, id="b-without-a"),
        pytest.param(poison(Q_PROJ_A, math.nan), Q_PROJ_A, "NaN", id="nan"),
        pytest.param(poison(Q_PROJ_B, math.inf), Q_PROJ_B, "Inf", id="inf"),
        pytest.param(
            set_tensor(Q_PROJ_A, torch.zeros(4, 64, dtype=torch.int32)), Q_PROJ_A, "dtype", id="int"
        ),
        pytest.param(set_tensor(Q_PROJ_BIAS, torch.zeros(64)), Q_PROJ_BIAS, "unrecognised", id="bias"),
        pytest.param(
            set_tensor(LM_HEAD_SAVED, torch.zeros(128, 64)), LM_HEAD_SAVED, "unrecognised", id="saved"
        ),
        pytest.param(set_tensor(DORA_MAGNITUDE, torch.ones(64)), DORA_MAGNITUDE, "unrecognised", id="dora"),
    ],
)
def test_refused_lora_tensors(
    lora_dir: Path, base: BaseModelInfo, edit: TensorEdit, field: str, text: str
) -> None:
    edit_tensors(lora_dir, edit)
    assert_refused(lora_dir, base, field, text)


def test_layer_index_out_of_range(lora_dir: Path, base: BaseModelInfo) -> None:
    edit_tensors(lora_dir, rename_layer(1, 5))
    key = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"
    assert_refused(lora_dir, base, key, "layer index 5", "2 layers")


def test_lora_on_module_the_base_lacks(lora_dir: Path, base: BaseModelInfo) -> None:
    key = "base_model.model.model.layers.0.self_attn.c_attn.lora_A.weight"
    edit_tensors(lora_dir, set_tensor(key, torch.zeros(4, 64)))
    assert_refused(lora_dir, base, key, "c_attn")


def test_safetensors_without_lora_weights(lora_dir: Path, base: BaseModelInfo) -> None:
    save_file({}, lora_dir / WEIGHTS_FILE)
    assert_refused(lora_dir, base, WEIGHTS_FILE, "no LoRA weights")


@pytest.mark.parametrize(
    ("peft_config", "fields"),
    [
        pytest.param(lora(target_modules=["q_proj"], bias="lora_only"), {"bias"}, id="bias"),
        pytest.param(
            lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), {"modules_to_save"}, id="mts"
        ),
        pytest.param(lora(target_modules=["q_proj", "embed_tokens"]), {"target_modules"}, id="embed_tokens"),
        pytest.param(
            lora(target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"]),
            {"modules_to_save"},
            id="dora-mts",
        ),
        pytest.param(
            IA3Config(task_type="CAUSAL_LM", modules_to_save=["lm_head"]), {"modules_to_save"}, id="ia3-mts"
        ),
        pytest.param(LoHaConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]), {"peft_type"}, id="loha"),
        pytest.param(LoKrConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]), {"peft_type"}, id="lokr"),
        pytest.param(
            OFTConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4, oft_block_size=0),
            {"peft_type"},
            id="oft",
        ),
        pytest.param(
            VeraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4), {"peft_type"}, id="vera"
        ),
    ],
)
def test_refused_real_peft_adapters(
    tmp_path: Path, base: BaseModelInfo, peft_config: PeftConfig, fields: set[str]
) -> None:
    err = refusal(save_adapter(tmp_path / "a", peft_config), base)
    assert fields <= {p.field for p in err.problems}


# --- refused: prompt tuning ------------------------------------------------------------------------------


def test_prompt_tuning_token_dim_mismatch(prompt_dir: Path, base: BaseModelInfo) -> None:
    edit_config(prompt_dir, token_dim=32)
    assert_refused(prompt_dir, base, "token_dim", "32", "64")


def test_prompt_tuning_two_submodules(prompt_dir: Path, base: BaseModelInfo) -> None:
    edit_config(prompt_dir, num_transformer_submodules=2)
    assert_refused(prompt_dir, base, "num_transformer_submodules")


def test_prompt_tuning_bad_num_virtual_tokens(prompt_dir: Path, base: BaseModelInfo) -> None:
    edit_config(prompt_dir, num_virtual_tokens=0)
    assert_refused(prompt_dir, base, "num_virtual_tokens", "positive integer")


@pytest.mark.parametrize(
    ("edit", "field", "text"),
    [
        pytest.param(lambda t: t.pop(PROMPT), PROMPT, "missing", id="missing"),
        pytest.param(set_tensor(PROMPT, torch.zeros(6, 64)), PROMPT, "[5, 64]", id="rows"),
        pytest.param(set_tensor(PROMPT, torch.zeros(5, 32)), PROMPT, "[5, 64]", id="dim"),
        pytest.param(set_tensor(PROMPT, torch.zeros(320)), PROMPT, "[320]", id="1d"),
        pytest.param(poison(PROMPT, math.nan), PROMPT, "NaN", id="nan"),
        pytest.param(set_tensor("extra", torch.zeros(1)), "extra", "unrecognised", id="extra-key"),
    ],
)
def test_refused_prompt_tensors(
    prompt_dir: Path, base: BaseModelInfo, edit: TensorEdit, field: str, text: str
) -> None:
    edit_tensors(prompt_dir, edit)
    assert_refused(prompt_dir, base, field, text)


# --- all problems at once --------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(lora_dir: Path, base: BaseModelInfo) -> None:
    edit_config(
        lora_dir, use_dora=True, bias="all", r=64, target_modules=["q_proj", "lm_head"]
    )  # no magnitudes
    edit_tensors(lora_dir, poison(Q_PROJ_B, math.nan))
    (lora_dir / "adapter_model.bin").write_bytes(b"pickle")
    err = refusal(lora_dir, base)
    fields = {p.field for p in err.problems}
    assert {
        "lora_magnitude_vector",
        "bias",
        "r",
        "target_modules",
        Q_PROJ_B,
        "adapter_model.bin",
        "lora_A shape",
    } <= fields
    for problem in err.problems:
        assert shown(problem, err)
    assert f"({len(err.problems)} problems)" in str(err)


# --- adapter ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "adapter_id", ["a", "sql-lora", "Tenant_1/my.adapter-v2", "9", "x" * 128, "acme/" + "y" * 128, "a..b"]
)
def test_valid_adapter_ids(adapter_id: str) -> None:
    assert validate_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize(
    "adapter_id",
    ["", ".hidden", "..", "has space", "x" * 129, "a/b/c", "/a", "a/", "-a", "a/.b", "a\n", "ünï", "a:b"],
)
def test_invalid_adapter_ids(adapter_id: str) -> None:
    with pytest.raises(InvalidAdapterId, match="invalid adapter id"):
        validate_adapter_id(adapter_id)


WIDER = LlamaConfig(
    hidden_size=96,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


@pytest.mark.parametrize(
    "config", [lora(target_modules="all-linear"), prompt_tuning()], ids=["lora", "prompt"]
)
def test_an_adapter_for_another_base_names_the_cause_first_and_each_problem_once(
    config: PeftConfig, base: BaseModelInfo, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    get_peft_model(LlamaForCausalLM(WIDER), config).save_pretrained(str(tmp_path))
    edit_config(tmp_path, base_model_name_or_path="org/wider-model")
    err = refusal(tmp_path, base)
    message = str(err)
    cause = f"adapter refused ({len(err.problems)} problems): base_model: this adapter was made for another base model "
    assert message.startswith(
        cause + "(org/wider-model, as its adapter_config.json says), with hidden size 96; "
    )
    assert "this server serves tiny-llama, with hidden size 64" in message
    # Every problem is counted and kept in `problems`; the message shows the same problem in six layers as one
    # line, and after the cause only a few of them.
    assert err.problems[0].field == "base_model"
    if config.peft_type == "LORA":
        assert len(err.problems) > 6 * 7 and "(and 5 more layers alike)" in message
        assert "more kinds of problem" in message and len(message) < 1500


def test_the_same_problem_in_every_layer_is_one_line(lora_dir: Path, base: BaseModelInfo) -> None:
    edit_tensors(lora_dir, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items() if "q_proj" in k}))
    err = refusal(lora_dir, base)
    assert len(err.problems) == 4 and str(err).count("q_proj.lora_A") == 1  # A and B, in both layers
    assert "(and 1 more layer alike)" in str(err)
