"""The gRPC API (protos/adapterd/v1): the contract's services, fresh generated code, round trips, comments."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from adapterd.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "adapterd" / "v1"
MODULES = {"generation": generation_pb2, "adapters": adapters_pb2, "training": training_pb2}
GRPC_MODULES = {
    "generation": generation_pb2_grpc,
    "adapters": adapters_pb2_grpc,
    "training": training_pb2_grpc,
}

# service -> rpc -> (client streaming, server streaming), as docs API.md's gRPC section fixes them.
CONTRACT = {
    "Generation": {"Generate": (False, False), "GenerateStream": (False, True)},
    "Adapters": {
        "ListAdapters": (False, False),
        "GetAdapter": (False, False),
        "UploadAdapter": (True, False),
        "DeleteAdapter": (False, False),
    },
    "Training": {
        "SubmitJob": (True, False),
        "GetJob": (False, False),
        "ListJobs": (False, False),
        "WatchJob": (False, True),
        "CancelJob": (False, False),
        "Evaluate": (True, False),  # beyond API.md: the trainer's POST /v1/evaluations
    },
}


def services() -> dict[str, tuple[ModuleType, str]]:
    """Every service of the generated modules: name -> (its _pb2 module, its file stem)."""
    return {
        name: (module, stem)
        for stem, module in MODULES.items()
        for name in module.DESCRIPTOR.services_by_name
    }


def test_services_match_the_contract() -> None:
    found = {
        service: {
            method.name: (method.client_streaming, method.server_streaming)
            for method in module.DESCRIPTOR.services_by_name[service].methods
        }
        for service, (module, _) in services().items()
    }
    assert found == CONTRACT
    for service, (module, stem) in services().items():
        assert module.DESCRIPTOR.package == "adapterd.v1"
        grpc_module = GRPC_MODULES[stem]
        for generated in (f"{service}Stub", f"{service}Servicer", f"add_{service}Servicer_to_server"):
            assert hasattr(grpc_module, generated), f"{grpc_module.__name__} lacks {generated}"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools is not installed")
def test_generated_code_is_fresh() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), "--check"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- round trips -------------------------------------------------------------------------------------------


def request_types() -> list[type[Message]]:
    """The input message of every RPC, each once."""
    types: dict[str, type[Message]] = {}
    for module, _ in services().values():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                types[method.input_type.full_name] = message_class(method.input_type)
    return list(types.values())


def message_class(descriptor: Descriptor) -> type[Message]:
    module = next(m for m in MODULES.values() if m.DESCRIPTOR.name == descriptor.file.name)
    cls: type[Message] = getattr(module, descriptor.name)
    return cls


def oneof_choices(cls: type[Message]) -> list[tuple[str, ...]]:
    """Every combination of one member per oneof (synthetic oneofs of `optional` fields excluded)."""
    oneofs = [o for o in cls.DESCRIPTOR.oneofs if not is_synthetic(o.fields)]
    return list(itertools.product(*[[f.name for f in o.fields] for o in oneofs]))


def is_synthetic(fields: list[FieldDescriptor]) -> bool:
    """True for the hidden oneof protoc makes for one `optional` field (named `_<field>`)."""
    return len(fields) == 1 and fields[0].containing_oneof.name == f"_{fields[0].name}"


def fill(message: Message, chosen: tuple[str, ...] = ()) -> Message:
    """Set every field of `message`, recursively, to a non-default value; in a oneof only the `chosen` one."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Struct":
        message.update({"job": "job-1", "epochs": 3.0, "tags": ["a", "b"]})
        return message
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and not is_synthetic(oneof.fields) and field.name not in chosen:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                fill(getattr(message, field.name).add())
            else:
                fill(getattr(message, field.name))
        elif field.is_repeated:
            getattr(message, field.name).extend([sample_value(field, 1), sample_value(field, 2)])
        else:
            setattr(message, field.name, sample_value(field, 1))
    return message


def sample_value(field: FieldDescriptor, n: int) -> object:
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{n} é"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return bytes([0, 255, n]) * 3
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 0.25 * n
    return 7 * n  # every integer type


ROUND_TRIP_CASES = [(cls, chosen) for cls in request_types() for chosen in oneof_choices(cls)]


@pytest.mark.parametrize(
    ("cls", "chosen"), ROUND_TRIP_CASES, ids=[f"{c.__name__}-{'-'.join(ch)}" for c, ch in ROUND_TRIP_CASES]
)
def test_request_round_trip(cls: type[Message], chosen: tuple[str, ...]) -> None:
    request = fill(cls(), chosen)
    restored = cls.FromString(request.SerializeToString())
    assert restored == request
    assert {f.name for f, _ in restored.ListFields()} == {f.name for f, _ in request.ListFields()}
    for oneof in request.DESCRIPTOR.oneofs:
        assert restored.WhichOneof(oneof.name) == request.WhichOneof(oneof.name)


def test_round_trips_cover_every_request_and_oneof_member() -> None:
    assert {cls.__name__ for cls, _ in ROUND_TRIP_CASES} >= {
        "GenerateRequest",
        "UploadAdapterRequest",
        "SubmitJobRequest",
        "GetAdapterRequest",
        "WatchJobRequest",
    }
    assert {chosen for cls, chosen in ROUND_TRIP_CASES if cls.__name__ == "SubmitJobRequest"} == {
        ("config",),
        ("data_chunk",),
        ("eval_data_chunk",),
        ("tasks_chunk",),
    }


def test_explicit_zero_parameters_survive_and_unset_ones_stay_unset() -> None:
    """temperature 0 (greedy) and seed 0 must reach the server as set values, not as 'use the default'."""
    request = generation_pb2.GenerateRequest(
        prompt="Hi", parameters=generation_pb2.GenerationParameters(temperature=0.0, seed=0)
    )
    params = generation_pb2.GenerateRequest.FromString(request.SerializeToString()).parameters
    assert params.HasField("temperature") and params.HasField("seed")
    assert not params.HasField("top_p") and not params.HasField("max_new_tokens")


def test_stream_ends_with_the_unary_response() -> None:
    done = generation_pb2.GenerateResponse(
        text="Hello", token_ids=[1, 2], finish_reason="eos", prompt_tokens=3, generated_tokens=2
    )
    event = generation_pb2.GenerateStreamResponse(done=done)
    restored = generation_pb2.GenerateStreamResponse.FromString(event.SerializeToString())
    assert restored.WhichOneof("event") == "done"
    assert restored.done == done


# --- STYLE: a comment on every service, RPC, message and field; field numbers without gaps ---------------

DECLARATION = re.compile(r"^(service|rpc|message|enum|oneof)\s+(\w+)")
FIELD = re.compile(r"^(?:(?:optional|repeated)\s+)?(?:map\s*<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*[;\[]")
ENUM_VALUE = re.compile(r"^(\w+)\s*=\s*-?\d+\s*[;\[]")
PROTO_FILES = sorted(PROTO_DIR.glob("*.proto"))


def statements(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, statement, preceded by a `//` comment line) for each declaration and field of a file."""
    found = []
    previous = ""
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if DECLARATION.match(line) or FIELD.match(line) or ENUM_VALUE.match(line):
            found.append((number, line, previous.startswith("//")))
        previous = line
    return found


def test_proto_files_exist() -> None:
    assert [p.stem for p in PROTO_FILES] == sorted(MODULES)


@pytest.mark.parametrize("path", PROTO_FILES, ids=lambda p: p.name)
def test_every_rpc_message_and_field_has_a_comment(path: Path) -> None:
    uncommented = [f"{path.name}:{n}: {line}" for n, line, commented in statements(path) if not commented]
    assert not uncommented, "needs a `//` comment line above:\n" + "\n".join(uncommented)


@pytest.mark.parametrize("path", PROTO_FILES, ids=lambda p: p.name)
def test_the_comment_check_sees_every_declaration(path: Path) -> None:
    """The text parser above must not miss a field, RPC or message the compiler saw."""
    file = MODULES[path.stem].DESCRIPTOR
    messages = file.message_types_by_name.values()
    expected = (
        len(file.services_by_name)
        + sum(len(s.methods) for s in file.services_by_name.values())
        + len(messages)
        + sum(len(m.fields) + len([o for o in m.oneofs if not is_synthetic(o.fields)]) for m in messages)
        + sum(len(e.values) + 1 for e in file.enum_types_by_name.values())
    )
    assert all(not m.nested_types and not m.enum_types for m in messages), "keep messages flat"
    assert len(statements(path)) == expected


@pytest.mark.parametrize("stem", sorted(MODULES))
def test_field_numbers_have_no_gaps(stem: str) -> None:
    for message in MODULES[stem].DESCRIPTOR.message_types_by_name.values():
        numbers = sorted(f.number for f in message.fields)
        assert numbers == list(range(1, len(numbers) + 1)), f"{message.full_name}: {numbers}"
