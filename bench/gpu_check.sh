#!/usr/bin/env bash
# The prepared GPU run of issue 19, for one call of the device tool (carry .whl; timeout_s 590):
#   bash bench/gpu_check.sh            on the GPU machine: CUDA tests, one NF4 linear three ways, the GPU bench
#   bash bench/gpu_check.sh --tiny     the same steps here on the CPU (the CUDA tests skip), to try it first
# Each step has its own time limit (200 + 60 + 300 s), so a slow one leaves the others' results; everything
# lands in $OUT (cuda-tests.log/.xml, nf4-linears.md/.json, results-gpu*.md/.json), the last lines a summary.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ! python3 -c "import bitsandbytes, uvicorn, starlette" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/.mypy-path:$PWD:${PYTHONPATH:-}
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
$python -c "import torch, transformers, peft, bitsandbytes, triton; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=()
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, note how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$limit" "$@"
    status+=("$name: exit $? in $((SECONDS - started)) s")
}

# 1. The CUDA tests (they skip without CUDA): the kernels against their references, graphs against eager,
#    and the bases (bf16, NF4 on both kernels, int8) with LoRA and soft prompts against PEFT.
#    The interpreter re-runs in a subprocess are left out: they are CPU checks, and CI runs them.
step cuda-tests 200 bash -c "$python -m pytest -q -p no:cacheprovider -rs -k 'not in_a_subprocess' \
    --junitxml='$out/cuda-tests.xml' tests/unit/test_triton_nf4.py tests/unit/test_triton_lora.py \
    tests/parity/test_decode_graphs.py tests/parity/test_cuda_parity.py 2>&1 | tee '$out/cuda-tests.log'"

# 2. One 8B-shape NF4 linear: bitsandbytes, the fused kernel, the bf16 matmul.
if $python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    step nf4-linears 60 bash -c "set -o pipefail; $python -m bench.nf4_kernel --out '$out/nf4-linears.json' \
        | tee '$out/nf4-linears.md'"
fi

# 3. The GPU bench (Llama-3.1-8B shape, random weights, NF4) on the fused NF4 kernel; --tiny here.
step bench 300 bash -c "set -o pipefail; OUT='$out' bash bench/gpu.sh --nf4-kernel triton $* 2>&1 | tail -60"

printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
