"""Uploads are unpacked off the event loop: tar extraction (gunzip, checks, writes) and the multipart files'
writes run in a worker thread, so one large upload cannot stall the streams the loop serves."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from adapterd.adapters.store import AdapterStore
from adapterd.server.common.auth import ApiKeys
from adapterd.server.common.config import ServerConfig
from adapterd.server.http import adapters as routes
from adapterd.server.http.app import build_app

FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 1024}


class FakeService:
    """What the upload route needs of a Service: the store, a config, and `upload` (which runs on the loop
    and records its thread)."""

    def __init__(self, root: Path) -> None:
        self.llm = SimpleNamespace(adapters=SimpleNamespace(store=AdapterStore(root)))
        self.config = ServerConfig(max_upload_bytes=1 << 20, replica_name="test")
        self.loop_thread: int | None = None
        self.uploaded: list[str] = []

    def info(self) -> dict[str, Any]:
        return {"version": "0"}

    async def upload(self, adapter_id: str, staged: Path, principal: Any, metadata: Any) -> tuple[dict, bool]:
        self.loop_thread = threading.get_ident()
        self.uploaded = sorted(p.name for p in staged.iterdir())
        return {"id": adapter_id}, False


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen: dict[str, int] = {}
    for name in ("extract_tar", "write_files"):
        original = getattr(routes, name)

        def recording(*args: Any, _name: str = name, _original: Any = original) -> Any:
            seen[_name] = threading.get_ident()
            return _original(*args)

        monkeypatch.setattr(routes, name, recording)
    return seen


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["tar", "multipart"])
def test_an_upload_is_unpacked_in_a_worker_thread(tmp_path: Path, threads: dict[str, int], kind: str) -> None:
    service = FakeService(tmp_path / "store")
    with TestClient(build_app(service, ApiKeys.open())) as client:  # type: ignore[arg-type]
        if kind == "tar":
            response = client.put("/v1/adapters/a", content=tar_bytes())
        else:
            response = client.put("/v1/adapters/a", files={n: (n, d) for n, d in FILES.items()})
    assert response.status_code == 201, response.text
    assert service.uploaded == sorted(FILES)
    unpacked_on = threads["extract_tar" if kind == "tar" else "write_files"]
    assert service.loop_thread is not None and unpacked_on != service.loop_thread
