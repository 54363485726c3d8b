"""The versioned adapter store: publish, replace, delete, persistence, crash recovery (including a real kill -9)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from peft.config import PeftConfig
from transformers import LlamaConfig, LlamaForCausalLM

from adapterd.adapters import store as store_module
from adapterd.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSpec,
    BaseModelInfo,
    InvalidAdapterId,
    read_adapter,
)
from adapterd.adapters.store import AdapterRecord, AdapterStore

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def save_adapter(path: Path, peft_config: PeftConfig, seed: int, **overrides: Any) -> AdapterSpec:
    config = LlamaConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    get_peft_model(LlamaForCausalLM(config), peft_config).save_pretrained(str(path))
    return read_adapter(path, BaseModelInfo.from_hf_config(config, "tiny"), max_rank=64)


def lora(r: int, **kwargs: Any) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs)


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterSpec]:
    root = tmp_path_factory.mktemp("adapters")
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    return {
        "a": save_adapter(root / "a", lora(4), seed=0),
        "b": save_adapter(root / "b", lora(8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=1),
        "prompt": save_adapter(root / "prompt", prompt, seed=2),
    }


@pytest.fixture()
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def content_sha256(directory: Path) -> str:
    """The documented definition: config bytes, then weights bytes."""
    return hashlib.sha256(
        (directory / CONFIG_FILE).read_bytes() + (directory / WEIGHTS_FILE).read_bytes()
    ).hexdigest()


def publish(
    store: AdapterStore, adapter_id: str, spec: AdapterSpec, **kwargs: Any
) -> tuple[AdapterRecord, bool]:
    return store.publish(adapter_id, spec.path, spec, "tiny", **kwargs)


def version_dirs(store: AdapterStore, adapter_id: str) -> list[str]:
    return sorted((path.name for path in store.get(adapter_id).path.parent.iterdir()), key=int)  # type: ignore[union-attr]


def test_publish_then_get_and_list(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    record, replaced = publish(store, "chat", specs["a"])
    assert not replaced
    assert (record.id, record.type, record.rank, record.num_virtual_tokens) == ("chat", "lora", 4, None)
    assert record.target_modules == ["q_proj", "v_proj"] and record.base_model == "tiny"
    assert record.version == 1 and record.metadata == {}
    assert record.sha256 == content_sha256(specs["a"].path) == content_sha256(record.path)
    sizes = [(specs["a"].path / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE)]
    assert record.size_bytes == sum(sizes)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.created_at)
    assert store.get("chat") == record and store.list() == [record]


def test_prompt_tuning_record_and_description(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    record, _ = publish(
        store, "soft", specs["prompt"], metadata={"job_id": "job-1", "metrics": {"rougeL": 0.5}}
    )
    assert (record.type, record.rank, record.num_virtual_tokens) == ("prompt_tuning", None, 4)
    description = record.describe()
    assert set(description) == {
        "id", "type", "rank", "num_virtual_tokens", "target_modules", "base_model",
        "version", "sha256", "size_bytes", "created_at", "metadata",
    }  # fmt: skip
    assert json.loads(json.dumps(description)) == description
    assert description["metadata"] == {"job_id": "job-1", "metrics": {"rougeL": 0.5}}


def test_list_is_sorted_by_id(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    for adapter_id in ("zeta", "acme/chat", "alpha", "acme"):
        publish(store, adapter_id, specs["a"])
    assert [record.id for record in store.list()] == ["acme", "acme/chat", "alpha", "zeta"]


def test_replacing_makes_a_new_version(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    first, _ = publish(store, "chat", specs["a"])
    second, replaced = publish(store, "chat", specs["b"])
    assert replaced and second.version == 2 and second.rank == 8
    assert second.sha256 == content_sha256(specs["b"].path) != first.sha256
    assert store.get("chat") == second
    assert first.path.is_dir(), "the previous version is kept until the next publish"
    third, _ = publish(store, "chat", specs["a"])
    assert third.version == 3 and not first.path.exists()
    assert version_dirs(store, "chat") == ["2", "3"]


def test_delete(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    record, _ = publish(store, "acme/chat", specs["a"])
    publish(store, "acme/chat", specs["b"])
    assert store.delete("acme/chat")
    assert store.get("acme/chat") is None and store.list() == []
    assert not record.path.parent.parent.exists()
    assert not store.delete("acme/chat")
    again, replaced = publish(store, "acme/chat", specs["b"])
    assert (again.version, replaced) == (1, False)


def test_a_new_store_serves_everything_published(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    publish(store, "chat", specs["a"])
    publish(store, "chat", specs["b"])
    publish(store, "acme/soft", specs["prompt"], metadata={"job_id": "j"})
    reopened = AdapterStore(store.root)
    assert reopened.list() == store.list()
    assert [(r.id, r.version) for r in reopened.list()] == [("acme/soft", 1), ("chat", 2)]


class Crash(BaseException):
    pass


def crash(*args: Any) -> None:
    raise Crash


def test_crash_before_the_pointer_switch_keeps_the_old_version(
    store: AdapterStore, specs: dict[str, AdapterSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, _ = publish(store, "chat", specs["a"])
    monkeypatch.setattr(store_module, "_write_pointer", crash)
    with pytest.raises(Crash):
        publish(
            store, "chat", specs["b"]
        )  # the new version is copied and renamed into place, not made current
    with pytest.raises(Crash):
        publish(store, "fresh", specs["b"])  # a first publish that never became visible
    assert (old.path.parent / "2").is_dir()
    assert store.get("chat") == old and store.get("fresh") is None
    monkeypatch.undo()

    reopened = AdapterStore(store.root)
    assert reopened.get("chat") == old and [r.id for r in reopened.list()] == ["chat"]
    assert version_dirs(reopened, "chat") == ["1"]
    assert not (store.root / "adapters" / "_" / "fresh").exists()
    new, replaced = publish(reopened, "chat", specs["b"])
    assert (new.version, replaced, new.sha256) == (2, True, content_sha256(specs["b"].path))


def test_opening_removes_leftovers_but_not_uploads_in_progress(
    store: AdapterStore, specs: dict[str, AdapterSpec]
) -> None:
    old, _ = publish(store, "chat", specs["a"])
    leftover = store.root / "tmp" / "version-crashed"
    leftover.mkdir()
    (leftover / WEIGHTS_FILE).write_bytes(b"half a file")
    (old.path.parent.parent / "current.tmp").write_text('{"vers')
    with store.staging() as staged:
        (staged / CONFIG_FILE).write_text("{}")
        reopened = AdapterStore(store.root)  # as another process would, while an upload is being received
        assert staged.is_dir() and (staged / CONFIG_FILE).exists()
    assert not staged.exists()
    assert not leftover.exists() and not (old.path.parent.parent / "current.tmp").exists()
    assert list((store.root / "tmp").iterdir()) == []
    assert reopened.get("chat") == old


@pytest.mark.parametrize(
    "bad_id", ["../x", "a/../../b", "/etc", "", ".hidden", "a/b/c", "x" * 129, "a b", "a/"]
)
def test_bad_ids_are_refused(
    tmp_path: Path, store: AdapterStore, specs: dict[str, AdapterSpec], bad_id: str
) -> None:
    before = set(tmp_path.rglob("*"))
    with pytest.raises(InvalidAdapterId):
        publish(store, bad_id, specs["a"])
    with pytest.raises(InvalidAdapterId):
        store.get(bad_id)
    with pytest.raises(InvalidAdapterId):
        store.delete(bad_id)
    assert set(tmp_path.rglob("*")) == before


def test_metadata_must_be_json(store: AdapterStore, specs: dict[str, AdapterSpec]) -> None:
    with pytest.raises(ValueError, match="JSON-serialisable"):
        publish(store, "chat", specs["a"], metadata={"when": object()})
    assert store.get("chat") is None


def test_concurrent_publishes_from_two_stores_are_serialised(
    store: AdapterStore, specs: dict[str, AdapterSpec]
) -> None:
    other = AdapterStore(store.root)  # its own thread lock: only the file lock keeps the two apart
    versions: list[int] = []

    def publish_many(target: AdapterStore) -> None:
        for _ in range(6):
            versions.append(publish(target, "chat", specs["a"])[0].version)

    threads = [threading.Thread(target=publish_many, args=(target,)) for target in (store, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(1, 13))
    assert store.get("chat").version == 12  # type: ignore[union-attr]
    assert version_dirs(store, "chat") == ["11", "12"]


PUBLISHER = textwrap.dedent(
    """
    import sys, json
    from pathlib import Path
    from types import SimpleNamespace
    from adapterd.adapters.format import BaseModelInfo, read_adapter
    from adapterd.adapters.store import AdapterStore

    root, config = Path(sys.argv[1]), SimpleNamespace(**json.loads(sys.argv[2]))
    base = BaseModelInfo.from_hf_config(config, "tiny")
    specs = [read_adapter(path, base, max_rank=64) for path in sys.argv[3:5]]
    store = AdapterStore(root)
    while True:
        for adapter_id in ("big", "acme/big"):
            current = store.get(adapter_id)
            spec = specs[(current.version + 1 if current else 1) % 2]  # content by version parity
            record, _ = store.publish(adapter_id, spec.path, spec, "tiny")
            print(adapter_id, record.version, flush=True)
        if not store.delete("acme/flip"):
            store.publish("acme/flip", specs[0].path, specs[0], "tiny")
    """
)


def check_store_after_kill(root: Path, expected: list[str], last_versions: dict[str, int]) -> None:
    store = AdapterStore(root)  # recovers
    records = {record.id: record for record in store.list()}
    assert set(last_versions) <= set(records) <= {"big", "acme/big", "acme/flip"}
    for record in records.values():
        assert content_sha256(record.path) == record.sha256, f"{record.id} v{record.version} is half-written"
        json.loads((record.path / CONFIG_FILE).read_text())
        wanted = expected[0] if record.id == "acme/flip" else expected[record.version % 2]
        assert record.sha256 == wanted, f"{record.id} v{record.version} holds the wrong content"
        assert version_dirs(store, record.id) in (
            [str(record.version)],
            [str(record.version - 1), str(record.version)],
        )
    for adapter_id, version in last_versions.items():
        assert records[adapter_id].version in (version, version + 1), "neither the old nor the new version"
    assert list((root / "tmp").iterdir()) == []


def test_kill_9_never_leaves_a_half_written_adapter(tmp_path: Path) -> None:
    sources, overrides = tmp_path / "sources", {**TINY, "num_hidden_layers": 12}
    specs = [save_adapter(sources / name, lora(64, target_modules=ALL_LINEAR), i, num_hidden_layers=12)
             for i, name in enumerate("ab")]  # fmt: skip
    assert (specs[0].path / WEIGHTS_FILE).stat().st_size > 2 * 1024**2
    expected = [content_sha256(spec.path) for spec in specs]
    root, rng, deadline = tmp_path / "store", random.Random(0), time.monotonic() + 6
    last_versions: dict[str, int] = {}
    num_kills = num_published = 0
    while num_kills < 3 or (num_kills < 8 and time.monotonic() < deadline):
        command = [
            sys.executable,
            "-c",
            PUBLISHER,
            str(root),
            json.dumps(overrides),
            *map(str, (s.path for s in specs)),
        ]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout is not None
        first = child.stdout.readline()  # imports done, publishing
        assert first, child.communicate()[1]
        time.sleep(rng.uniform(0.0, 0.2))
        child.send_signal(signal.SIGKILL)
        lines = (first + child.communicate(timeout=10)[0]).split("\n")[:-1]  # drop a cut-off last line
        assert child.returncode == -signal.SIGKILL
        num_kills += 1
        for adapter_id, version in (line.split() for line in lines):
            last_versions[adapter_id] = int(version)
            num_published += 1
        check_store_after_kill(root, expected, last_versions)
    assert num_published > num_kills
