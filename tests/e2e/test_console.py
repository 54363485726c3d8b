"""The web console (GET /ui) in a real browser: Debian's chromium, driven headless by Playwright, against a real
server (the default model, --api-keys, --trainer) and a real trainer on loopback ports, with PEFT adapters.
Every check compares what the page shows with what the API answers to the same key.

Screenshots go to $ADAPTERD_CONSOLE_SCREENSHOTS when set (docs/console/ holds the README's), else to tmp."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapterd.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adapterd.clients import TrainerClient
from adapterd.server.evaluation.compare import Comparison
from adapterd.server.model.resolve import ResolvedModel
from tests.e2e import serving
from tests.e2e.test_trainer import HELD_OUT, TRAIN, Trainer, chat, jsonl, start_trainer
from tests.reference import make_lora_adapter, make_prompt_adapter

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT, ACME_ADMIN, ACME_USER, GLOBEX = "root-key", "acme-admin-key", "acme-user-key", "globex-key"
KEYS = f"{ROOT} admin\n{ACME_ADMIN} admin acme\n{ACME_USER} user acme\n{GLOBEX} admin globex\n"
ADAPTERS = ("lora", "soft", "acme/lora2", "globex/secret")
MAX_TOKENS = 16
PROMPT = "Name three colours."
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def adapter_dirs(default_model: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("console-adapters")
    model = default_model.path
    return {
        "lora": make_lora_adapter(model, root / "lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        "soft": make_prompt_adapter(model, root / "soft", num_virtual_tokens=8, seed=1),
        "acme/lora2": make_lora_adapter(
            model, root / "lora2", r=4, alpha=8, target_modules="all-linear", seed=2
        ),
        "globex/secret": make_lora_adapter(
            model, root / "secret", r=4, alpha=8, target_modules=["o_proj"], seed=3
        ),
        "spare": make_lora_adapter(model, root / "spare", r=4, alpha=4, target_modules=["k_proj"], seed=4),
    }


@pytest.fixture(scope="module")
def stack(
    adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[serving.Server, Trainer]]:
    """A server with keys, forwarding to a trainer (same keys; uploads with the root key)."""
    root = tmp_path_factory.mktemp("console")
    keys = root / "keys"
    keys.write_text(KEYS)
    trainer_port = serving.free_port()
    args = ("--api-keys", str(keys), "--trainer", f"http://127.0.0.1:{trainer_port}", "--max-rank", "16")
    server = serving.start_server("default", root / "store", root / "server.log", *args)
    trainer = None
    try:
        for adapter_id in ADAPTERS:
            upload(server, adapter_id, adapter_dirs[adapter_id])
        trainer = start_trainer(
            server,
            root,
            "default",
            *("--api-keys", str(keys)),
            env={"ADAPTERD_API_KEY": ROOT},
            http_port=trainer_port,
        )
        yield server, trainer
    finally:
        if trainer is not None:
            trainer.stop()
        server.stop()


@pytest.fixture(scope="module")
def server(stack: tuple[serving.Server, Trainer]) -> serving.Server:
    return stack[0]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium (.ci/run); it is missing")
        pytest.skip("no chromium here: bash scripts/install_chromium.sh (Debian) installs it")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Console:
    """One browser session on the console; records the page's script errors and CSP violations."""

    def __init__(self, browser: Any, server: serving.Server) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.server = server
        self.problems: list[str] = []
        self.page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        self.page.on(
            "console",
            lambda m: self.problems.append(m.text) if "Content Security Policy" in m.text else None,
        )

    def open(self, fragment: str = "", key: str | None = ROOT) -> Any:
        self.page.goto(f"{self.server.url}/ui{fragment}")
        if key is not None:
            self.page.locator("#key-input").fill(key)
            self.page.locator("#key-form button").click()
            playwright.expect(self.page.locator("body[data-ready=true]")).to_be_attached(timeout=WAIT_MS)
        return self.page

    def screenshot(self, name: str, tmp_path: Path, full_page: bool = False) -> None:
        folder = Path(os.environ.get("ADAPTERD_CONSOLE_SCREENSHOTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)

    def close(self) -> None:
        self.context.close()
        assert not self.problems, self.problems


@pytest.fixture
def console(browser: Any, server: serving.Server) -> Iterator[Console]:
    session = Console(browser, server)
    yield session
    session.close()


def api(
    server: serving.Server | Trainer, method: str, path: str, key: str = ROOT, **kwargs: Any
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=120, **kwargs)


def upload(server: serving.Server, adapter_id: str, directory: Path, key: str = ROOT) -> httpx.Response:
    files = {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    response = api(server, "PUT", f"/v1/adapters/{adapter_id}", key, files=files)
    assert response.status_code in (200, 201), response.text
    return response


def listed(server: serving.Server, key: str = ROOT) -> dict[str, dict[str, Any]]:
    return {a["id"]: a for a in api(server, "GET", "/v1/adapters", key).json()["data"]}


def table_rows(page: Any) -> dict[str, list[str]]:
    rows = page.locator("#adapters-table tbody tr")
    return {row.get_attribute("data-id"): row.locator("td").all_inner_texts() for row in rows.all()}


# -- adapters ------------------------------------------------------------------------------------------------


def test_the_table_lists_what_the_api_lists(console: Console, server: serving.Server, tmp_path: Path) -> None:
    greedy = {"model": "lora", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    assert api(server, "POST", "/v1/completions", json=greedy).status_code == 200
    page = console.open()
    expected = listed(server)
    rows = table_rows(page)
    assert set(rows) == set(expected)
    for adapter_id, cells in rows.items():
        a = expected[adapter_id]
        assert cells[1] == a["type"]
        assert cells[2] == str(a.get("rank") or a.get("num_virtual_tokens"))
        assert cells[4] == str(a["version"]) and cells[6] == a["residency"]
    # Requests and tokens come from /metrics: the completion above is counted for "lora".
    assert int(float(rows["lora"][8])) >= 1 and int(float(rows["lora"][9])) >= 4
    page.locator("#adapter-type-filter").select_option("prompt_tuning")
    assert set(table_rows(page)) == {a for a, d in expected.items() if d["type"] == "prompt_tuning"}
    page.locator("#adapter-type-filter").select_option("")
    page.locator("#adapters-table tr[data-id=lora]").click()
    detail = page.locator("#adapter-detail")
    playwright.expect(detail).to_contain_text(expected["lora"]["sha256"])
    assert "null" not in detail.inner_text() and "undefined" not in detail.inner_text()
    console.screenshot("adapters", tmp_path)


def test_an_upload_through_the_page_appears_in_the_api(
    console: Console, server: serving.Server, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    page = console.open()
    page.locator("#upload-id").fill("from-page")
    spare = adapter_dirs["spare"]
    page.locator("#upload-files").set_input_files([str(spare / CONFIG_FILE), str(spare / WEIGHTS_FILE)])
    page.locator("#upload-form button[type=submit]").click()
    playwright.expect(page.locator("#upload-status[data-outcome=ok]")).to_be_visible(timeout=WAIT_MS)
    made = api(server, "GET", "/v1/adapters/from-page").json()
    assert made["version"] == 1 and made["rank"] == 4 and made["target_modules"] == ["k_proj"]
    assert page.locator("#adapters-table tr[data-id=from-page]").count() == 1
    # Replace it by dropping a tar of another adapter on the drop zone: version 2 in the API.
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            tar.add(adapter_dirs["lora"] / name, arcname=name)
    drop(page, "#drop-zone", "lora.tar", archive.getvalue())
    page.locator("#upload-form button[type=submit]").click()
    playwright.expect(page.locator("#upload-status")).to_contain_text("version 2", timeout=WAIT_MS)
    replaced = api(server, "GET", "/v1/adapters/from-page").json()
    assert replaced["version"] == 2 and replaced["rank"] == 8
    # Delete it from its detail view: gone from the API.
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#adapter-detail button.danger").click()
    playwright.expect(page.locator("#adapters-table tr[data-id=from-page]")).to_have_count(0)
    assert api(server, "GET", "/v1/adapters/from-page").status_code == 404


def drop(page: Any, selector: str, name: str, content: bytes) -> None:
    """Drop one file on `selector` as a user dragging it from their file manager would."""
    transfer = page.evaluate_handle(
        "([name, bytes]) => { const t = new DataTransfer();"
        " t.items.add(new File([new Uint8Array(bytes)], name)); return t; }",
        [name, list(content)],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def test_a_bad_upload_shows_the_servers_message_and_changes_nothing(
    console: Console, server: serving.Server, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dirs["spare"], bad)
    config = json.loads((bad / CONFIG_FILE).read_text())
    (bad / CONFIG_FILE).write_text(json.dumps({**config, "r": 0}))
    before = listed(server)
    # What the API itself answers to these files (under an id the page does not touch).
    files = {name: (bad / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    refused = api(server, "PUT", "/v1/adapters/probe", files=files)
    assert refused.status_code in (400, 422)
    message = refused.json()["error"]["message"]
    page = console.open()
    page.locator("#upload-id").fill("lora")  # a replacement of a served adapter
    page.locator("#upload-files").set_input_files([str(bad / CONFIG_FILE), str(bad / WEIGHTS_FILE)])
    page.locator("#upload-form button[type=submit]").click()
    status = page.locator("#upload-status[data-outcome=error]")
    playwright.expect(status).to_have_text(f"{refused.status_code}: {message}", timeout=WAIT_MS)
    assert listed(server) == before  # lora still at its version and digest; no probe, nothing new
    console.screenshot("upload-refused", tmp_path)


# -- playground ----------------------------------------------------------------------------------------------


def test_the_playground_streams_the_apis_greedy_texts(
    console: Console, server: serving.Server, tmp_path: Path
) -> None:
    base = api(server, "GET", "/info").json()["model_id"]
    models = [base, "lora", "soft"]
    expected = {}
    for model in models:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        expected[model] = api(server, "POST", "/v1/chat/completions", json=body).json()
    page = console.open("#playground")
    page.locator("#prompt").fill(PROMPT)
    page.locator("input[name=max_tokens]").fill(str(MAX_TOKENS))
    for adapter in models[1:]:
        page.locator(f"#playground-models input[value='{adapter}']").check()
    page.locator("#playground-form button[type=submit]").click()
    playwright.expect(page.locator(".answer")).to_have_count(3)
    playwright.expect(page.locator(".answer[data-state=done]")).to_have_count(3, timeout=WAIT_MS)
    for model in models:
        answer = page.locator(f".answer[data-model='{model}']")
        choice = expected[model]["choices"][0]
        assert answer.locator(".text").inner_text() == choice["message"]["content"]
        assert answer.locator(".answer-status").inner_text() == f"finish: {choice['finish_reason']}"
        # Every token is shaded by its probability, its alternatives named on hover.
        token = answer.locator(".token.shaded").first
        assert 0 < float(token.get_attribute("data-p")) <= 1
        assert "p=" in token.get_attribute("title")
    console.screenshot("playground", tmp_path)


# -- keys ----------------------------------------------------------------------------------------------------


def test_a_tenant_key_sees_only_its_tenants_adapters(console: Console, server: serving.Server) -> None:
    page = console.open(key=None)
    playwright.expect(page.locator("#key-dialog")).to_be_visible()
    page.locator("#key-input").fill("not-a-key")
    page.locator("#key-form button").click()
    playwright.expect(page.locator("#key-error")).to_contain_text("key")
    page.locator("#key-input").fill(ACME_USER)
    page.locator("#key-form button").click()
    playwright.expect(page.locator("body[data-ready=true]")).to_be_attached(timeout=WAIT_MS)
    rows = table_rows(page)
    assert set(rows) == set(listed(server, ACME_USER)) == {"lora", "soft", "acme/lora2"}
    options = page.locator("#playground-models input").evaluate_all("inputs => inputs.map(i => i.value)")
    assert "globex/secret" not in options and "acme/lora2" in options
    # The key lives in this tab's session storage only.
    assert page.evaluate("sessionStorage.getItem('adapterd.key')") == ACME_USER
    assert page.evaluate("localStorage.length") == 0
    fresh = console.context.browser.new_context()
    try:
        other = fresh.new_page()
        other.goto(f"{server.url}/ui")
        playwright.expect(other.locator("#key-dialog")).to_be_visible()
    finally:
        fresh.close()


# -- training and evaluations --------------------------------------------------------------------------------


def test_a_job_submitted_through_the_page_draws_its_loss_and_ends_with_scores(
    console: Console, stack: tuple[serving.Server, Trainer], tmp_path: Path
) -> None:
    server, trainer = stack
    data, held_out = tmp_path / "train.jsonl", tmp_path / "held-out.jsonl"
    data.write_bytes(jsonl([chat(d) for d in TRAIN]))
    held_out.write_bytes(jsonl([chat(d) for d in HELD_OUT[:8]]))
    page = console.open("#training")
    form = page.locator("#training-form")
    form.locator("input[name=adapter_id]").fill("from-console")
    form.locator("select[name=method]").select_option("lora")
    form.locator("input[name=data]").set_input_files(str(data))
    form.locator("input[name=eval_data]").set_input_files(str(held_out))
    form.locator("input[name=max_steps]").fill("6")
    form.locator("input[name=rank]").fill("4")
    form.locator("button[type=submit]").click()
    detail = page.locator("#job-detail[data-status]")
    playwright.expect(detail).to_be_visible(timeout=WAIT_MS)
    job_id = detail.get_attribute("data-job")
    playwright.expect(page.locator("#job-detail[data-status=succeeded]")).to_be_visible(timeout=400_000)
    job = api(server, "GET", f"/v1/training/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    # The server forwards the trainer's routes as they are: our own client sees the same job through it.
    with TrainerClient(server.url, api_key=ROOT) as through_server:
        assert through_server.get(job_id) == job == api(trainer, "GET", f"/v1/training/jobs/{job_id}").json()
    # One point per logged step: the page draws the job's whole curve, up to the last step.
    points = page.locator("#job-detail .loss-curve circle.point")
    drawn = [(float(p.get_attribute("data-x")), float(p.get_attribute("data-y"))) for p in points.all()]
    assert drawn == [(float(s), float(loss)) for s, loss in job["loss_curve"]]
    assert len(drawn) >= 2 and drawn[-1][0] == job["progress"]["total_steps"] == 6
    scores = page.locator("#job-detail .scores tbody tr")
    shown = {
        row.locator("td").nth(0).inner_text(): row.locator("td").all_inner_texts() for row in scores.all()
    }
    for name in ("exact_match", "rougeL"):
        assert shown[name][1:] == [f"{job['metrics'][who][name]:.4f}" for who in ("base", "adapter")]
    link = page.locator("#job-detail a.adapter-link")
    assert link.get_attribute("href") == "#adapters/from-console"
    assert api(server, "GET", "/v1/adapters/from-console").json()["metadata"]["job_id"] == job_id
    console.screenshot("training", tmp_path, full_page=True)
    # The link opens the registered adapter's detail view, which names the job that trained it.
    link.click()
    playwright.expect(page.locator("#adapter-detail")).to_contain_text(f"Trained by job {job_id}")
    page.locator("nav a[data-page=evaluations]").click()
    playwright.expect(page.locator(f".job-scores[data-job='{job_id}']")).to_be_visible(timeout=WAIT_MS)


def test_the_evaluations_page_shows_adapterd_evals_results(console: Console, tmp_path: Path) -> None:
    results = {
        "base": {"ledger_mc": {"alias": "ledger_mc", "acc,none": 0.25, "acc_stderr,none": 0.05}},
        "lora": {"ledger_mc": {"alias": "ledger_mc", "acc,none": 0.75, "acc_stderr,none": 0.04}},
    }
    efficiency = {m: {"requests": 8.0} for m in results}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(Comparison(results, 1.5, efficiency).to_json()))  # what --out writes
    page = console.open("#evaluations")
    page.locator("#eval-files").set_input_files(str(path))
    run = page.locator(".eval-run[data-file='results.json']")
    playwright.expect(run).to_be_visible()
    cells = run.locator("tbody tr").first.locator("td").all_inner_texts()
    assert cells == ["ledger_mc", "acc,none", "0.2500 ± 0.0500", "0.7500 ± 0.0400"]
    bars = run.locator("figure[data-task=ledger_mc] rect.bar")
    assert [(b.get_attribute("data-label"), float(b.get_attribute("data-value"))) for b in bars.all()] == [
        ("base", 0.25),
        ("lora", 0.75),
    ]
    console.screenshot("evaluations", tmp_path)
