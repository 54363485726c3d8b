#!/usr/bin/env bash
# The GPU benchmark on a machine without network (see ../shared/gpu/README.md): bitsandbytes comes from the
# wheels in .whl/ (../shared/gpu/fetch-wheels), adapterd from this checkout (.mypy-path maps the package
# names onto the source folders). Results go to $OUT (or bench/). Extra arguments go to the bench, e.g.
#   bash bench/gpu.sh --tiny          a smoke run of the same code on a tiny model (about 20 s)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench}
mkdir -p "$out"
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/.mypy-path:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
name=results-gpu$([[ " $* " == *" --tiny "* ]] && echo -tiny || true)
python3 -m bench --mode gpu --out "$out/$name.json" "$@" | tee "$out/$name.md"
