"""Virtual environments for client packages that cannot share the project's (their pins conflict with it),
built once per requirements file and cached under the user's cache directory."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from adapterd.server.common.config import default_cache_dir

HERE = Path(__file__).parent


def compat_env(requirements: str) -> Path:
    """The Python of an environment with `requirements` (a file beside this one) installed; built on first
    use, then reused while the file is unchanged."""
    path = HERE / requirements
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    env = default_cache_dir() / "test-envs" / f"{path.stem}-{digest}"
    python = env / "bin" / "python"
    if python.exists():
        return python
    building = env.with_name(env.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(path)], check=True)
    building.rename(env)  # venv scripts hold absolute paths: run it as `env/bin/python -m ...` only
    return python
