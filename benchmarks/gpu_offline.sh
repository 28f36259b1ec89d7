#!/usr/bin/env bash
# The GPU checks on a machine that has CUDA PyTorch and Triton but no package registry.
#
#   bash benchmarks/gpu_offline.sh prepare [DIR] [PYTHON_VERSION]   # here, with a registry
#   bash benchmarks/gpu_offline.sh run [DIR] [OUT_DIR]                # there, from the repo root
#
# `prepare` puts into DIR (default .gpu, ~36 MB) the wheels of Loom's dependencies that a
# CUDA PyTorch image lacks, for that machine's Python (default 3.12), and the
# text_completion inferlet built here (building needs componentize-py, which stays here).
# `run` installs the wheels under /tmp/loom-site, runs the CUDA tests and then
# benchmarks/gpu.py, writing logs and gpu.json to OUT_DIR (default benchmarks/results).
set -euo pipefail
cmd=${1:?usage: gpu_offline.sh prepare|run [DIR] [...]}
dir=${2:-.gpu}
case "$cmd" in
prepare)
    py=${3:-3.12}
    mkdir -p "$dir/whl"
    platforms=()
    for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    .venv/bin/python -m pip download -q --only-binary=:all: --python-version "$py" \
        --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dir/whl" \
        wasmtime==50.0.1 fastapi==0.165.0 uvicorn==0.54.0 websockets==17.4 llguidance==1.9.1 \
        msgpack==1.2.4 prometheus-client==0.26.0 httpx==0.28.1
    .venv/bin/python - "$dir" <<'EOF'
import shutil, sys
from pathlib import Path
from loom.sdk.build import build_inferlet
shutil.copy(build_inferlet(Path("inferlets/text_completion")),
            Path(sys.argv[1]) / "text_completion.wasm")
EOF
    du -sh "$dir"
    ;;
run)
    out=${3:-benchmarks/results}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/loom-site "$dir"/whl/*.whl
    export PYTHONPATH="/tmp/loom-site:$PWD/src:$PWD" PYTHONUNBUFFERED=1
    # The CPU kernels are not needed for the CUDA checks (their build takes ~20 s).
    export LOOM_CPU_KERNELS=0
    nvidia-smi -L || true
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_decode_graphs.py \
        tests/kernels/test_triton_ops.py 2>&1 | tee "$out/gpu_tests.log" | tail -25 || true
    timeout 400 python3 benchmarks/gpu.py --inferlet "$dir/text_completion.wasm" \
        --out "$out/gpu.json" 2>&1 | grep -v "Writing model shards" | tee "$out/gpu.log" | tail -45
    ;;
*)
    echo "usage: gpu_offline.sh prepare|run [DIR] [...]" >&2
    exit 2
    ;;
esac
