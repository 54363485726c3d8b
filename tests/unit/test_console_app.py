"""The console's files are served at /ui without a key (under a strict Content-Security-Policy) while the API
still needs one; every file the page loads exists and is packaged; --trainer forwards the training routes,
and a trainer that does not answer is a 502 in the API's error shape, never a 500."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
from starlette.testclient import TestClient

from adapterd.server.common.auth import ApiKeys
from adapterd.server.http.app import build_app
from adapterd.server.http.console import CONSOLE_DIR
from tests.e2e.serving import free_port

ROOT = Path(__file__).parents[2]


def client(tmp_path: Path, trainer_url: str | None = None) -> TestClient:
    keys = tmp_path / "keys"
    keys.write_text("secret admin\n")
    config = SimpleNamespace(replica="test", trainer_url=trainer_url)
    service = SimpleNamespace(info=lambda: {"version": "0"}, config=config)
    return TestClient(build_app(service, ApiKeys.load(keys)))  # type: ignore[arg-type]


def test_the_console_needs_no_key_and_the_api_still_does(tmp_path: Path) -> None:
    with client(tmp_path) as http:
        for path in ("/ui", "/ui/"):
            page = http.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
        script = http.get("/ui/js/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "default-src 'self'" in script.headers["content-security-policy"]
        assert http.get("/ui/js/missing.js").status_code == 404
        escaped = http.get("/ui/%2e%2e/%2e%2e/%2e%2e/pyproject.toml")  # out of the console's folder: no
        assert escaped.status_code == 404 and "setuptools" not in escaped.text
        assert http.get("/v1/adapters").status_code == 401
        assert http.get("/uix").status_code in (401, 404)  # not the console's prefix: not open


def test_every_file_the_page_loads_is_there_and_packaged() -> None:
    index = (CONSOLE_DIR / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="/ui/([^"]+)"', index)
    for module in (CONSOLE_DIR / "js").glob("*.js"):
        loaded += [f"js/{name}" for name in re.findall(r'from "\./([^"]+)"', module.read_text())]
    assert "js/main.js" in loaded and "console.css" in loaded
    for name in loaded:
        assert (CONSOLE_DIR / name).is_file(), name
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    packaged = {p for pattern in globs["adapterd.server.http"] for p in CONSOLE_DIR.parent.glob(pattern)}
    assert {p for p in CONSOLE_DIR.rglob("*") if p.is_file()} <= packaged


@pytest.mark.parametrize("path", ["/v1/training/jobs", "/v1/training/jobs/job-1/events"])
def test_a_trainer_that_does_not_answer_is_a_502(tmp_path: Path, path: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with client(tmp_path, url) as http:
        refused = http.get(path, headers={"authorization": "Bearer secret"})
        assert refused.status_code == 502
        error = refused.json()["error"]
        assert error["type"] == "unavailable" and url in error["message"]
        assert http.get(path).status_code == 401  # the server checks the key before forwarding
