#!/usr/bin/env bash
# Generate the gRPC Python modules (adapterd.v1.*_pb2.py, *_pb2_grpc.py, *_pb2.pyi) from protos/adapterd/v1/*.proto.
# The generated files are committed, so that installing adapterd needs no grpcio-tools; one pinned
# grpcio-tools version makes them byte-for-byte reproducible.
# Usage: bash scripts/gen_protos.sh            regenerate in place
#        bash scripts/gen_protos.sh --check    exit 1 if the committed files differ from a fresh generation
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

GRPCIO_TOOLS_VERSION=1.85.1  # keep equal to constraints.txt and the dev extra in pyproject.toml
PROTO_DIR=protos
OUT_DIR=protos/adapterd/v1

if [[ -n "${PYTHON:-}" ]]; then
    python=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)
if [[ "$installed" != "$GRPCIO_TOOLS_VERSION" ]]; then
    echo "gen_protos: need grpcio-tools==$GRPCIO_TOOLS_VERSION for $python, found '${installed:-none}'" >&2
    echo "            pip install grpcio-tools==$GRPCIO_TOOLS_VERSION" >&2
    exit 2
fi

generate() {  # generate DEST: write the modules under DEST/adapterd/v1
    "$python" -m grpc_tools.protoc -I"$PROTO_DIR" \
        --python_out="$1" --grpc_python_out="$1" --pyi_out="$1" \
        "$PROTO_DIR"/adapterd/v1/*.proto
}

generated_files() {  # generated_files DIR: the generated modules under DIR, one per line, sorted
    (cd "$1" && find . -maxdepth 1 -type f \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) \
        | sed 's|^\./||' | sort)
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
generate "$tmp"

if [[ "${1:-}" == "--check" ]]; then
    if ! diff -u <(generated_files "$OUT_DIR") <(generated_files "$tmp/adapterd/v1") >/dev/null; then
        echo "gen_protos: the set of generated files differs (committed vs fresh):" >&2
        diff <(generated_files "$OUT_DIR") <(generated_files "$tmp/adapterd/v1") >&2 || true
        echo "gen_protos: run 'bash scripts/gen_protos.sh' and commit the result" >&2
        exit 1
    fi
    stale=0
    while read -r name; do
        if ! cmp -s "$OUT_DIR/$name" "$tmp/adapterd/v1/$name"; then
            echo "gen_protos: $OUT_DIR/$name is stale" >&2
            diff -u "$OUT_DIR/$name" "$tmp/adapterd/v1/$name" | head -n 20 >&2 || true
            stale=1
        fi
    done < <(generated_files "$tmp/adapterd/v1")
    if (( stale )); then
        echo "gen_protos: run 'bash scripts/gen_protos.sh' and commit the result" >&2
        exit 1
    fi
    echo "gen_protos: generated files are up to date"
    exit 0
elif [[ $# -gt 0 ]]; then
    echo "usage: bash scripts/gen_protos.sh [--check]" >&2
    exit 2
fi

# Replace the old modules with the fresh ones (removing those of deleted .proto files).
generated_files "$OUT_DIR" | while read -r name; do rm -f "$OUT_DIR/$name"; done
while read -r name; do cp "$tmp/adapterd/v1/$name" "$OUT_DIR/$name"; done < <(generated_files "$tmp/adapterd/v1")
chmod 644 "$OUT_DIR"/*_pb2*.py*
echo "gen_protos: wrote $(generated_files "$OUT_DIR" | wc -l) files to $OUT_DIR"
