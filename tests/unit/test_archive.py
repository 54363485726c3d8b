"""Safe extraction of uploaded adapters: tar archives (plain, gzip, one top directory) and multipart files.

Every refused upload must raise `UnsafeUpload` naming the problem, write nothing outside `dest`, and leave
`dest` empty (files written before the problem was found are removed again).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path
from typing import Literal

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adapterd.adapters.archive import UnsafeUpload, extract_tar, write_files
from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE, BaseModelInfo, read_adapter

MiB = 1024**2
Member = tuple[tarfile.TarInfo, bytes]
CONFIG_JSON = b'{"peft_type": "LORA"}'


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(tiny_llama_config()), peft_config).save_pretrained(str(path))
    return {name: (path / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def regular(name: str, data: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def tar_bytes(members: list[Member], mode: Literal["w", "w:gz"] = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def adapter_members(files: dict[str, bytes], prefix: str = "") -> list[Member]:
    return [regular(prefix + name, data) for name, data in files.items()]


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "stage" / "dest"
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("mode", ["w", "w:gz"])
@pytest.mark.parametrize("prefix", ["", "./", "my-adapter/"])
def test_extracts_an_adapter_archive(
    adapter_files: dict[str, bytes], dest: Path, mode: Literal["w", "w:gz"], prefix: str
) -> None:
    members = [*adapter_members(adapter_files, prefix), regular(prefix + "README.md", b"# docs")]
    if prefix == "my-adapter/":
        members.insert(0, special("my-adapter", tarfile.DIRTYPE))
    extract_tar(io.BytesIO(tar_bytes(members, mode)), dest)
    assert {path.name: path.read_bytes() for path in dest.iterdir()} == adapter_files
    spec = read_adapter(dest, BaseModelInfo.from_hf_config(tiny_llama_config(), "tiny"), max_rank=64)
    assert spec.kind == "lora" and spec.rank == 4


def test_missing_files_are_left_to_format_validation(dest: Path) -> None:
    extract_tar(io.BytesIO(tar_bytes([regular(CONFIG_FILE, CONFIG_JSON)])), dest)
    assert [path.name for path in dest.iterdir()] == [CONFIG_FILE]


def pax_bomb() -> Member:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 10**9
    return info, b""


UNSAFE_TARS: dict[str, tuple[list[Member], str]] = {
    "path traversal": ([regular("../adapter_model.safetensors", b"x")], "lies outside the adapter directory"),
    "nested traversal": ([regular("a/../../evil.json", b"x")], "lies outside the adapter directory"),
    "absolute path": ([regular("/tmp/adapter_model.safetensors", b"x")], "has an absolute path"),
    "symlink": (
        [special(WEIGHTS_FILE, tarfile.SYMTYPE, "/etc/passwd")],
        f"'{WEIGHTS_FILE}' is a symbolic link",
    ),
    "hardlink": ([special(WEIGHTS_FILE, tarfile.LNKTYPE, CONFIG_FILE)], f"'{WEIGHTS_FILE}' is a hard link"),
    "character device": ([special(WEIGHTS_FILE, tarfile.CHRTYPE)], "is a device file"),
    "fifo": ([special(WEIGHTS_FILE, tarfile.FIFOTYPE)], "is a FIFO"),
    "too many members": ([special("adapter", tarfile.DIRTYPE)] * 17, "more than 16 members"),
    "pickle weights": ([regular("adapter_model.bin", b"x")], "pickle file 'adapter_model.bin' is refused"),
    "pickle in top dir": ([regular("ad/training_args.bin", b"x")], "pickle file 'ad/training_args.bin'"),
    "unknown file": ([regular("model.onnx", b"x")], "unexpected file 'model.onnx'"),
    "macos metadata": ([regular("._adapter_config.json", b"x")], "COPYFILE_DISABLE=1"),
    "duplicate member": ([regular("./" + CONFIG_FILE, b"{}")], f"duplicate member './{CONFIG_FILE}'"),
    "nested too deep": ([regular(f"a/b/{WEIGHTS_FILE}", b"x")], f"unexpected member 'a/b/{WEIGHTS_FILE}'"),
    "two directories": ([regular(f"b/{WEIGHTS_FILE}", b"x")], f"unexpected member 'b/{WEIGHTS_FILE}'"),
    "oversize file": ([regular(WEIGHTS_FILE, bytes(2 * MiB))], f"member '{WEIGHTS_FILE}' exceeds the 1 MiB"),
    "oversize in total": ([regular(WEIGHTS_FILE, bytes(MiB))], "upload exceeds the 1 MiB limit"),
    "oversize dropped file": ([regular("README.md", bytes(2 * MiB))], "member 'README.md' exceeds the 1 MiB"),
    "pax header bomb": ([pax_bomb()], "extension header of 1000000000 bytes"),
}
FIRST_DIRECTORY = {"two directories": "a/", "pickle in top dir": "ad/", "too many members": "adapter/"}


@pytest.mark.parametrize("case", UNSAFE_TARS)
def test_refuses_unsafe_tar(tmp_path: Path, dest: Path, case: str) -> None:
    bad_members, message = UNSAFE_TARS[case]
    # A valid member first, so a refusal must also undo what was already written.
    first = regular(FIRST_DIRECTORY.get(case, "") + CONFIG_FILE, CONFIG_JSON)
    archive = tar_bytes([first, *bad_members])
    before = tree(tmp_path)
    with pytest.raises(UnsafeUpload, match=message.replace(".", r"\.")):
        extract_tar(io.BytesIO(archive), dest, max_bytes=MiB)
    assert tree(tmp_path) == before
    assert list(dest.iterdir()) == []


def test_refuses_what_is_not_a_tar_archive(dest: Path) -> None:
    with pytest.raises(UnsafeUpload, match="not a readable tar archive"):
        extract_tar(io.BytesIO(b"PK\x03\x04 a zip, not a tar" * 40), dest)


class CountingReader(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.source = io.BytesIO(data)
        self.num_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self.source.readinto(buffer)
        self.num_read += count
        return count


def gzip_bomb(name: str, num_bytes: int) -> bytes:
    """A gzipped tar holding `num_bytes` of zeros, compressed chunk by chunk (never whole in memory)."""
    info = tarfile.TarInfo(name)
    info.size = num_bytes
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    parts = [compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    zeros = bytes(MiB)
    parts += [compressor.compress(zeros) for _ in range(num_bytes // MiB)]
    parts.append(compressor.compress(bytes(2 * tarfile.RECORDSIZE)))  # end-of-archive blocks
    return b"".join(parts) + compressor.flush()


def test_refuses_decompression_bomb_before_inflating_it(dest: Path) -> None:
    bomb = gzip_bomb(WEIGHTS_FILE, 128 * MiB)  # ~130 KB that inflate to 128 MiB
    source = CountingReader(bomb)
    with pytest.raises(UnsafeUpload, match=f"member '{WEIGHTS_FILE}' exceeds the 1 MiB upload limit"):
        extract_tar(io.BufferedReader(source, buffer_size=4096), dest, max_bytes=MiB)
    assert source.num_read < len(bomb) // 4
    assert list(dest.iterdir()) == []


def streams(files: dict[str, bytes]) -> dict[str, io.BytesIO]:
    return {name: io.BytesIO(data) for name, data in files.items()}


def test_writes_multipart_files(adapter_files: dict[str, bytes], dest: Path) -> None:
    readme = io.BytesIO(b"# docs")
    write_files({**streams(adapter_files), "README.md": readme}, dest)
    assert {path.name: path.read_bytes() for path in dest.iterdir()} == adapter_files
    assert readme.tell() == 0  # dropped unread


UNSAFE_FILES: dict[str, tuple[str, bytes, str]] = {
    "path traversal": (
        "../adapter_model.safetensors",
        b"x",
        "file '../adapter_model.safetensors' lies outside",
    ),
    "absolute path": ("/etc/adapter_model.safetensors", b"x", "has an absolute path"),
    "subdirectory": (f"sub/{WEIGHTS_FILE}", b"x", f"unexpected file 'sub/{WEIGHTS_FILE}'"),
    "pickle": ("adapter_model.bin", b"x", "pickle file 'adapter_model.bin' is refused"),
    "unknown file": ("weights.npz", b"x", "unexpected file 'weights.npz'"),
    "duplicate": (f"./{CONFIG_FILE}", b"{}", f"duplicate file './{CONFIG_FILE}'"),
    "oversize in total": (WEIGHTS_FILE, bytes(MiB), "upload exceeds the 1 MiB limit"),
}


@pytest.mark.parametrize("case", UNSAFE_FILES)
def test_refuses_unsafe_files(tmp_path: Path, dest: Path, case: str) -> None:
    name, data, message = UNSAFE_FILES[case]
    before = tree(tmp_path)
    with pytest.raises(UnsafeUpload, match=message.replace(".", r"\.")):
        write_files({CONFIG_FILE: io.BytesIO(CONFIG_JSON), name: io.BytesIO(data)}, dest, max_bytes=MiB)
    assert tree(tmp_path) == before
    assert list(dest.iterdir()) == []


class EndlessZeros(io.RawIOBase):
    def __init__(self) -> None:
        self.num_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        self.num_read += len(buffer)
        return len(buffer)


def test_multipart_size_is_counted_while_streaming(dest: Path) -> None:
    stream = EndlessZeros()
    with pytest.raises(UnsafeUpload, match=f"file '{WEIGHTS_FILE}' exceeds the 1 MiB upload limit"):
        write_files({WEIGHTS_FILE: io.BufferedReader(stream)}, dest, max_bytes=MiB)
    assert stream.num_read <= 2 * MiB
    assert list(dest.iterdir()) == []


def test_never_follows_a_link_planted_in_dest(tmp_path: Path, dest: Path) -> None:
    target = tmp_path / "outside.json"
    (dest / CONFIG_FILE).symlink_to(target)
    with pytest.raises(FileExistsError):
        write_files({CONFIG_FILE: io.BytesIO(CONFIG_JSON)}, dest)
    assert not target.exists()
