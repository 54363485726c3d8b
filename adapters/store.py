"""The server's versioned adapter registry on disk (`adapterd serve --store DIR`).

Every upload becomes a new, immutable version directory; a per-adapter `current` pointer names the version
served. Publishing copies the files into a temporary directory, fsyncs them, renames the directory into
place and only then switches the pointer (write temp, fsync, `os.replace`, fsync the directory). A crash or
`kill -9` at any moment therefore leaves each adapter at its old version or its new one, and a restart serves
every upload that `publish` returned for. Opening the store removes what a crash left behind.

Layout under the root (`_` holds the ids without a tenant; `_` cannot be a tenant, ids start alphanumeric):

    .lock                                   flock: serialises writers across processes
    tmp/                                    upload staging, versions being written, deleted adapters
    adapters/<tenant or _>/<name>/current   {"version": n}
    adapters/<tenant or _>/<name>/versions/<n>/adapter_config.json, adapter_model.safetensors, record.json

The current version and the one before it are kept; older ones are removed on the next publish. The server
holds an adapter's tensors in memory once loaded, so removing old files never disturbs a running request.

`sha256` is the SHA-256 of adapter_config.json's bytes followed by adapter_model.safetensors' bytes, i.e.
`cat adapter_config.json adapter_model.safetensors | sha256sum`.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .format import CONFIG_FILE, WEIGHTS_FILE, AdapterSpec, validate_adapter_id

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
POINTER_FILE = "current"
LOCK_FILE = ".lock"
NO_TENANT = "_"
_POINTER_TEMP = "current.tmp"
_VERSIONS = "versions"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class AdapterRecord:
    id: str  # "name" or "tenant/name"
    type: str  # the kind: "lora" | "dora" | "ia3" | "prompt_tuning" | "p_tuning" | "prefix_tuning"
    rank: int | None  # LoRA and DoRA
    num_virtual_tokens: int | None  # prompt tuning, P-tuning, prefix tuning
    target_modules: list[str]
    base_model: str
    version: int  # 1, 2, ... per id; starts again at 1 after a delete
    sha256: str  # of adapter_config.json's bytes then adapter_model.safetensors' bytes
    size_bytes: int  # both files together
    created_at: str  # ISO 8601 UTC, "2026-11-28T07:40:00Z"
    path: Path  # this version's directory
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. trainer job id, metrics

    def describe(self) -> dict[str, Any]:
        """The public JSON description: every field but `path` (the server adds `residency`)."""
        description = asdict(self)
        del description["path"]
        return description

    @classmethod
    def from_description(cls, description: dict[str, Any], path: Path) -> AdapterRecord:
        names = [f.name for f in fields(cls) if f.name != "path"]
        return cls(path=path, **{name: description[name] for name in names})


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._adapters = self.root / "adapters"
        _make_dirs(self._tmp)
        _make_dirs(self._adapters)
        self._lock = threading.Lock()
        with self._locked():
            self._recover()

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory on the store's filesystem to receive an upload; removed on exit."""
        with self._temp_dir("upload-") as path:
            yield path

    def publish(
        self,
        adapter_id: str,
        staged_dir: Path,
        spec: AdapterSpec,
        base_model: str,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[AdapterRecord, bool]:
        """Publish the validated files of `staged_dir` as `adapter_id`'s next version.

        Returns the record and whether it replaced an existing version.
        """
        validate_adapter_id(adapter_id)
        extra = _json_copy(metadata or {})
        with self._temp_dir("version-") as temp:
            sha256, size = _copy_adapter_files(Path(staged_dir), temp)
            draft = _draft_record(adapter_id, spec, base_model, sha256, size, extra)
            with self._locked():
                return self._commit(draft, temp)

    def get(self, adapter_id: str) -> AdapterRecord | None:
        return self._load(self._id_dir(validate_adapter_id(adapter_id)))

    def delete(self, adapter_id: str) -> bool:
        id_dir = self._id_dir(validate_adapter_id(adapter_id))
        with self._locked():
            if _read_pointer(id_dir) is None:
                return False
            trash = self._tmp / f"deleted-{uuid.uuid4().hex}"
            os.rename(id_dir, trash)  # the one atomic step: the adapter is present before it, gone after
            _fsync_dir(id_dir.parent)
            _fsync_dir(self._tmp)
            shutil.rmtree(trash, ignore_errors=True)
            _remove_if_empty(id_dir.parent)
        return True

    def list(self) -> builtins.list[AdapterRecord]:
        """Every adapter's current version, sorted by id."""
        records = (self._load(id_dir) for id_dir in self._id_dirs())
        return sorted((record for record in records if record is not None), key=lambda record: record.id)

    def _id_dir(self, adapter_id: str) -> Path:
        tenant, _, name = adapter_id.rpartition("/")
        return self._adapters / (tenant or NO_TENANT) / name

    def _id_dirs(self) -> Iterator[Path]:
        for tenant_dir in _subdirs(self._adapters):
            yield from _subdirs(tenant_dir)

    def _load(self, id_dir: Path) -> AdapterRecord | None:
        # Readers take no lock: a publish may collect the version between reading the pointer and the record.
        for _ in range(3):
            version = _read_pointer(id_dir)
            if version is None:
                return None
            try:
                return _read_record(id_dir / _VERSIONS / str(version))
            except FileNotFoundError:
                continue
        logger.warning("%s: current version %s has no record", id_dir, _read_pointer(id_dir))
        return None

    def _commit(self, draft: AdapterRecord, temp: Path) -> tuple[AdapterRecord, bool]:
        id_dir = self._id_dir(draft.id)
        previous = _read_pointer(id_dir)
        version = max([0, *_version_numbers(id_dir)]) + 1  # past any leftover, so the rename cannot collide
        record = replace(draft, version=version, path=id_dir / _VERSIONS / str(version))
        _write_durably(temp / RECORD_FILE, json.dumps(record.describe(), indent=2).encode())
        _fsync_dir(temp)
        _make_dirs(record.path.parent)
        os.rename(temp, record.path)
        _fsync_dir(record.path.parent)
        _write_pointer(id_dir, version)
        _collect_garbage(id_dir, keep={version, previous})
        return record, previous is not None

    def _recover(self) -> None:
        for entry in self._tmp.iterdir():
            _remove_if_abandoned(entry)
        for id_dir in self._id_dirs():
            _recover_adapter(id_dir)
        for tenant_dir in self._adapters.iterdir():
            _remove_if_empty(tenant_dir)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, open(self.root / LOCK_FILE, "ab") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed
            yield

    @contextmanager
    def _temp_dir(self, prefix: str) -> Iterator[Path]:
        # Locked while in use, so a store opened by another process does not take it for a crash's leftover.
        with self._locked():
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=self._tmp))
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)  # already gone once published (renamed into place)
            os.close(fd)


def _draft_record(
    adapter_id: str, spec: AdapterSpec, base_model: str, sha256: str, size: int, metadata: dict[str, Any]
) -> AdapterRecord:
    return AdapterRecord(
        id=adapter_id,
        type=spec.kind,
        rank=spec.rank or None,
        num_virtual_tokens=spec.num_virtual_tokens or None,
        target_modules=list(spec.target_modules),
        base_model=base_model,
        version=0,  # given under the lock
        sha256=sha256,
        size_bytes=size,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        path=spec.path,
        metadata=metadata,
    )


def _json_copy(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        copy: dict[str, Any] = json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter metadata must be JSON-serialisable ({err})") from err
    return copy


def _copy_adapter_files(source: Path, dest: Path) -> tuple[str, int]:
    """Copy the two adapter files, fsynced; return (sha256 of config then weights, total bytes)."""
    digest = hashlib.sha256()
    size = 0
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(source / name, "rb") as reader, open(dest / name, "xb") as writer:
            while chunk := reader.read(_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
                size += len(chunk)
            writer.flush()
            os.fsync(writer.fileno())
    return digest.hexdigest(), size


def _read_record(version_dir: Path) -> AdapterRecord:
    description = json.loads((version_dir / RECORD_FILE).read_bytes())
    return AdapterRecord.from_description(description, version_dir)


def _read_pointer(id_dir: Path) -> int | None:
    try:
        text = (id_dir / POINTER_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        version = json.loads(text)["version"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{id_dir / POINTER_FILE}: corrupt version pointer {text!r}") from err
    return int(version)


def _write_pointer(id_dir: Path, version: int) -> None:
    temp = id_dir / _POINTER_TEMP
    temp.unlink(missing_ok=True)
    _write_durably(temp, json.dumps({"version": version}).encode())
    os.replace(temp, id_dir / POINTER_FILE)
    _fsync_dir(id_dir)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _version_numbers(id_dir: Path) -> builtins.list[int]:
    versions_dir = id_dir / _VERSIONS
    if not versions_dir.is_dir():
        return []
    return [int(path.name) for path in versions_dir.iterdir() if path.name.isdigit()]


def _collect_garbage(id_dir: Path, keep: set[int | None]) -> None:
    versions_dir = id_dir / _VERSIONS
    if not versions_dir.is_dir():
        return
    for path in versions_dir.iterdir():
        if not (path.name.isdigit() and int(path.name) in keep):
            shutil.rmtree(path, ignore_errors=True)


def _recover_adapter(id_dir: Path) -> None:
    (id_dir / _POINTER_TEMP).unlink(missing_ok=True)
    current = _read_pointer(id_dir)
    if current is None:  # a first publish that never switched its pointer
        logger.info("removing %s: no version was published", id_dir)
        shutil.rmtree(id_dir, ignore_errors=True)
        return
    versions = _version_numbers(id_dir)
    if current not in versions:
        logger.warning("%s: current version %d is missing", id_dir, current)
    previous = max((version for version in versions if version < current), default=None)
    _collect_garbage(id_dir, keep={current, previous})  # also drops versions never made current


def _subdirs(path: Path) -> builtins.list[Path]:
    try:
        return sorted(entry for entry in path.iterdir() if entry.is_dir())
    except FileNotFoundError:  # a tenant directory removed by a concurrent delete
        return []


def _remove_if_abandoned(entry: Path) -> None:
    if not entry.is_dir() or entry.is_symlink():
        entry.unlink(missing_ok=True)
        return
    fd = os.open(entry, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # in use by a live store
    finally:
        os.close(fd)
    logger.info("removing %s, left behind by an interrupted upload, publish or delete", entry)
    shutil.rmtree(entry, ignore_errors=True)


def _remove_if_empty(path: Path) -> None:
    with suppress(OSError):
        path.rmdir()


def _make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entries survive a crash."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        _fsync_dir(directory.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
