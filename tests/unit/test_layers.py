"""The layout is the data flow: every import of one `server/` layer points down to a lower one (the tree
in docs/architecture.md). `adapters/` and `clients/` stand apart from the server: nothing of it imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lower number = nearer the caller; a layer may import only layers with a higher number (or itself).
LAYERS = {
    "cli": 0,
    "http": 1,
    "grpc": 1,
    "trainer": 1,
    "evaluation": 2,
    "wire": 2,
    "host": 3,
    "engine": 4,
    "model": 5,
    "common": 6,
}


def imported_modules(path: Path) -> set[str]:
    """Every `adapterd...` module the file imports, at the top or inside a function."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {name for name in modules if name.startswith("adapterd.")}


def server_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["adapterd", "server"] and len(parts) > 2 else None


def upward_imports(layer: str, root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / "server" / layer).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            target = server_layer(module)
            if target is None or target == layer:
                continue
            if target not in LAYERS or LAYERS[target] <= LAYERS[layer]:
                found.append(f"{path.relative_to(root)} imports {module}")
    return found


def test_every_server_module_sits_in_a_layer() -> None:
    """A new top-level module would escape the rule; only the public `llm.py` path sits above the layers."""
    top = {p.name for p in (ROOT / "server").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert top == {"__init__.py", "llm.py", *LAYERS}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    assert upward_imports(layer) == []


@pytest.mark.parametrize("package", ["adapters", "clients"])
def test_adapters_and_clients_import_nothing_of_the_server(package: str) -> None:
    found = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in imported_modules(path)
        if module.startswith("adapterd.server")
    ]
    assert found == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an engine module importing the HTTP front end (inside a function), or a module
    outside every layer, is reported; the engine importing the model is not."""
    engine = tmp_path / "server" / "engine"
    engine.mkdir(parents=True)
    (engine / "bad.py").write_text(
        "from adapterd.server.model.llama import LlamaModel\n"
        "def f():\n    from adapterd.server.http.app import build_app\n"
        "    import adapterd.server.tools\n"
    )
    assert upward_imports("engine", tmp_path) == [
        "server/engine/bad.py imports adapterd.server.http.app",
        "server/engine/bad.py imports adapterd.server.tools",
    ]
