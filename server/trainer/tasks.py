"""Evaluation tasks shipped with a job: a tar archive (plain or gzip) of lm-eval task YAML files and their data.

It is unpacked into JOB_DIR/tasks. It holds data, never code: only directories and regular files with the
suffixes of SUFFIXES, no links, no absolute or `..` paths, and no YAML `!function` (which imports Python).
The archive's root is its top level, or its one top-level directory when it has nothing else; paths in a
YAML's `data_files` are relative to that root (the worker runs lm-eval there).
"""

from __future__ import annotations

import functools
import shutil
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from adapterd.server.common.errors import InvalidRequest
from adapterd.server.trainer.errors import InvalidConfig

SUFFIXES = frozenset({".yaml", ".yml", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet"})
YAML_SUFFIXES = (".yaml", ".yml")
MAX_MEMBERS = 1000
CHUNK = 1 << 20


class InvalidTasks(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(f"tasks: {message}")


def unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    """Unpack `archive` so that `dest` is its root; on any error `dest` does not exist."""
    staging = dest.with_name(f".{dest.name}.unpacking")
    try:
        with archive.open("rb") as source, tarfile.open(fileobj=source, mode="r|*") as members:
            _extract(members, staging, max_bytes)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidTasks(f"not a readable tar archive ({exc})") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        check_yaml(root)
        root.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(members: tarfile.TarFile, dest: Path, max_bytes: int) -> None:
    dest.mkdir()
    total = 0
    for count, member in enumerate(members, start=1):
        if count > MAX_MEMBERS:
            raise InvalidTasks(f"more than {MAX_MEMBERS} members")
        path = _member_path(member)
        if path is None:  # "." (tar -C DIR -cf tasks.tar .)
            continue
        if member.isdir():
            (dest / path).mkdir(parents=True, exist_ok=True)
            continue
        total += member.size
        if total > max_bytes:
            raise InvalidTasks(f"more than {max_bytes} bytes unpacked")
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = members.extractfile(member)
        assert source is not None
        with target.open("xb") as out:
            shutil.copyfileobj(source, out, CHUNK)


def _member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    path = PurePosixPath(member.name)
    parts = [p for p in path.parts if p != "."]
    if not parts and member.isdir():
        return None
    if path.is_absolute() or ".." in parts or not parts:
        raise InvalidTasks(f"{member.name!r}: only relative paths inside the archive")
    if not (member.isfile() or member.isdir()):
        raise InvalidTasks(f"{member.name!r}: only files and directories (no links or devices)")
    if member.isfile() and path.suffix.lower() not in SUFFIXES:
        allowed = ", ".join(sorted(SUFFIXES))
        raise InvalidTasks(f"{member.name!r}: only task YAML and data files ({allowed}); no code")
    return PurePosixPath(*parts)


class _NoCodeLoader(yaml.SafeLoader):
    """YAML as lm-eval reads it, with `!function` refused."""


def _refuse_function(loader: yaml.Loader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, "!function imports Python code, which shipped tasks may not run", node.start_mark
    )


_NoCodeLoader.add_constructor("!function", _refuse_function)


def check_yaml(root: Path) -> None:
    """Every YAML file parses, with no `!function`; otherwise InvalidTasks naming the file and the problem."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in YAML_SUFFIXES):
        try:
            yaml.load(path.read_text(errors="replace"), Loader=_NoCodeLoader)
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())
            raise InvalidTasks(f"{path.relative_to(root)}: invalid YAML: {problem}") from exc


def task_manager(root: Path | None, names: Sequence[str]) -> Any:
    """lm-eval's TaskManager for `names`: the shipped tasks alone when they define them all (instant),
    else lm-eval's own tasks too (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    if root is not None:
        shipped = _shipped(root)
        if all(name in shipped.all_tasks for name in names):
            return shipped
    return TaskManager(include_path=str(root.resolve()) if root is not None else None)


def check_names(names: Sequence[str], root: Path | None) -> None:
    """Every name is a shipped task or one of lm-eval's; otherwise InvalidConfig on eval_tasks."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise InvalidConfig(
            "eval_tasks", "needs lm-evaluation-harness on the trainer: pip install 'adapterd[eval]'"
        ) from exc
    shipped = set(_shipped(root).all_tasks) if root is not None else set()
    missing = [name for name in names if name not in shipped]
    if missing:
        unknown = [name for name in missing if name not in _builtin_names()]
        if unknown:
            where = (
                "the shipped tasks or lm-eval's" if root is not None else "lm-eval's (ship YAML as 'tasks')"
            )
            raise InvalidConfig("eval_tasks", f"unknown task {unknown[0]!r}: it is not one of {where}")


def _shipped(root: Path) -> Any:
    """A TaskManager of the shipped tasks alone (indexing lm-eval's own is skipped: it takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(root.resolve()), include_defaults=False)


@functools.cache
def _builtin_names() -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)
