"""Unpack an uploaded adapter (a tar archive, or the files of a multipart form) into a staging directory.

An upload may hold only adapter_config.json and adapter_model.safetensors, either at its top level or inside
one directory; README.md and .gitattributes are accepted and dropped. Everything else is refused with an
`UnsafeUpload` naming the member and the problem: absolute or `..` paths, links, devices, FIFOs, pickle
files, unknown files, duplicates, too many members, and more than `max_bytes` in all (decompression bombs
are refused from the tar headers, before their data is inflated). Missing files are left to `read_adapter`.

Nothing is ever written outside `dest`: the only paths written are `dest / adapter_config.json` and
`dest / adapter_model.safetensors`, created exclusively (an existing file or link there is an error). On any
error the files this call wrote are removed again, so `dest` is left as it was found (the directory stays).
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO

from .format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE

DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3
MAX_MEMBERS = 16
MAX_HEADER_BYTES = 64 * 1024  # pax and GNU long-name headers, which tarfile reads into memory whole
KEPT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
DROPPED_FILES = frozenset({"README.md", ".gitattributes"})
_CHUNK_BYTES = 1 << 20
_EXTENSION_HEADERS = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


class UnsafeUpload(ValueError):
    pass


def extract_tar(source: IO[bytes], dest: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> None:
    """Stream a plain or compressed tar archive of an adapter directory into `dest`."""
    sink = _Sink(Path(dest), max_bytes, noun="member")
    try:
        with tarfile.open(fileobj=source, mode="r|*", tarinfo=_BoundedTarInfo) as archive:
            _extract_members(archive, sink)
    except (tarfile.TarError, EOFError, zlib.error, RecursionError) as err:
        sink.undo()
        raise UnsafeUpload(f"upload is not a readable tar archive ({err})") from err
    except BaseException:
        sink.undo()
        raise


def write_files(
    files: Mapping[str, IO[bytes]], dest: Path, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
) -> None:
    """Write uploaded files (name -> stream, e.g. from a multipart form) into `dest`, streamed in chunks."""
    sink = _Sink(Path(dest), max_bytes, noun="file")
    try:
        for raw_name, stream in files.items():
            name = sink.accept(raw_name, _parts(raw_name, "file"))
            if name is not None:
                sink.write(name, stream)
    except BaseException:
        sink.undo()
        raise


def _extract_members(archive: tarfile.TarFile, sink: _Sink) -> None:
    home: tuple[str, ...] | None = None  # () for files at the top level, (directory,) for one directory
    for count, member in enumerate(archive, start=1):
        if count > MAX_MEMBERS:
            raise UnsafeUpload(f"upload has more than {MAX_MEMBERS} members")
        parts = _parts(member.name, "member")
        _check_type(member)
        if not parts and member.isdir():
            continue  # the archive's root directory, "."
        member_home = parts if member.isdir() else parts[:-1]
        if len(member_home) > 1 or home not in (None, member_home):
            raise UnsafeUpload(
                f"unexpected member {member.name!r}: the adapter files must lie together at the top level of "
                "the archive or inside one directory"
            )
        home = member_home
        if member.isdir():
            continue
        name = sink.accept(member.name, parts)
        sink.reserve(member.name, member.size)  # from the header: refused before any data is inflated
        if name is not None:
            sink.write(name, archive.extractfile(member), reserved=True)


def _parts(name: str, noun: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeUpload(f"{noun} {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeUpload(f"{noun} {name!r} lies outside the adapter directory")
    return path.parts


def _check_type(member: tarfile.TarInfo) -> None:
    problem = None
    if member.issym():
        problem = "is a symbolic link"
    elif member.islnk():
        problem = "is a hard link"
    elif member.isfifo():
        problem = "is a FIFO"
    elif member.ischr() or member.isblk():
        problem = "is a device file"
    elif member.issparse():
        problem = "is a sparse file"
    elif not (member.isreg() or member.isdir()):
        problem = "is not a regular file"
    if problem:
        raise UnsafeUpload(f"member {member.name!r} {problem}")


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an oversized extension header before tarfile reads it into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _BoundedTarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENSION_HEADERS and info.size > MAX_HEADER_BYTES:
            raise UnsafeUpload(f"tar extension header of {info.size} bytes exceeds {MAX_HEADER_BYTES} bytes")
        return info


class _Sink:
    """Applies the name and size rules and writes the kept files, remembering them so they can be undone."""

    def __init__(self, dest: Path, max_bytes: int, noun: str) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.noun = noun
        self.num_bytes = 0
        self.seen: set[str] = set()
        self.written: list[Path] = []

    def accept(self, raw_name: str, parts: tuple[str, ...]) -> str | None:
        """The file name to write, None for a file to drop; raises for a refused one."""
        name = parts[-1] if parts else raw_name
        if len(parts) != 1 and self.noun == "file":
            raise UnsafeUpload(f"unexpected file {raw_name!r}: give the bare file name")
        if name in self.seen:
            raise UnsafeUpload(f"duplicate {self.noun} {raw_name!r}")
        self.seen.add(name)
        if name in KEPT_FILES:
            return name
        if name in DROPPED_FILES:
            return None
        raise UnsafeUpload(_refusal(raw_name, name))

    def reserve(self, raw_name: str, num_bytes: int, file_bytes: int | None = None) -> None:
        """Count `num_bytes` more, of a file now `file_bytes` long (default: `num_bytes`)."""
        limit = _human_bytes(self.max_bytes)
        if (num_bytes if file_bytes is None else file_bytes) > self.max_bytes:
            raise UnsafeUpload(f"{self.noun} {raw_name!r} exceeds the {limit} upload limit")
        self.num_bytes += num_bytes
        if self.num_bytes > self.max_bytes:
            raise UnsafeUpload(f"upload exceeds the {limit} limit")

    def write(self, name: str, stream: IO[bytes] | None, reserved: bool = False) -> None:
        assert stream is not None  # extractfile gives None only for non-regular members, refused above
        path = self.dest / name
        self.dest.mkdir(parents=True, exist_ok=True)
        with open(path, "xb") as file:  # exclusive: never follows a link planted at the path
            self.written.append(path)
            file_bytes = 0
            while chunk := stream.read(_CHUNK_BYTES):
                file_bytes += len(chunk)
                if not reserved:
                    self.reserve(name, len(chunk), file_bytes)
                file.write(chunk)

    def undo(self) -> None:
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()


def _refusal(raw_name: str, name: str) -> str:
    if PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES:
        return f"pickle file {raw_name!r} is refused (loading it can run code); upload {WEIGHTS_FILE} instead"
    hint = (
        " (a macOS metadata file: create the archive with COPYFILE_DISABLE=1)"
        if name.startswith("._")
        else ""
    )
    return f"unexpected file {raw_name!r}{hint}: an adapter upload holds {CONFIG_FILE} and {WEIGHTS_FILE}"


def _human_bytes(num_bytes: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= size and num_bytes % size == 0:
            return f"{num_bytes // size} {unit}"
    return f"{num_bytes} bytes"
