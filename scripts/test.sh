#!/usr/bin/env bash
# The test command: lint, type-check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
echo "== ruff"
$PY -m ruff check --no-cache src tests benchmarks inferlets
$PY -m ruff format --no-cache --check -q src tests benchmarks inferlets
echo "== mypy"
$PY -m mypy
# The inferlet SDK, as the package inferlets import.
(cd src/loom/sdk/guest && "../../../../$PY" -m mypy --config-file ../../../../pyproject.toml -p inferlet)
echo "== pytest"
$PY -m pytest -q "$@"
