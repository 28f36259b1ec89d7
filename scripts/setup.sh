#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with Loom and its test tools.
#
# torch: a torch already importable by the system Python (say, a CUDA build) is kept, by
# letting the venv see system packages. Otherwise the CPU build is installed as
# "$LOOM_TORCH_SPEC" (default torch==2.13.0), never the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${LOOM_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the system torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC (CPU build)"
  .venv/bin/pip install --quiet "$TORCH_SPEC"
fi
echo "setup: installing loom, its Ray extra and its test dependencies"
.venv/bin/pip install --quiet -e ".[dev,ray]"
# The inferlet SDK importable in the venv (editors' completion, mypy on inferlets): the
# same sources the builds bundle; calls into the host work only inside a built inferlet.
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD/src/loom/sdk/guest" > "$SITE/loom-inferlet-sdk.pth"
.venv/bin/python -c "import torch, loom, inferlet; print(f'setup: loom {loom.__version__}, torch {torch.__version__}')"
# Loom's CPU kernels are compiled for this machine's CPU on first use; build it now so
# the first engine start does not wait for the compiler.
.venv/bin/python -c "from loom.kernels import cpu; print('setup: CPU kernels', 'built' if cpu.available() else 'unavailable (torch ops are used)')"
